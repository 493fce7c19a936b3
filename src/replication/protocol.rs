//! The peer protocol: length-prefixed JSON messages (at most
//! [`MAX_FRAME`] bytes each; shippers aim for 8 MiB) over TCP.
//!
//! ```text
//! receiver -> shipper   Challenge { version, region, nonce }
//! shipper  -> receiver  Hello { version, origin, proof = HMAC-SHA256(secret, nonce || origin) }
//! receiver -> shipper   Welcome { position }            (or Refused { reason }, then close)
//! shipper  -> receiver  Batch { changes, after, floor, caught_up } (in capture order, after position)
//! receiver -> shipper   Ack { position, applied, older, held, duplicate }
//! shipper  -> receiver  Floor { hlc, caught_up }        (when idle, about once a second; no reply)
//! ```
//!
//! A floor is the origin's promise that every change it ships from then on
//! has a row version above it; receivers use it to forget tombstones.
//!
//! The receiver speaks first, so a connection that never proves it knows the
//! cluster secret gets nothing but a nonce. The version lets a later build
//! refuse (rather than misread) an older peer.

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use tokio_util::codec::LengthDelimitedCodec;

pub use crate::capture::reader::{Change, Operation, Position};

/// Protocol version spoken by this build.
pub const VERSION: u32 = 3;
/// Largest message, either way.
pub const MAX_FRAME: usize = 64 << 20;

pub fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .max_frame_length(MAX_FRAME)
        .new_codec()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", deny_unknown_fields)]
pub enum Message {
    Challenge {
        version: u32,
        region: u16,
        nonce: String,
    },
    Hello {
        version: u32,
        origin: u16,
        proof: String,
    },
    Welcome {
        position: Position,
    },
    Refused {
        reason: String,
    },
    Batch {
        changes: Vec<Change>,
        /// How far the origin had applied each other region when it read the
        /// batch: the receiver applies the batch only once it has applied at
        /// least as much of each (causal order).
        #[serde(default)]
        after: Vec<OriginPosition>,
        /// Set when the batch reaches the end of what the origin had
        /// committed: every later change has a row version above it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        floor: Option<i64>,
        /// Set when the read reached the end of what the origin had
        /// committed: the origin's wall clock (ms since the epoch) just
        /// before the read. A receiver that has applied it was caught up
        /// with the origin as of then (replication lag).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        caught_up: Option<i64>,
    },
    Floor {
        hlc: i64,
        /// The origin's wall clock (ms) when it found nothing to ship.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        caught_up: Option<i64>,
    },
    Ack {
        position: Position,
        applied: u64,
        older: u64,
        held: u64,
        duplicate: bool,
    },
}

/// [`Message::Batch`] as its own struct, decoded without buffering.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchFrame {
    #[serde(rename = "type")]
    _kind: BatchTag,
    changes: Vec<Change>,
    #[serde(default)]
    after: Vec<OriginPosition>,
    #[serde(default)]
    floor: Option<i64>,
    #[serde(default)]
    caught_up: Option<i64>,
}

#[derive(Deserialize)]
enum BatchTag {
    Batch,
}

/// A position in another origin's change stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OriginPosition {
    pub origin: u16,
    pub position: Position,
}

#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("connection closed")]
    Closed,
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("malformed message: {0}")]
    Malformed(#[from] serde_json::Error),
    #[error("unexpected message: expected {expected}, got {got}")]
    Unexpected { expected: &'static str, got: String },
    #[error("refused by peer: {0}")]
    Refused(String),
}

impl Message {
    pub fn encode(&self) -> bytes::Bytes {
        serde_json::to_vec(self)
            .expect("messages always serialise")
            .into()
    }

    pub fn decode(frame: &[u8]) -> Result<Message, ProtocolError> {
        // Batches (nearly all the bytes) straight into their changes: the
        // derived decoder of a tagged enum first buffers a whole message as
        // serde's `Content` and then decodes that again (a fifth of a
        // receiver's time in a catch-up). The tag is written first.
        if frame.starts_with(br#"{"type":"Batch","#) {
            let b: BatchFrame = serde_json::from_slice(frame)?;
            return Ok(Message::Batch {
                changes: b.changes,
                after: b.after,
                floor: b.floor,
                caught_up: b.caught_up,
            });
        }
        Ok(serde_json::from_slice(frame)?)
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Message::Challenge { .. } => "Challenge",
            Message::Hello { .. } => "Hello",
            Message::Welcome { .. } => "Welcome",
            Message::Refused { .. } => "Refused",
            Message::Batch { .. } => "Batch",
            Message::Ack { .. } => "Ack",
            Message::Floor { .. } => "Floor",
        }
    }
}

/// The proof a shipper gives for `nonce`: hex HMAC-SHA256 over nonce and origin.
pub fn proof(secret: &str, nonce: &str, origin: u16) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(nonce.as_bytes());
    mac.update(&origin.to_be_bytes());
    hex(&mac.finalize().into_bytes())
}

/// Constant-time check of a proof.
pub fn verify(secret: &str, nonce: &str, origin: u16, given: &str) -> bool {
    let Some(bytes) = unhex(given) else {
        return false;
    };
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(nonce.as_bytes());
    mac.update(&origin.to_be_bytes());
    mac.verify_slice(&bytes).is_ok()
}

pub fn nonce() -> String {
    let bytes: [u8; 32] = rand::random();
    hex(&bytes)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn proofs_check_secret_nonce_and_origin() {
        let n = nonce();
        let p = proof("a cluster secret!", &n, 2);
        assert!(verify("a cluster secret!", &n, 2, &p));
        assert!(!verify("another secret!!!", &n, 2, &p));
        assert!(!verify("a cluster secret!", &n, 3, &p));
        assert!(!verify("a cluster secret!", &nonce(), 2, &p));
        assert!(!verify("a cluster secret!", &n, 2, "zz"));
    }

    #[test]
    fn unknown_fields_and_types_are_refused() {
        assert!(Message::decode(br#"{"type":"Welcome","position":{"xid":1,"seq":2}}"#).is_ok());
        assert!(
            Message::decode(br#"{"type":"Welcome","position":{"xid":1,"seq":2},"x":1}"#).is_err()
        );
        assert!(Message::decode(br#"{"type":"Nope"}"#).is_err());
        assert!(Message::decode(br#"{"type":"Batch","changes":[]}"#).is_ok());
        assert!(Message::decode(br#"{"type":"Batch","changes":[],"x":1}"#).is_err());
        assert!(Message::decode(br#"{"type":"Batch","type":"Batch","changes":[]}"#).is_err());
        assert!(Message::decode(b"\xff\x00").is_err());
    }

    proptest! {
        #[test]
        fn messages_round_trip(xid in any::<u64>(), seq in any::<i64>(), hlc in any::<i64>(), tbl in "[a-z_.]{1,20}", v in any::<i32>()) {
            let m = Message::Batch { changes: vec![Change {
                xid, seq, origin: 0, via_proxy: false, hlc, tx_hlc: hlc, tbl, op: Operation::Update,
                pk: Some(serde_json::json!({"id": v})), row: Some(serde_json::json!({"id": v, "t": "x"})), old: None,
                base_hlc: Some(hlc), base_origin: None, epoch: Some(v), gen: Some(v), tag_hlc: Some(hlc), tag_origin: Some(v),
                cols: Some(serde_json::json!({"t": [hlc, v]})),
            }], after: vec![OriginPosition { origin: 3, position: Position { xid, seq } }], floor: Some(hlc),
                caught_up: Some(hlc) };
            let frame = m.encode();
            let tagged_first = frame.starts_with(br#"{"type":"Batch","#);
            prop_assert!(tagged_first);
            // The batch decoder and the derived one agree.
            prop_assert_eq!(serde_json::from_slice::<Message>(&frame).unwrap(), m.clone());
            prop_assert_eq!(Message::decode(&frame).unwrap(), m);
        }

        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = Message::decode(&bytes);
        }
    }
}
