//! SCRAM client-first and client-final messages from an unauthenticated client.
#![no_main]
use libfuzzer_sys::fuzz_target;
use meridian::wire::scram::{ServerFirst, Verifier};

fuzz_target!(|data: &[u8]| {
    // The first byte picks the mechanism; then client-first, 0xff, client-final.
    let Some((&pick, data)) = data.split_first() else { return };
    let (mechanism, binding): (&[u8], Option<&[u8]>) = match pick % 3 {
        0 => (b"SCRAM-SHA-256", None),
        1 => (b"SCRAM-SHA-256", Some(b"end point")),
        _ => (b"SCRAM-SHA-256-PLUS", Some(b"end point")),
    };
    let split = data.iter().position(|&b| b == 0xff).unwrap_or(data.len());
    let (first, last) = data.split_at(split);
    let verifier = Verifier::from_password("fuzz", b"0123456789abcdef", 1);
    if let Ok(state) = ServerFirst::new(verifier, mechanism, first, binding) {
        let _ = state.finish(last.get(1..).unwrap_or_default());
    }
});
