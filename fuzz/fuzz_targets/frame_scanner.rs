//! Client bytes after startup, split at an arbitrary point: the scanner must
//! never panic, and must see the same messages however the input is split.
#![no_main]
use libfuzzer_sys::fuzz_target;
use meridian::wire::frame::{Direction, FrameScanner};

fn run(chunks: &[&[u8]]) -> (Vec<(u8, Option<Vec<u8>>)>, bool) {
    let mut s = FrameScanner::new(Direction::Frontend, 1 << 16, meridian::wire::frame::capture_statements);
    let mut seen = Vec::new();
    for c in chunks {
        if s.scan(c, |m| seen.push((m.tag, m.body.map(<[u8]>::to_vec)))).is_err() {
            return (seen, false);
        }
    }
    (seen, true)
}

fuzz_target!(|data: &[u8]| {
    if data.is_empty() {
        return;
    }
    let cut = data[0] as usize % data.len();
    let body = &data[1..];
    let cut = cut.min(body.len());
    let whole = run(&[body]);
    let split = run(&[&body[..cut], &body[cut..]]);
    if whole.1 && split.1 {
        assert_eq!(whole.0, split.0);
    }
});
