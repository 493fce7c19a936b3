//! Bytes as the relay reads them, cut at an arbitrary point, through both
//! of its sides (what the client sends, what the backend sends): neither
//! may panic, and each must reach the same conclusions however the bytes
//! are cut (requests counted, statements classed, ReadyForQuery seen).
#![no_main]
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use meridian::sql::{StatementCounts, StatementTracker};
use meridian::wire::relay::{BackendSide, ClientSide, Replies, SessionState};

type ClientView = (i64, [(&'static str, u64); 6]);

fn client(chunks: &[&[u8]]) -> Option<ClientView> {
    let counts = Arc::new(StatementCounts::default());
    let mut tracker = StatementTracker::new(counts.clone());
    let state = SessionState::new(b'I');
    let mut side = ClientSide::new(1 << 16);
    for c in chunks {
        side.scan(c, &state, &mut tracker).ok()?;
    }
    Some((state.outstanding(), counts.snapshot()))
}

fn backend(chunks: &[&[u8]]) -> Option<(i64, Option<u8>)> {
    let mut side = BackendSide::new();
    let (mut ready, mut status) = (0, None);
    for c in chunks {
        let r: Replies = side.scan(c).ok()?;
        let (n, s) = r.parts();
        ready += n;
        status = s.or(status);
    }
    Some((ready, status))
}

fuzz_target!(|data: &[u8]| {
    if data.is_empty() {
        return;
    }
    let body = &data[1..];
    let cut = (data[0] as usize).min(body.len());
    let pieces: [&[u8]; 2] = [&body[..cut], &body[cut..]];
    if let (Some(whole), Some(split)) = (client(&[body]), client(&pieces)) {
        assert_eq!(whole, split);
    }
    if let (Some(whole), Some(split)) = (backend(&[body]), backend(&pieces)) {
        assert_eq!(whole, split);
    }
});
