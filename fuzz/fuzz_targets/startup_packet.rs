//! The first packet of a connection, as read off the network.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = meridian::wire::startup::parse_first_packet(data);
});
