//! The peer protocol's decoder (a frame from another region, after the
//! length prefix): any bytes give a message or an error, never a panic; a
//! decoded message encodes and decodes to itself.

#![no_main]

use libfuzzer_sys::fuzz_target;
use meridian::replication::protocol::Message;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = Message::decode(data) {
        let again = Message::decode(&m.encode()).expect("re-decodes");
        assert_eq!(again, m);
    }
});
