//! One session on the relay thread: each direction's buffer and the
//! operation in flight on it, and what each completion leads to. The same
//! decisions as the tokio transport's pumps, as a state machine.

use std::os::fd::{AsRawFd, RawFd};

use io_uring::{opcode, squeue, types};

use super::{Finished, Handover, Op};
use crate::wire::relay::{resize_read, BackendSide, ClientSide, RelayEnd, Replies, FIRST_READ};

/// One direction: its buffer holds what the last receive got until the
/// send of it completes. At most one operation in flight.
struct Pipe {
    buf: Vec<u8>,
    len: usize,
    sent: usize,
    in_flight: Option<Op>,
}

impl Pipe {
    fn new() -> Pipe {
        Pipe {
            buf: vec![0; FIRST_READ],
            len: 0,
            sent: 0,
            in_flight: None,
        }
    }

    fn recv(&mut self, op: Op, id: u64, fd: RawFd) -> squeue::Entry {
        if let Some(size) = resize_read(self.len, self.buf.len()) {
            self.buf = vec![0; size];
        }
        self.in_flight = Some(op);
        opcode::Recv::new(types::Fd(fd), self.buf.as_mut_ptr(), self.buf.len() as u32)
            .build()
            .user_data(op.data(id))
    }

    /// Took `n` bytes from a receive; they are sent next.
    fn received(&mut self, n: usize) {
        self.len = n;
        self.sent = 0;
    }

    fn send_rest(&mut self, op: Op, id: u64, fd: RawFd) -> squeue::Entry {
        self.in_flight = Some(op);
        let rest = &self.buf[self.sent..self.len];
        opcode::Send::new(types::Fd(fd), rest.as_ptr(), rest.len() as u32)
            .build()
            .user_data(op.data(id))
    }

    /// A send moved `n` bytes; true when the whole chunk has gone.
    fn sent(&mut self, n: usize) -> bool {
        self.sent += n;
        self.sent >= self.len
    }
}

/// A session the relay thread relays.
pub(super) struct Live {
    h: Handover,
    up: Pipe,
    down: Pipe,
    client_side: ClientSide,
    backend_side: BackendSide,
    /// What the chunk being sent to the client answers.
    replies: Replies,
    terminate: bool,
    draining: bool,
    end: Option<RelayEnd>,
}

impl Live {
    /// The session, with a receive queued on each side.
    pub(super) fn start(h: Handover, q: &mut Vec<squeue::Entry>) -> Live {
        let max_message = h.parts.max_message;
        let mut live = Live {
            h,
            up: Pipe::new(),
            down: Pipe::new(),
            client_side: ClientSide::new(max_message),
            backend_side: BackendSide::new(),
            replies: Replies::default(),
            terminate: false,
            draining: false,
            end: None,
        };
        let (id, client, backend) = live.ids();
        q.push(live.up.recv(Op::FromClient, id, client));
        q.push(live.down.recv(Op::FromBackend, id, backend));
        live
    }

    fn ids(&self) -> (u64, RawFd, RawFd) {
        (
            self.h.id,
            self.h.client.as_raw_fd(),
            self.h.backend.as_raw_fd(),
        )
    }

    /// An operation of this session completed with `res`; true when the
    /// session has ended and nothing of it is in flight any more.
    pub(super) fn complete(&mut self, op: Op, res: i32, q: &mut Vec<squeue::Entry>) -> bool {
        let pipe = match op {
            Op::FromClient | Op::ToBackend => &mut self.up,
            _ => &mut self.down,
        };
        if pipe.in_flight == Some(op) {
            pipe.in_flight = None;
            if self.end.is_none() {
                self.advance(op, res, q);
            }
        }
        self.end.is_some() && self.up.in_flight.is_none() && self.down.in_flight.is_none()
    }

    fn advance(&mut self, op: Op, res: i32, q: &mut Vec<squeue::Entry>) {
        let (id, client, backend) = self.ids();
        let n = usize::try_from(res).unwrap_or(0);
        match op {
            Op::FromClient if n == 0 => self.finish(RelayEnd::ClientClosed, q),
            Op::FromClient => {
                self.up.received(n);
                let parts = &mut self.h.parts;
                let chunk = &self.up.buf[..n];
                match self
                    .client_side
                    .scan(chunk, &parts.state, &mut parts.statements)
                {
                    Err(e) => self.finish(RelayEnd::ClientProtocolError(e), q),
                    Ok(terminate) => {
                        self.terminate = terminate;
                        q.push(self.up.send_rest(Op::ToBackend, id, backend));
                    }
                }
            }
            Op::ToBackend if n == 0 => self.finish(RelayEnd::ClientClosed, q),
            Op::ToBackend if !self.up.sent(n) => q.push(self.up.send_rest(op, id, backend)),
            Op::ToBackend if self.terminate => self.finish(RelayEnd::ClientClosed, q),
            Op::ToBackend => q.push(self.up.recv(Op::FromClient, id, client)),
            Op::FromBackend if n == 0 => self.finish(RelayEnd::BackendClosed, q),
            Op::FromBackend => {
                self.down.received(n);
                match self.backend_side.scan(&self.down.buf[..n]) {
                    Err(_) => self.finish(RelayEnd::BackendClosed, q),
                    Ok(replies) => {
                        self.replies = replies;
                        q.push(self.down.send_rest(Op::ToClient, id, client));
                    }
                }
            }
            Op::ToClient if n == 0 => self.finish(RelayEnd::BackendClosed, q),
            Op::ToClient if !self.down.sent(n) => q.push(self.down.send_rest(op, id, client)),
            Op::ToClient => {
                self.h
                    .parts
                    .state
                    .delivered(std::mem::take(&mut self.replies));
                if self.draining && self.h.parts.state.is_idle() {
                    self.finish(RelayEnd::Drained, q);
                } else {
                    q.push(self.down.recv(Op::FromBackend, id, backend));
                }
            }
            Op::Wake | Op::Cancel => {}
        }
    }

    /// Drain reached the session: it ends as soon as it is idle, which may be now.
    pub(super) fn drain(&mut self, q: &mut Vec<squeue::Entry>) {
        self.draining = true;
        let waiting = self.down.in_flight == Some(Op::FromBackend);
        if waiting && self.h.parts.state.is_idle() {
            self.finish(RelayEnd::Drained, q);
        }
    }

    /// Ends the session (the first reason wins) and cancels what is in flight.
    pub(super) fn finish(&mut self, end: RelayEnd, q: &mut Vec<squeue::Entry>) {
        if self.end.is_some() {
            return;
        }
        self.end = Some(end);
        let id = self.h.id;
        for op in [self.up.in_flight, self.down.in_flight]
            .into_iter()
            .flatten()
        {
            q.push(
                opcode::AsyncCancel::new(op.data(id))
                    .build()
                    .user_data(Op::Cancel.data(id)),
            );
        }
    }

    /// Gives the sockets back to the session's task (which may be gone).
    pub(super) fn hand_back(self) {
        let h = self.h;
        let _ = h.done.send(Finished {
            end: self.end.unwrap_or(RelayEnd::Aborted),
            client: h.client,
            backend: h.backend,
        });
    }
}
