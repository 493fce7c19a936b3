//! One session on the relay thread: each direction's buffer and the
//! operation in flight on it, and what each completion leads to. The same
//! decisions as the tokio transport's pumps, as a state machine.

use std::os::fd::{AsRawFd, RawFd};

use io_uring::{opcode, squeue, types};

use super::{Finished, Handover, Op};
use crate::wire::relay::{resize_read, BackendSide, ClientSide, RelayEnd, Replies, FIRST_READ};

/// One direction. Its buffer holds what the last receive got until the
/// send of it completes; the send and the next receive go to the kernel
/// together, linked, so one `io_uring_enter` per chunk moves it on and
/// waits for the next. At most those two operations are in flight.
struct Pipe {
    buf: Vec<u8>,
    len: usize,
    /// The operations in flight: the send, then the receive.
    ops: [Option<Op>; 2],
}

/// IORING_RECVSEND_POLL_FIRST: wait for data before trying the receive.
/// Relayed traffic is request and reply, so the next chunk is almost never
/// there yet when its receive is queued; trying first would fail every time.
const POLL_FIRST: u16 = 1;

impl Pipe {
    fn new() -> Pipe {
        Pipe {
            buf: vec![0; FIRST_READ],
            len: 0,
            ops: [None, None],
        }
    }

    fn recv(&mut self, op: Op, id: u64, fd: RawFd) -> squeue::Entry {
        self.ops[1] = Some(op);
        opcode::Recv::new(types::Fd(fd), self.buf.as_mut_ptr(), self.buf.len() as u32)
            .ioprio(POLL_FIRST)
            .build()
            .user_data(op.data(id))
    }

    /// A receive got `n` bytes. The buffer's next size is chosen now, while
    /// nothing is in flight on it (growing or shrinking copies the chunk).
    fn received(&mut self, n: usize) {
        self.len = n;
        if let Some(size) = resize_read(n, self.buf.len()) {
            let mut next = vec![0; size];
            next[..n].copy_from_slice(&self.buf[..n]);
            self.buf = next;
        }
    }

    /// Queues the send of the chunk received, whole (MSG_WAITALL: the
    /// kernel retries short sends), linked to the next receive if `then`.
    fn send(
        &mut self,
        op: Op,
        (id, fd): (u64, RawFd),
        then: Option<(Op, RawFd)>,
        q: &mut Vec<squeue::Entry>,
    ) {
        self.ops = [Some(op), None];
        let chunk = &self.buf[..self.len];
        let send = opcode::Send::new(types::Fd(fd), chunk.as_ptr(), chunk.len() as u32)
            .flags(libc::MSG_WAITALL)
            .build()
            .user_data(op.data(id));
        match then {
            None => q.push(send),
            Some((recv, from)) => {
                q.push(send.flags(squeue::Flags::IO_LINK));
                q.push(self.recv(recv, id, from));
            }
        }
    }

    /// `op` completed; true if a send moved the whole chunk.
    fn completed(&mut self, op: Op, res: i32) -> bool {
        for slot in &mut self.ops {
            if *slot == Some(op) {
                *slot = None;
            }
        }
        usize::try_from(res).is_ok_and(|n| n == self.len)
    }

    /// Only the receive is in flight: nothing of this direction is on its way.
    fn receiving_only(&self) -> bool {
        matches!(self.ops, [None, Some(_)])
    }

    fn idle(&self) -> bool {
        self.ops == [None, None]
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
        let whole = match op {
            Op::FromClient | Op::ToBackend => self.up.completed(op, res),
            _ => self.down.completed(op, res),
        };
        if self.end.is_none() {
            self.advance(op, res, whole, q);
        } else if whole && matches!(op, Op::ToBackend | Op::ToClient) {
            // The send completed after the session ended, so its linked
            // receive has started since it was cancelled: cancel it again.
            self.cancel_in_flight(q);
        }
        self.end.is_some() && self.up.idle() && self.down.idle()
    }

    fn advance(&mut self, op: Op, res: i32, whole: bool, q: &mut Vec<squeue::Entry>) {
        let (id, client, backend) = self.ids();
        // A receive's count; 0 at the end of the stream or on an error
        // (a receive cancelled because its linked send failed included).
        let n = usize::try_from(res).unwrap_or(0);
        match op {
            Op::FromClient if n == 0 => self.finish(RelayEnd::ClientClosed, q),
            Op::FromClient => {
                let parts = &mut self.h.parts;
                let chunk = &self.up.buf[..n];
                match self
                    .client_side
                    .scan(chunk, &parts.state, &mut parts.statements)
                {
                    Err(e) => self.finish(e.into(), q),
                    Ok(terminate) => {
                        self.terminate = terminate;
                        self.up.received(n);
                        let then = (!terminate).then_some((Op::FromClient, client));
                        self.up.send(Op::ToBackend, (id, backend), then, q);
                    }
                }
            }
            Op::ToBackend if !whole || self.terminate => self.finish(RelayEnd::ClientClosed, q),
            Op::FromBackend if n == 0 => self.finish(RelayEnd::BackendClosed, q),
            Op::FromBackend => match self.backend_side.scan(&self.down.buf[..n]) {
                Err(_) => self.finish(RelayEnd::BackendClosed, q),
                Ok(replies) => {
                    self.replies = replies;
                    self.down.received(n);
                    let then = Some((Op::FromBackend, backend));
                    self.down.send(Op::ToClient, (id, client), then, q);
                }
            },
            Op::ToClient if !whole => self.finish(RelayEnd::BackendClosed, q),
            Op::ToClient => {
                self.h
                    .parts
                    .state
                    .delivered(std::mem::take(&mut self.replies));
                if self.draining && self.h.parts.state.is_idle() {
                    self.finish(RelayEnd::Drained, q);
                }
            }
            // A whole send to the backend: the linked receive is waiting.
            Op::ToBackend | Op::Wake | Op::Cancel => {}
        }
    }

    /// Drain reached the session: it ends as soon as it is idle, which may be now.
    pub(super) fn drain(&mut self, q: &mut Vec<squeue::Entry>) {
        self.draining = true;
        if self.down.receiving_only() && self.h.parts.state.is_idle() {
            self.finish(RelayEnd::Drained, q);
        }
    }

    /// Ends the session (the first reason wins) and cancels what is in flight.
    pub(super) fn finish(&mut self, end: RelayEnd, q: &mut Vec<squeue::Entry>) {
        if self.end.is_some() {
            return;
        }
        self.end = Some(end);
        self.cancel_in_flight(q);
    }

    /// Cancels every operation in flight, each send before the receive
    /// linked to it: cancelling a send also cancels what is linked to it.
    fn cancel_in_flight(&mut self, q: &mut Vec<squeue::Entry>) {
        let id = self.h.id;
        for op in self.up.ops.into_iter().chain(self.down.ops).flatten() {
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
