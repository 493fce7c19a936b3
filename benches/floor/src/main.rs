// Bare relays, one per I/O design, that only forward bytes (trust auth,
// so no proxy logic at all): what any relay costs on this machine.
// Usage: relay-floor mio|tokio1|tokio2|uring LISTEN_ADDR BACKEND_SOCKET
mod uring;
use std::io::{ErrorKind, Read, Write};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (mode, listen, backend) = (args[1].as_str(), args[2].clone(), args[3].clone());
    match mode {
        "mio" => mio_relay(&listen, &backend),
        "tokio1" => tokio_relay(&listen, &backend, 1),
        "tokio2" => tokio_relay(&listen, &backend, 2),
        "uring" => uring::run(&listen, &backend),
        _ => panic!("mode"),
    }
}

fn tokio_relay(listen: &str, backend: &str, threads: usize) {
    let rt = if threads == 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(threads).enable_all().build().unwrap()
    };
    rt.block_on(async {
        let l = tokio::net::TcpListener::bind(listen).await.unwrap();
        loop {
            let (mut c, _) = l.accept().await.unwrap();
            c.set_nodelay(true).unwrap();
            let backend = backend.to_string();
            tokio::spawn(async move {
                let mut b = tokio::net::UnixStream::connect(backend).await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut c, &mut b).await;
            });
        }
    });
}

enum Sock {
    Tcp(mio::net::TcpStream),
    Unix(mio::net::UnixStream),
}
impl Sock {
    fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        match self { Sock::Tcp(s) => s.read(b), Sock::Unix(s) => s.read(b) }
    }
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        match self { Sock::Tcp(s) => s.write(b), Sock::Unix(s) => s.write(b) }
    }
}

struct Side { sock: Sock, pending: Vec<u8>, open: bool }

fn mio_relay(listen: &str, backend: &str) {
    use mio::{Events, Interest, Poll, Token};
    let mut poll = Poll::new().unwrap();
    let mut listener = mio::net::TcpListener::bind(listen.parse().unwrap()).unwrap();
    const LISTENER: Token = Token(usize::MAX);
    poll.registry().register(&mut listener, LISTENER, Interest::READABLE).unwrap();
    let mut sides: Vec<Option<Side>> = Vec::new();
    let mut events = Events::with_capacity(1024);
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        poll.poll(&mut events, None).unwrap();
        for ev in events.iter() {
            if ev.token() == LISTENER {
                while let Ok((c, _)) = listener.accept() {
                    c.set_nodelay(true).unwrap();
                    let b = mio::net::UnixStream::connect(backend).unwrap();
                    let i = sides.len();
                    let mut cs = Sock::Tcp(c);
                    let mut bs = Sock::Unix(b);
                    let rw = Interest::READABLE | Interest::WRITABLE;
                    match &mut cs { Sock::Tcp(s) => poll.registry().register(s, Token(i), rw).unwrap(), _ => {} }
                    match &mut bs { Sock::Unix(s) => poll.registry().register(s, Token(i + 1), rw).unwrap(), _ => {} }
                    sides.push(Some(Side { sock: cs, pending: Vec::new(), open: true }));
                    sides.push(Some(Side { sock: bs, pending: Vec::new(), open: true }));
                }
                continue;
            }
            let i = ev.token().0;
            let peer = i ^ 1;
            if sides[i].is_none() { continue; }
            if ev.is_writable() {
                // flush what is pending toward i
                let s = sides[i].as_mut().unwrap();
                while !s.pending.is_empty() {
                    match s.sock.write(&s.pending) {
                        Ok(n) => { s.pending.drain(..n); }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        Err(_) => { s.open = false; break; }
                    }
                }
            }
            if ev.is_readable() || ev.is_read_closed() {
                loop {
                    let n = match sides[i].as_mut().unwrap().sock.read(&mut buf) {
                        Ok(0) => { sides[i].as_mut().unwrap().open = false; break; }
                        Ok(n) => n,
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        Err(_) => { sides[i].as_mut().unwrap().open = false; break; }
                    };
                    let p = sides[peer].as_mut().unwrap();
                    let mut off = 0;
                    if p.pending.is_empty() {
                        while off < n {
                            match p.sock.write(&buf[off..n]) {
                                Ok(w) => off += w,
                                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                                Err(_) => { p.open = false; break; }
                            }
                        }
                    }
                    p.pending.extend_from_slice(&buf[off..n]);
                    if n < buf.len() { break; }
                }
            }
            let closed = !sides[i].as_ref().unwrap().open || !sides[peer].as_ref().unwrap().open;
            if closed {
                sides[i] = None;
                sides[peer] = None;
            }
        }
    }
}
