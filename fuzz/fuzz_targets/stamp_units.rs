//! The write path's view of a session: arbitrary client messages go through
//! statement tracking and stamp injection, arbitrary backend replies through
//! the reply tracker. Nothing may panic, whatever the order or content, and
//! every injected byte must itself be well-formed frontend messages.
#![no_main]
use std::collections::VecDeque;
use std::sync::Arc;

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use meridian::clock::{Clock, DEFAULT_MAX_DRIFT};
use meridian::sql::{ClassifierCache, StatementCounts, StatementTracker};
use meridian::wire::frame::{self, Direction, FrameScanner};
use meridian::wire::stamp::{Injector, ReadyLog, ReplyTracker};

struct Log(u64, u64, Option<u32>);

impl ReadyLog for Log {
    fn ready_count(&self) -> u64 {
        self.0
    }
    fn last_closed(&self) -> u64 {
        self.1
    }
    fn statement_ready(&self) -> Option<u32> {
        self.2
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let log = Log(data[0].into(), data[1].into(), (data[2] & 1 == 1).then_some(0));
    let cut = (data[3] as usize).min(data.len() - 4);
    let (client, backend) = data[4..].split_at(cut);
    let mut statements = StatementTracker::new(
        Arc::new(ClassifierCache::new(16)),
        Arc::new(StatementCounts::default()),
    );
    let mut injector = Injector::new(Some(Arc::new(Clock::start(0, DEFAULT_MAX_DRIFT))));
    let mut units = VecDeque::new();
    let mut out = BytesMut::new();
    let mut scanner = FrameScanner::new(Direction::Frontend, 1 << 16, frame::capture_statements);
    let _ = scanner.scan(client, |m| {
        injector.on_message(m.tag, m.body.unwrap_or_default(), &mut statements, &log, &mut out, &mut units);
    });
    let mut check = FrameScanner::new(Direction::Frontend, 1 << 16, frame::capture_none);
    check.scan(&out, |_| {}).expect("injected bytes are valid messages");
    assert!(check.at_boundary());
    let mut replies = ReplyTracker::default();
    for pair in backend.chunks(2) {
        let body: &[u8] = if pair.len() > 1 { &pair[1..] } else { b"" };
        let _ = replies.on_reply(&mut units, pair[0], Some(body));
        let _ = replies.front_is_ours(&mut units);
    }
});
