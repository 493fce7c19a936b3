//! Decoding the row messages of Postgres' `pgoutput` plugin (protocol 1).
//!
//! The replication connection itself (startup, auth, `START_REPLICATION`,
//! keepalives, standby status) is pgwire-replication's; it hands Begin,
//! Commit and logical messages over already parsed and every other pgoutput
//! message as bytes. Those are decoded here, by hand: no maintained crate
//! decodes pgoutput's row messages without also owning the connection, and
//! the format is small and fixed (Postgres docs, "Logical Replication
//! Message Formats"). Every length is checked against what is left, so a
//! malformed message is an error, never a panic (fuzzed: `fuzz/`).

use bytes::Bytes;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("pgoutput message truncated: {0}")]
    Truncated(&'static str),
    #[error("pgoutput message with unknown tag {0:?}")]
    UnknownTag(char),
    #[error("pgoutput {0} has an unexpected marker {1:?}")]
    Marker(&'static str, char),
    #[error("pgoutput string is not UTF-8")]
    NotUtf8,
    #[error("pgoutput change of relation {0} before its description")]
    UnknownRelation(u32),
}

/// One column of a relation as pgoutput describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// Part of the replica identity (the key, or every column for FULL).
    pub key: bool,
    pub name: String,
    pub type_oid: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    pub oid: u32,
    pub schema: String,
    pub name: String,
    /// `d` default, `n` nothing, `f` full, `i` index.
    pub identity: u8,
    pub columns: Vec<Column>,
}

/// One column value of a row image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Null,
    /// A TOASTed value the update did not change; pgoutput leaves it out.
    Unchanged,
    Text(Bytes),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Relation(Relation),
    /// A type's name, sent before a relation that uses a non-built-in type.
    Type {
        oid: u32,
    },
    Insert {
        rel: u32,
        new: Vec<Value>,
    },
    /// `old` is the replica identity's image (key or full row) when sent.
    Update {
        rel: u32,
        old: Option<Vec<Value>>,
        new: Vec<Value>,
    },
    Delete {
        rel: u32,
        old: Vec<Value>,
    },
    Truncate {
        rels: Vec<u32>,
        cascade: bool,
        restart_identity: bool,
    },
    /// The transaction was replayed by a replication origin (`name`).
    Origin {
        name: String,
    },
}

/// A cursor over one message's bytes.
struct Cursor<'a> {
    rest: &'a [u8],
    whole: &'a Bytes,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        if self.rest.len() < n {
            return Err(DecodeError::Truncated(what));
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }
    fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &'static str) -> Result<u16, DecodeError> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        let b = self.take(4, what)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn cstr(&mut self, what: &'static str) -> Result<String, DecodeError> {
        let end = self
            .rest
            .iter()
            .position(|&b| b == 0)
            .ok_or(DecodeError::Truncated(what))?;
        let s = std::str::from_utf8(&self.rest[..end]).map_err(|_| DecodeError::NotUtf8)?;
        self.rest = &self.rest[end + 1..];
        Ok(s.to_string())
    }
    /// A slice of the message as a shared `Bytes` (no copy).
    fn bytes(&mut self, n: usize, what: &'static str) -> Result<Bytes, DecodeError> {
        let start = self.whole.len() - self.rest.len();
        self.take(n, what)?;
        Ok(self.whole.slice(start..start + n))
    }
    fn tuple(&mut self) -> Result<Vec<Value>, DecodeError> {
        let n = self.u16("tuple column count")?;
        // Each column takes at least one byte: bound the allocation by that.
        let mut values = Vec::with_capacity(usize::from(n).min(self.rest.len()));
        for _ in 0..n {
            values.push(match self.u8("tuple column kind")? {
                b'n' => Value::Null,
                b'u' => Value::Unchanged,
                b't' | b'b' => {
                    let len = self.u32("tuple value length")? as usize;
                    Value::Text(self.bytes(len, "tuple value")?)
                }
                other => return Err(DecodeError::Marker("tuple column", other as char)),
            });
        }
        Ok(values)
    }
}

/// Decodes one pgoutput message (the XLogData payload).
pub fn decode(data: &Bytes) -> Result<Message, DecodeError> {
    let mut c = Cursor {
        rest: data,
        whole: data,
    };
    Ok(match c.u8("tag")? {
        b'R' => {
            let oid = c.u32("relation oid")?;
            let schema = c.cstr("relation schema")?;
            let name = c.cstr("relation name")?;
            let identity = c.u8("replica identity")?;
            let n = c.u16("column count")?;
            let mut columns = Vec::with_capacity(usize::from(n).min(c.rest.len()));
            for _ in 0..n {
                let flags = c.u8("column flags")?;
                let name = c.cstr("column name")?;
                let type_oid = c.u32("column type")?;
                c.u32("column typmod")?;
                columns.push(Column {
                    key: flags & 1 == 1,
                    name,
                    type_oid,
                });
            }
            Message::Relation(Relation {
                oid,
                schema,
                name,
                identity,
                columns,
            })
        }
        b'Y' => {
            let oid = c.u32("type oid")?;
            c.cstr("type schema")?;
            c.cstr("type name")?;
            Message::Type { oid }
        }
        b'I' => {
            let rel = c.u32("insert relation")?;
            match c.u8("insert marker")? {
                b'N' => Message::Insert {
                    rel,
                    new: c.tuple()?,
                },
                other => return Err(DecodeError::Marker("insert", other as char)),
            }
        }
        b'U' => {
            let rel = c.u32("update relation")?;
            let (old, new) = match c.u8("update marker")? {
                b'K' | b'O' => {
                    let old = c.tuple()?;
                    match c.u8("update new marker")? {
                        b'N' => (Some(old), c.tuple()?),
                        other => return Err(DecodeError::Marker("update", other as char)),
                    }
                }
                b'N' => (None, c.tuple()?),
                other => return Err(DecodeError::Marker("update", other as char)),
            };
            Message::Update { rel, old, new }
        }
        b'D' => {
            let rel = c.u32("delete relation")?;
            match c.u8("delete marker")? {
                b'K' | b'O' => Message::Delete {
                    rel,
                    old: c.tuple()?,
                },
                other => return Err(DecodeError::Marker("delete", other as char)),
            }
        }
        b'T' => {
            let n = c.u32("truncate count")?;
            let options = c.u8("truncate options")?;
            let mut rels = Vec::with_capacity((n as usize).min(c.rest.len() / 4));
            for _ in 0..n {
                rels.push(c.u32("truncate relation")?);
            }
            Message::Truncate {
                rels,
                cascade: options & 1 == 1,
                restart_identity: options & 2 == 2,
            }
        }
        b'O' => {
            c.take(8, "origin lsn")?;
            Message::Origin {
                name: c.cstr("origin name")?,
            }
        }
        other => return Err(DecodeError::UnknownTag(other as char)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn tuple(values: &[Option<&str>]) -> Vec<u8> {
        let mut out = (values.len() as u16).to_be_bytes().to_vec();
        for v in values {
            match v {
                None => out.push(b'n'),
                Some(t) => {
                    out.push(b't');
                    out.extend((t.len() as u32).to_be_bytes());
                    out.extend(t.as_bytes());
                }
            }
        }
        out
    }

    #[test]
    fn a_relation_and_its_rows_decode() {
        let mut rel = vec![b'R'];
        rel.extend(16384u32.to_be_bytes());
        rel.extend(b"public\0kv\0f");
        rel.extend(2u16.to_be_bytes());
        for (flags, name, ty) in [(1u8, "k", 23u32), (0, "v", 25)] {
            rel.push(flags);
            rel.extend(name.as_bytes());
            rel.push(0);
            rel.extend(ty.to_be_bytes());
            rel.extend((-1i32).to_be_bytes());
        }
        let Message::Relation(r) = decode(&Bytes::from(rel)).unwrap() else {
            panic!()
        };
        assert_eq!(
            (r.schema.as_str(), r.name.as_str(), r.identity),
            ("public", "kv", b'f')
        );
        assert!(r.columns[0].key);
        assert_eq!(r.columns[1].type_oid, 25);

        let mut upd = vec![b'U'];
        upd.extend(16384u32.to_be_bytes());
        upd.push(b'O');
        upd.extend(tuple(&[Some("1"), Some("old")]));
        upd.push(b'N');
        upd.extend(tuple(&[Some("1"), None]));
        let m = decode(&Bytes::from(upd)).unwrap();
        assert_eq!(
            m,
            Message::Update {
                rel: 16384,
                old: Some(vec![
                    Value::Text(Bytes::from_static(b"1")),
                    Value::Text(Bytes::from_static(b"old"))
                ]),
                new: vec![Value::Text(Bytes::from_static(b"1")), Value::Null],
            }
        );
    }

    #[test]
    fn a_truncated_value_is_an_error() {
        let mut ins = vec![b'I'];
        ins.extend(1u32.to_be_bytes());
        ins.push(b'N');
        ins.extend(1u16.to_be_bytes());
        ins.push(b't');
        ins.extend(100u32.to_be_bytes());
        ins.extend(b"short");
        assert_eq!(
            decode(&Bytes::from(ins)),
            Err(DecodeError::Truncated("tuple value"))
        );
    }

    proptest! {
        #[test]
        fn any_bytes_decode_or_fail_without_panicking(data in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(&Bytes::from(data));
        }

        #[test]
        fn an_insert_round_trips(values in proptest::collection::vec(proptest::option::of("[a-z0-9 ]{0,12}"), 0..8)) {
            let refs: Vec<Option<&str>> = values.iter().map(|v| v.as_deref()).collect();
            let mut ins = vec![b'I'];
            ins.extend(7u32.to_be_bytes());
            ins.push(b'N');
            ins.extend(tuple(&refs));
            let Message::Insert { rel, new } = decode(&Bytes::from(ins)).unwrap() else { panic!() };
            prop_assert_eq!(rel, 7);
            let back: Vec<Option<String>> = new.iter().map(|v| match v {
                Value::Text(b) => Some(String::from_utf8(b.to_vec()).unwrap()),
                _ => None,
            }).collect();
            prop_assert_eq!(back, values);
        }
    }
}
