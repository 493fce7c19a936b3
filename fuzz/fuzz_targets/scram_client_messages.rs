//! SCRAM client-first and client-final messages from an unauthenticated client.
#![no_main]
use libfuzzer_sys::fuzz_target;
use meridian::wire::scram::{ServerFirst, Verifier};

fuzz_target!(|data: &[u8]| {
    let split = data.iter().position(|&b| b == 0xff).unwrap_or(data.len());
    let (first, last) = data.split_at(split);
    let verifier = Verifier::from_password("fuzz", b"0123456789abcdef", 1);
    if let Ok(state) = ServerFirst::new(verifier, first) {
        let _ = state.finish(last.get(1..).unwrap_or_default());
    }
});
