//! The relay thread's loop: submit what is queued and wait for at least one
//! completion in one system call, then hand each completion to its session,
//! and take commands whenever the wake-up descriptor is read.

use std::collections::HashMap;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use io_uring::{opcode, squeue, types, IoUring};

use super::live::Live;
use super::{Command, Finished, Op, Shared};
use crate::wire::relay::RelayEnd;

pub(super) struct Worker {
    /// Declared first so it drops first: no operation outlives the buffers below.
    ring: IoUring,
    shared: Arc<Shared>,
    wake_buf: Box<[u8; 8]>,
    lives: HashMap<u64, Live>,
    /// Entries to submit on the next turn (the submission queue may be full).
    queue: Vec<squeue::Entry>,
    completions: Vec<(u64, i32)>,
    quitting: bool,
}

impl Worker {
    pub(super) fn new(ring: IoUring, shared: Arc<Shared>) -> Worker {
        Worker {
            ring,
            shared,
            wake_buf: Box::new([0; 8]),
            lives: HashMap::new(),
            queue: Vec::new(),
            completions: Vec::new(),
            quitting: false,
        }
    }

    pub(super) fn run(mut self) {
        self.arm_wake();
        // The wake-up read is re-armed after each command batch except Quit's,
        // so once quitting nothing is in flight when the last session ends.
        while !(self.quitting && self.lives.is_empty()) {
            if let Err(e) = self.submit_and_wait() {
                tracing::error!(error = %e, "relay thread: io_uring failed; its sessions are closed");
                break;
            }
            self.completions.clear();
            self.completions
                .extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
            for i in 0..self.completions.len() {
                let (data, res) = self.completions[i];
                self.complete(data, res);
            }
        }
    }

    fn arm_wake(&mut self) {
        let read = opcode::Read::new(
            types::Fd(self.shared.wake.as_raw_fd()),
            self.wake_buf.as_mut_ptr(),
            8,
        );
        self.queue.push(read.build().user_data(Op::Wake.data(0)));
    }

    fn submit_and_wait(&mut self) -> io::Result<()> {
        let mut pushed = 0;
        loop {
            {
                let mut sq = self.ring.submission();
                for entry in &self.queue[pushed..] {
                    // SAFETY: every entry points into a buffer owned by a
                    // live session (or wake_buf), freed only once its
                    // operation has completed.
                    if unsafe { sq.push(entry) }.is_err() {
                        break;
                    }
                    pushed += 1;
                }
            }
            if pushed == self.queue.len() {
                self.queue.clear();
                break;
            }
            self.ring.submit()?;
        }
        match self.ring.submit_and_wait(1) {
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EBUSY)) => Ok(()),
            other => other.map(|_| ()),
        }
    }

    fn complete(&mut self, data: u64, res: i32) {
        match Op::decode(data) {
            (_, Some(Op::Wake)) => {
                self.commands();
                if !self.quitting {
                    self.arm_wake();
                }
            }
            (_, Some(Op::Cancel) | None) => {}
            (id, Some(op)) => {
                let Some(live) = self.lives.get_mut(&id) else {
                    return;
                };
                if live.complete(op, res, &mut self.queue) {
                    if let Some(live) = self.lives.remove(&id) {
                        live.hand_back();
                    }
                }
            }
        }
    }

    fn commands(&mut self) {
        let batch = {
            let mut guard = self
                .shared
                .commands
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            guard.as_mut().map(std::mem::take).unwrap_or_default()
        };
        for command in batch {
            match command {
                Command::Start(h) if self.quitting => {
                    let _ = h.done.send(Finished {
                        end: RelayEnd::Aborted,
                        client: h.client,
                        backend: h.backend,
                    });
                }
                Command::Start(h) => {
                    let id = h.id;
                    let live = Live::start(*h, &mut self.queue);
                    self.lives.insert(id, live);
                }
                Command::Drain(id) => {
                    if let Some(live) = self.lives.get_mut(&id) {
                        live.drain(&mut self.queue);
                    }
                }
                Command::Abort(id) => {
                    if let Some(live) = self.lives.get_mut(&id) {
                        live.finish(RelayEnd::Aborted, &mut self.queue);
                    }
                }
                Command::Quit => {
                    self.quitting = true;
                    for live in self.lives.values_mut() {
                        live.finish(RelayEnd::Aborted, &mut self.queue);
                    }
                }
            }
        }
    }
}

impl Drop for Worker {
    /// Closes the command queue (its sessions are dropped, and their tasks
    /// see the thread gone). After a panic or a ring failure operations may
    /// still be in flight: their buffers are leaked rather than freed under
    /// the kernel.
    fn drop(&mut self) {
        let mut guard = self
            .shared
            .commands
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        guard.take();
        drop(guard);
        if !self.lives.is_empty() || !self.quitting {
            std::mem::forget(std::mem::take(&mut self.lives));
            std::mem::forget(std::mem::replace(&mut self.wake_buf, Box::new([0; 8])));
        }
    }
}
