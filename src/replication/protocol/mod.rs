//! The peer protocol: length-prefixed messages (at most [`MAX_FRAME`]
//! bytes each; shippers aim for 8 MiB) over TCP. Batches, nearly all the
//! bytes, are binary ([`binary`]); the other messages are JSON, so that
//! every version can read a handshake and refuse a peer it does not speak.
//!
//! ```text
//! receiver -> shipper   Challenge { version, region, nonce }
//! shipper  -> receiver  Hello { version, origin, via, proof = HMAC-SHA256(secret, nonce || origin) }
//! receiver -> shipper   Welcome { position }            (or Refused { reason }, then close)
//! shipper  -> receiver  Batch { after, changes, deps, floor, caught_up } (in capture order, after position)
//! receiver -> shipper   Ack { position, applied, older, held, duplicate }
//! shipper  -> receiver  Floor { hlc, caught_up }        (when idle, about once a second; no reply)
//! receiver -> relayer   Have { position, direct }       (relay links only, when either changes)
//! ```
//!
//! A relay link (`via` set: region `via` ships region `origin`'s changes it
//! has applied, see `replication::relay`) carries the same batches; its
//! receiver tells the relayer how far it has applied the origin and whether
//! it has a live link from the origin itself (then nothing is relayed).
//!
//! A floor is the origin's promise that every change it ships from then on
//! has a row version above it; receivers use it to forget tombstones.
//!
//! The receiver speaks first, so a connection that never proves it knows the
//! cluster secret gets nothing but a nonce. The version lets a build refuse
//! (rather than misread) a peer of another: during an upgrade, regions of
//! the old and the new version do not exchange changes (each keeps its
//! changes for the other, and says why in its log and `/metrics`) until
//! all run the new one.

pub mod binary;

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use tokio_util::codec::LengthDelimitedCodec;

pub use crate::capture::reader::{Change, Deps, Operation, OriginPosition, Position};

/// Protocol version spoken by this build (4: binary batches, row images;
/// 5: dependencies per capture transaction; 6: relay links, the position a
/// batch follows).
pub const VERSION: u32 = 6;
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
        /// Whose changes the connection carries.
        origin: u16,
        /// Set on a relay link: the region that relays them. (The proof
        /// covers the origin only: any holder of the cluster secret may
        /// ship any region's changes, so this names, it does not prove.)
        #[serde(default, skip_serializing_if = "Option::is_none")]
        via: Option<u16>,
        proof: String,
    },
    Welcome {
        position: Position,
    },
    Refused {
        reason: String,
    },
    /// Binary on the wire (see [`binary`]), never JSON.
    #[serde(skip)]
    Batch {
        /// The position in the origin's stream right before the first
        /// change: a receiver that has applied less refuses the batch
        /// rather than skip what lies between.
        after: Position,
        changes: Vec<Change>,
        /// The causal dependencies of the batch's capture transactions
        /// (those that have any), in order: a receiver applies a change only
        /// once it has applied, of every third region, as much as its
        /// transaction's entry asks for (and a transaction without an entry
        /// depends on nothing).
        deps: Vec<Deps>,
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
    /// On a relay link: how far the receiver has applied the origin, and
    /// whether a link from the origin itself is up there.
    Have {
        position: Position,
        direct: bool,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("connection closed")]
    Closed,
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("malformed message: {0}")]
    Malformed(#[from] serde_json::Error),
    #[error("malformed batch: {0}")]
    Batch(String),
    #[error("unexpected message: expected {expected}, got {got}")]
    Unexpected { expected: &'static str, got: String },
    #[error("refused by peer: {0}")]
    Refused(String),
}

impl Message {
    pub fn encode(&self) -> bytes::Bytes {
        match self {
            Message::Batch {
                after,
                changes,
                deps,
                floor,
                caught_up,
            } => binary::encode(*after, changes, deps, *floor, *caught_up).into(),
            m => serde_json::to_vec(m)
                .expect("messages always serialise")
                .into(),
        }
    }

    pub fn decode(frame: &[u8]) -> Result<Message, ProtocolError> {
        if frame.first() == Some(&binary::MARK) {
            return binary::decode(frame);
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
            Message::Have { .. } => "Have",
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
    use crate::capture::image::Image;
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
        assert!(Message::decode(b"\xff\x00").is_err());
    }

    #[test]
    fn batches_are_binary_only() {
        // A version 3 peer's JSON batch is not read as one.
        assert!(Message::decode(br#"{"type":"Batch","changes":[]}"#).is_err());
        let m = Message::Batch {
            after: Position { xid: 7, seq: 3 },
            changes: Vec::new(),
            deps: Vec::new(),
            floor: None,
            caught_up: None,
        };
        let frame = m.encode();
        assert_eq!(frame.first(), Some(&binary::MARK));
        assert_eq!(Message::decode(&frame).unwrap(), m);
    }

    fn image(v: serde_json::Value) -> Image {
        Image::from_value(&v).expect("an object")
    }

    fn any_change() -> impl Strategy<Value = Change> {
        let op = prop_oneof![
            Just(Operation::Insert),
            Just(Operation::Update),
            Just(Operation::Delete),
            Just(Operation::Truncate),
            Just(Operation::Schema),
        ];
        let numbers = (any::<u64>(), any::<i64>(), any::<i64>(), any::<i64>());
        let options = (
            proptest::option::of(any::<i64>()),
            proptest::option::of(any::<i32>()),
            proptest::option::of(any::<i32>()),
            proptest::option::of(any::<i32>()),
            proptest::option::of(any::<i64>()),
            proptest::option::of(any::<i32>()),
        );
        let images = (
            proptest::option::of(any::<i32>()),
            proptest::option::of(".{0,10}"),
            proptest::option::of(any::<bool>()),
            proptest::option::of(any::<i64>()),
        );
        (numbers, "[a-z_.]{1,12}", op, options, images).prop_map(
            |((xid, seq, hlc, tx_hlc), tbl, op, o, (pk, text, old, cols))| Change {
                xid,
                seq,
                origin: 0,
                via_proxy: false,
                hlc,
                tx_hlc,
                tbl,
                op,
                pk: pk.map(|v| image(serde_json::json!({ "id": v }))),
                row: text
                    .map(|t| image(serde_json::json!({ "t": t, "n": 1.5, "j": [1, {"a": null}] }))),
                old: old.map(|b| image(serde_json::json!({ "b": b }))),
                base_hlc: o.0,
                base_origin: o.1,
                epoch: o.2,
                gen: o.3,
                tag_hlc: o.4,
                tag_origin: o.5,
                cols: cols.map(|h| image(serde_json::json!({ "t": [h, 2] }))),
            },
        )
    }

    proptest! {
        #[test]
        fn batches_round_trip(
            changes in proptest::collection::vec(any_change(), 0..6),
            deps in proptest::collection::vec(
                (any::<u64>(), proptest::collection::vec((any::<u16>(), any::<u64>(), any::<i64>()), 0..3)),
                0..3,
            ),
            floor in proptest::option::of(any::<i64>()),
            caught_up in proptest::option::of(any::<i64>()),
            (xid, seq) in (any::<u64>(), any::<i64>()),
        ) {
            let deps = deps.into_iter()
                .map(|(xid, after)| Deps {
                    xid,
                    after: after.into_iter()
                        .map(|(origin, xid, seq)| OriginPosition { origin, position: Position { xid, seq } })
                        .collect(),
                })
                .collect();
            let m = Message::Batch { after: Position { xid, seq }, changes, deps, floor, caught_up };
            let frame = m.encode();
            prop_assert_eq!(Message::decode(&frame).unwrap(), m);
            // Every cut of a frame is refused, not misread.
            for cut in 0..frame.len() {
                prop_assert!(Message::decode(&frame[..cut]).is_err());
            }
        }

        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = Message::decode(&bytes);
            let mut marked = vec![binary::MARK];
            marked.extend(&bytes);
            let _ = Message::decode(&marked);
        }
    }
}
