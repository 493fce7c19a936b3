// The io_uring floor: one thread, one operation in flight per direction.
use io_uring::{opcode, types, IoUring};
use std::os::fd::{AsRawFd, IntoRawFd};

const ACCEPT: u64 = 1;
const RECV: u64 = 2;
const SEND: u64 = 3;
const BUF: usize = 32 * 1024;

struct Dir { fd: i32, buf: Box<[u8]>, len: usize, sent: usize }

pub fn run(listen: &str, backend: &str) {
    let listener = std::net::TcpListener::bind(listen).unwrap();
    let lfd = listener.as_raw_fd();
    let mut b = IoUring::builder();
    b.setup_coop_taskrun().setup_single_issuer();
    if std::env::var("DEFER").is_ok() { b.setup_defer_taskrun(); }
    let mut ring = b.build(4096).unwrap();
    let mut dirs: Vec<Option<Dir>> = Vec::new();
    let mut pending: Vec<io_uring::squeue::Entry> = Vec::new();
    pending.push(opcode::Accept::new(types::Fd(lfd), std::ptr::null_mut(), std::ptr::null_mut()).build().user_data(ACCEPT << 32));
    loop {
        {
            let mut sq = ring.submission();
            for e in pending.drain(..) { unsafe { sq.push(&e).unwrap(); } }
        }
        ring.submit_and_wait(1).unwrap();
        let done: Vec<(u64, i32)> = ring.completion().map(|c: io_uring::cqueue::Entry| (c.user_data(), c.result())).collect();
        for (ud, res) in done {
            let (kind, i) = (ud >> 32, (ud & 0xffff_ffff) as usize);
            match kind {
                ACCEPT => {
                    pending.push(opcode::Accept::new(types::Fd(lfd), std::ptr::null_mut(), std::ptr::null_mut()).build().user_data(ACCEPT << 32));
                    if res < 0 { continue; }
                    let cfd = res;
                    unsafe {
                        let one: libc::c_int = 1;
                        libc::setsockopt(cfd, libc::IPPROTO_TCP, libc::TCP_NODELAY, &one as *const _ as *const libc::c_void, 4);
                    }
                    let bfd = std::os::unix::net::UnixStream::connect(backend).unwrap().into_raw_fd();
                    let i = dirs.len();
                    for fd in [cfd, bfd] {
                        dirs.push(Some(Dir { fd, buf: vec![0u8; BUF].into_boxed_slice(), len: 0, sent: 0 }));
                    }
                    for j in [i, i + 1] {
                        let d = dirs[j].as_mut().unwrap();
                        pending.push(opcode::Recv::new(types::Fd(d.fd), d.buf.as_mut_ptr(), BUF as u32).build().user_data(RECV << 32 | j as u64));
                    }
                }
                RECV => {
                    if dirs[i].is_none() || dirs[i ^ 1].is_none() { continue; }
                    if res <= 0 {
                        for j in [i, i ^ 1] { let d = dirs[j].take().unwrap(); unsafe { libc::close(d.fd); } }
                        continue;
                    }
                    let peer = dirs[i ^ 1].as_ref().unwrap().fd;
                    let d = dirs[i].as_mut().unwrap();
                    d.len = res as usize; d.sent = 0;
                    pending.push(opcode::Send::new(types::Fd(peer), d.buf.as_ptr(), d.len as u32).build().user_data(SEND << 32 | i as u64));
                }
                SEND => {
                    if dirs[i].is_none() || dirs[i ^ 1].is_none() { continue; }
                    if res < 0 {
                        for j in [i, i ^ 1] { let d = dirs[j].take().unwrap(); unsafe { libc::close(d.fd); } }
                        continue;
                    }
                    let peer = dirs[i ^ 1].as_ref().unwrap().fd;
                    let d = dirs[i].as_mut().unwrap();
                    d.sent += res as usize;
                    if d.sent < d.len {
                        pending.push(opcode::Send::new(types::Fd(peer), unsafe { d.buf.as_ptr().add(d.sent) }, (d.len - d.sent) as u32).build().user_data(SEND << 32 | i as u64));
                    } else {
                        pending.push(opcode::Recv::new(types::Fd(d.fd), d.buf.as_mut_ptr(), BUF as u32).build().user_data(RECV << 32 | i as u64));
                    }
                }
                _ => {}
            }
        }
    }
}
