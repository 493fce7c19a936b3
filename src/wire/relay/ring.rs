//! The relay's io_uring transport: one thread owns one io_uring and relays
//! every plain-socket session handed to it. Per direction a receive is in
//! flight, or the send of what it got with the next receive linked behind
//! it; all are submitted and reaped in one system call per turn of the
//! thread's loop.
//!
//! Written by hand because the io_uring runtimes for tokio (tokio-uring,
//! monoio, glommio) each bring a runtime of their own, and tokio-uring
//! waits on its ring through tokio's epoll, which puts back the system
//! calls this transport exists to remove. Measured on the 2-core bench
//! machine with pgbench `-S -M prepared -c 8 -j 2`: a bare relay on epoll
//! costs 22-34 us of proxy CPU per transaction, PgBouncer 25-31, a bare
//! one on io_uring 21-24 (BENCHMARKS.md, issue 14).
//!
//! A session's task hands its two sockets over ([`relay`]) and gets them
//! back, with how it ended, to say goodbye through tokio as the other
//! transport does. Drain and abort reach the thread as commands; a buffer
//! is freed only once no operation on it is in flight.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use io_uring::{opcode, IoUring};
use tokio::sync::oneshot;

use super::{farewell, pumps, RelayEnd, RelayParts};
use crate::shutdown::Shutdown;
use crate::wire::stream::{IntoSocket, Socket, StdSocket};

#[derive(Debug, thiserror::Error)]
pub enum RingError {
    #[error("io_uring is not available here: {0}")]
    Unavailable(io::Error),
    #[error("this kernel's io_uring lacks {0}")]
    Missing(&'static str),
    #[error("could not start the relay thread: {0}")]
    Thread(io::Error),
}

/// A relay thread and its ring. Dropping it aborts the sessions it still
/// relays and waits for the thread to finish.
pub struct Ring {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

struct Shared {
    /// At most three commands per session (start, drain, abort) and one
    /// quit, so bounded by the proxy's connection limit.
    commands: Mutex<Option<Vec<Command>>>,
    /// Written to wake the thread; the thread keeps a read on it in flight.
    wake: OwnedFd,
    next_id: AtomicU64,
}

enum Command {
    Start(Box<Handover>),
    Drain(u64),
    Abort(u64),
    Quit,
}

/// What a session's task hands to the thread.
struct Handover {
    id: u64,
    client: StdSocket,
    backend: StdSocket,
    parts: RelayParts,
    done: oneshot::Sender<Finished>,
}

/// What the thread hands back.
struct Finished {
    end: RelayEnd,
    client: StdSocket,
    backend: StdSocket,
}

const RING_ENTRIES: u32 = 1024;

impl Ring {
    /// Sets up a ring (refused where the kernel or its sandbox forbids
    /// io_uring) and starts its thread.
    pub fn start() -> Result<Ring, RingError> {
        // SAFETY: eventfd returns a new descriptor we own, or -1.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(RingError::Unavailable(io::Error::last_os_error()));
        }
        let shared = Arc::new(Shared {
            commands: Mutex::new(Some(Vec::new())),
            // SAFETY: fd was just created and is owned by nobody else.
            wake: unsafe { OwnedFd::from_raw_fd(fd) },
            next_id: AtomicU64::new(1),
        });
        let for_thread = shared.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
        // The ring is made on its thread: with setup_single_issuer the
        // thread that makes it is the only one that may submit to it.
        let thread = std::thread::Builder::new()
            .name("meridian-relay".into())
            .spawn(move || match new_ring() {
                Ok(ring) => {
                    let _ = ready_tx.send(Ok(()));
                    Worker::new(ring, for_thread).run();
                }
                Err(e) => {
                    for_thread
                        .commands
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .take();
                    let _ = ready_tx.send(Err(e));
                }
            })
            .map_err(RingError::Thread)?;
        let ring = Ring {
            shared,
            thread: Some(thread),
        };
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(ring),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(RingError::Thread(io::Error::other("relay thread died"))),
        }
    }

    /// Queues a command and wakes the thread; gives it back if the thread is gone.
    fn command(&self, c: Command) -> Result<(), Command> {
        let mut queue = self
            .shared
            .commands
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let Some(queue) = queue.as_mut() else {
            return Err(c);
        };
        queue.push(c);
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live buffer to our eventfd.
        unsafe { libc::write(self.shared.wake.as_raw_fd(), one.as_ptr().cast(), 8) };
        Ok(())
    }
}

/// A ring, refused where the kernel or its sandbox forbids io_uring or
/// lacks an operation the relay uses.
fn new_ring() -> Result<IoUring, RingError> {
    let ring = IoUring::builder()
        .setup_coop_taskrun()
        .setup_single_issuer()
        .build(RING_ENTRIES)
        .map_err(RingError::Unavailable)?;
    let mut probe = io_uring::Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .map_err(RingError::Unavailable)?;
    for (code, name) in [
        (opcode::Recv::CODE, "IORING_OP_RECV"),
        (opcode::Send::CODE, "IORING_OP_SEND"),
        (opcode::Read::CODE, "IORING_OP_READ"),
        (opcode::AsyncCancel::CODE, "IORING_OP_ASYNC_CANCEL"),
    ] {
        if !probe.is_supported(code) {
            return Err(RingError::Missing(name));
        }
    }
    Ok(ring)
}

/// The proxy's relay threads; sessions are dealt to them in turn.
pub struct Rings {
    rings: Vec<Ring>,
    next: std::sync::atomic::AtomicUsize,
}

impl Rings {
    /// `threads` relay threads (at least one).
    pub fn start(threads: usize) -> Result<Rings, RingError> {
        let rings = (0..threads.max(1))
            .map(|_| Ring::start())
            .collect::<Result<_, _>>()?;
        Ok(Rings {
            rings,
            next: Default::default(),
        })
    }

    /// The ring the next session goes to.
    pub fn pick(&self) -> &Ring {
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        &self.rings[i % self.rings.len()]
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        let _ = self.command(Command::Quit);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Relays one session on `ring` and says goodbye through tokio afterwards.
pub(super) async fn relay<C: IntoSocket, B: IntoSocket>(
    ring: &Ring,
    client: C,
    backend: B,
    parts: RelayParts,
    shutdown: &Shutdown,
) -> RelayEnd {
    let (client, backend) = match (client.into_socket(), backend.into_socket()) {
        (Ok(c), Ok(b)) => (c, b),
        (c, b) => {
            let e = c.err().or(b.err());
            tracing::warn!(error = ?e, "could not hand the session's sockets to the relay thread");
            return RelayEnd::ClientClosed;
        }
    };
    let id = ring.shared.next_id.fetch_add(1, Ordering::Relaxed);
    let (done, mut finished) = oneshot::channel();
    let handover = Box::new(Handover {
        id,
        client,
        backend,
        parts,
        done,
    });
    if let Err(Command::Start(h)) = ring.command(Command::Start(handover)) {
        return relay_with_tokio(*h, shutdown).await;
    }
    let mut drain_sent = false;
    let finished = loop {
        tokio::select! {
            f = &mut finished => break f,
            _ = shutdown.drain.cancelled(), if !drain_sent => {
                drain_sent = true;
                let _ = ring.command(Command::Drain(id));
            }
            _ = shutdown.abort.cancelled() => {
                let _ = ring.command(Command::Abort(id));
                break (&mut finished).await;
            }
        }
    };
    // An error means the thread dropped the session (it is gone): the
    // sockets closed with it.
    let Ok(Finished {
        end,
        client,
        backend,
    }) = finished
    else {
        return RelayEnd::Aborted;
    };
    if let (Ok(mut c), Ok(mut b)) = (Socket::from_std(client), Socket::from_std(backend)) {
        farewell(&end, &mut c, &mut b).await;
    }
    end
}

/// The thread is gone (it only stops when its `Ring` drops): relay with tokio.
async fn relay_with_tokio(h: Handover, shutdown: &Shutdown) -> RelayEnd {
    match (Socket::from_std(h.client), Socket::from_std(h.backend)) {
        (Ok(c), Ok(b)) => pumps::relay(c, b, h.parts, shutdown).await,
        _ => RelayEnd::ClientClosed,
    }
}

/// What an operation in flight is, in the low bits of its user_data; the
/// session's id is in the rest (ids are never reused, so a late completion
/// cannot be taken for another session's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Wake = 0,
    FromClient = 1,
    ToBackend = 2,
    FromBackend = 3,
    ToClient = 4,
    Cancel = 5,
}

impl Op {
    fn data(self, id: u64) -> u64 {
        id << 3 | self as u64
    }

    fn decode(data: u64) -> (u64, Option<Op>) {
        let op = match data & 7 {
            0 => Op::Wake,
            1 => Op::FromClient,
            2 => Op::ToBackend,
            3 => Op::FromBackend,
            4 => Op::ToClient,
            5 => Op::Cancel,
            _ => return (data >> 3, None),
        };
        (data >> 3, Some(op))
    }
}

mod live;
mod worker;
use worker::Worker;

#[cfg(test)]
mod tests;
