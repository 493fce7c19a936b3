//! A pgoutput message as the capture slot delivers it: decoding must never
//! panic, whatever the bytes, and a decoded row never has more values than
//! the message had bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use meridian::capture::pgoutput::{decode, Message};

fuzz_target!(|data: &[u8]| {
    let bytes = bytes::Bytes::copy_from_slice(data);
    if let Ok(Message::Insert { new, .. } | Message::Update { new, .. }) = decode(&bytes) {
        assert!(new.len() <= data.len());
    }
});
