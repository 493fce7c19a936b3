//! Transactions out of the decoded slot stream.
//!
//! pgoutput sends a transaction as Begin, its Relation descriptions (when
//! new or changed), its row changes and Commit; only committed transactions
//! are sent, whole, in commit order. The [`Assembler`] keeps the relation
//! descriptions and collects one transaction's changes; a transaction
//! replayed by a replication origin (meridian's own apply) is dropped.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use pgwire_replication::Lsn;

use super::pgoutput::{self, DecodeError, Message, Relation, Value};
use crate::clock::Clock;

/// 2000-01-01 (Postgres' epoch) in milliseconds since the Unix epoch.
const PG_EPOCH_MS: i64 = 946_684_800_000;

/// One decoded change.
#[derive(Debug, Clone)]
pub enum Decoded {
    Row(DecodedRow),
    Truncate(Vec<Arc<Relation>>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Insert,
    Update,
    Delete,
}

impl Op {
    /// As the capture functions take it (the trigger's `TG_OP`).
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Insert => "INSERT",
            Op::Update => "UPDATE",
            Op::Delete => "DELETE",
        }
    }
}

/// A row change: the relation as described when it was made, and the row's
/// values (new for inserts and updates, old for updates and deletes: the
/// whole old row, since captured tables have REPLICA IDENTITY FULL).
#[derive(Debug, Clone)]
pub struct DecodedRow {
    pub rel: Arc<Relation>,
    pub op: Op,
    pub new: Vec<Value>,
    pub old: Option<Vec<Value>>,
}

impl DecodedRow {
    /// The new row as a JSON object of text values (what
    /// `jsonb_populate_record` reads); `None` for a delete.
    pub fn new_json(&self) -> Option<serde_json::Value> {
        (self.op != Op::Delete).then(|| image(&self.rel, &self.new, self.old.as_deref()))
    }

    pub fn old_json(&self) -> Option<serde_json::Value> {
        self.old.as_deref().map(|old| image(&self.rel, old, None))
    }

    /// The text of column `name` of the new row.
    pub fn new_text(&self, name: &str) -> Option<&[u8]> {
        let i = self.rel.columns.iter().position(|c| c.name == name)?;
        match self.new.get(i) {
            Some(Value::Text(b)) => Some(b),
            _ => None,
        }
    }
}

/// `json` and `jsonb`: `jsonb_populate_record` takes their values as JSON,
/// every other type's as its text form.
const JSON_TYPES: [u32; 2] = [114, 3802];

/// Column name to value. A TOASTed value an update left unchanged is not in
/// the WAL's new row; it is taken from the old row (`fill`).
fn image(rel: &Relation, values: &[Value], fill: Option<&[Value]>) -> serde_json::Value {
    let mut map = serde_json::Map::with_capacity(rel.columns.len());
    for (i, col) in rel.columns.iter().enumerate() {
        let text = |b: &Bytes| {
            JSON_TYPES
                .contains(&col.type_oid)
                .then(|| serde_json::from_slice(b).ok())
                .flatten()
                .unwrap_or_else(|| {
                    serde_json::Value::String(String::from_utf8_lossy(b).into_owned())
                })
        };
        let v = match values.get(i) {
            Some(Value::Text(b)) => text(b),
            Some(Value::Null) => serde_json::Value::Null,
            Some(Value::Unchanged) | None => match fill.and_then(|f| f.get(i)) {
                Some(Value::Text(b)) => text(b),
                Some(Value::Null) => serde_json::Value::Null,
                _ => continue,
            },
        };
        map.insert(col.name.clone(), v);
    }
    serde_json::Value::Object(map)
}

/// A committed transaction (or, for a very large one, a part of it).
#[derive(Debug, Clone)]
pub struct Tx {
    pub commit_lsn: Lsn,
    /// Commit time, milliseconds since the Unix epoch (the origin server's clock).
    pub commit_ms: i64,
    pub end_lsn: Lsn,
    pub changes: Vec<Decoded>,
    /// The transaction's HLC stamp, made by capture in commit order.
    pub stamp: u64,
    /// Changes of this transaction recorded once this part is written.
    pub done_after: u64,
    /// This part ends the transaction.
    pub complete: bool,
}

impl Tx {
    /// The stamp as the capture functions take it.
    pub fn pin(&self) -> String {
        format!("B{}", self.stamp)
    }
}

struct Open {
    commit_lsn: Lsn,
    commit_ms: i64,
    changes: Vec<Decoded>,
    from_origin: bool,
    stamp: Option<u64>,
    /// Changes seen so far, recorded or skipped.
    seen: u64,
    /// The first `skip` changes were recorded before a restart.
    skip: u64,
}

#[derive(Default)]
pub struct Assembler {
    relations: HashMap<u32, Arc<Relation>>,
    open: Option<Open>,
}

impl Assembler {
    /// A transaction begins (`commit_micros`: pgoutput's commit time, since
    /// 2000-01-01); its first `skip` changes are already recorded.
    pub fn begin(&mut self, commit_lsn: Lsn, commit_micros: i64, skip: u64) {
        self.open = Some(Open {
            commit_lsn,
            commit_ms: commit_micros / 1000 + PG_EPOCH_MS,
            changes: Vec::new(),
            from_origin: false,
            stamp: None,
            seen: 0,
            skip,
        });
    }

    pub fn is_open(&self) -> bool {
        self.open.is_some()
    }

    /// The open transaction's commit time (ms since the Unix epoch).
    pub fn open_commit_ms(&self) -> Option<i64> {
        self.open.as_ref().map(|t| t.commit_ms)
    }

    pub fn open_changes(&self) -> usize {
        self.open.as_ref().map_or(0, |t| t.changes.len())
    }

    /// Feeds one pgoutput message.
    pub fn message(&mut self, data: &Bytes) -> Result<(), DecodeError> {
        let change = match pgoutput::decode(data)? {
            Message::Relation(r) => {
                self.relations.insert(r.oid, Arc::new(r));
                return Ok(());
            }
            Message::Type { .. } => return Ok(()),
            Message::Origin { .. } => {
                if let Some(tx) = self.open.as_mut() {
                    tx.from_origin = true;
                }
                return Ok(());
            }
            Message::Truncate { rels, .. } => Decoded::Truncate(
                rels.iter()
                    .map(|&oid| {
                        self.relations
                            .get(&oid)
                            .cloned()
                            .ok_or(DecodeError::UnknownRelation(oid))
                    })
                    .collect::<Result<_, _>>()?,
            ),
            Message::Insert { rel, new } => self.row(rel, Op::Insert, new, None)?,
            Message::Update { rel, old, new } => self.row(rel, Op::Update, new, old)?,
            Message::Delete { rel, old } => self.row(rel, Op::Delete, Vec::new(), Some(old))?,
        };
        if let Some(tx) = self.open.as_mut() {
            tx.seen += 1;
            if tx.seen > tx.skip && !tx.from_origin {
                tx.changes.push(change);
            }
        }
        Ok(())
    }

    fn row(
        &self,
        rel: u32,
        op: Op,
        new: Vec<Value>,
        old: Option<Vec<Value>>,
    ) -> Result<Decoded, DecodeError> {
        let rel = self
            .relations
            .get(&rel)
            .cloned()
            .ok_or(DecodeError::UnknownRelation(rel))?;
        Ok(Decoded::Row(DecodedRow { rel, op, new, old }))
    }

    /// The open transaction's changes so far, to be written before it ends
    /// (a very large transaction is written in parts).
    pub fn take_part(&mut self, clock: &Clock) -> Option<Tx> {
        let tx = self.open.as_mut()?;
        if tx.from_origin || tx.changes.is_empty() {
            return None;
        }
        let at = tx.commit_ms;
        Some(Tx {
            commit_lsn: tx.commit_lsn,
            commit_ms: tx.commit_ms,
            end_lsn: tx.commit_lsn,
            changes: std::mem::take(&mut tx.changes),
            stamp: *tx.stamp.get_or_insert_with(|| clock.stamp_at(at)),
            done_after: tx.seen,
            complete: false,
        })
    }

    /// The transaction ends; it is returned if it has changes to record.
    pub fn commit(&mut self, end_lsn: Lsn, clock: &Clock) -> Option<Tx> {
        let tx = self.open.take()?;
        if tx.from_origin || tx.changes.is_empty() {
            return None;
        }
        Some(Tx {
            commit_lsn: tx.commit_lsn,
            commit_ms: tx.commit_ms,
            end_lsn,
            changes: tx.changes,
            stamp: tx.stamp.unwrap_or_else(|| clock.stamp_at(tx.commit_ms)),
            done_after: tx.seen,
            complete: true,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn relation(oid: u32) -> Bytes {
        let mut m = vec![b'R'];
        m.extend(oid.to_be_bytes());
        m.extend(b"public\0kv\0f");
        m.extend(2u16.to_be_bytes());
        for name in ["k", "v"] {
            m.push(1);
            m.extend(name.as_bytes());
            m.push(0);
            m.extend(25u32.to_be_bytes());
            m.extend((-1i32).to_be_bytes());
        }
        Bytes::from(m)
    }

    fn insert(oid: u32, k: &str) -> Bytes {
        let mut m = vec![b'I'];
        m.extend(oid.to_be_bytes());
        m.push(b'N');
        m.extend(2u16.to_be_bytes());
        m.push(b't');
        m.extend((k.len() as u32).to_be_bytes());
        m.extend(k.as_bytes());
        m.push(b'n');
        Bytes::from(m)
    }

    fn origin() -> Bytes {
        let mut m = vec![b'O'];
        m.extend(0u64.to_be_bytes());
        m.extend(b"meridian_7\0");
        Bytes::from(m)
    }

    #[test]
    fn a_transaction_is_collected_stamped_and_skipped_when_applied_by_meridian() {
        let clock = Clock::manual(1_000, 0, Duration::from_millis(500));
        let mut a = Assembler::default();
        a.begin(Lsn::from_u64(10), 0, 0);
        a.message(&relation(5)).unwrap();
        a.message(&insert(5, "1")).unwrap();
        let tx = a.commit(Lsn::from_u64(11), &clock).unwrap();
        assert_eq!(tx.changes.len(), 1);
        let Decoded::Row(row) = &tx.changes[0] else {
            panic!()
        };
        assert_eq!(
            row.new_json().unwrap(),
            serde_json::json!({"k": "1", "v": null})
        );
        assert!(tx.complete && tx.pin().starts_with('B'));

        a.begin(Lsn::from_u64(20), 0, 0);
        a.message(&origin()).unwrap();
        a.message(&insert(5, "2")).unwrap();
        assert!(a.commit(Lsn::from_u64(21), &clock).is_none());
    }

    #[test]
    fn changes_recorded_before_a_restart_are_skipped() {
        let clock = Clock::manual(1_000, 0, Duration::from_millis(500));
        let mut a = Assembler::default();
        a.message(&relation(5)).unwrap();
        a.begin(Lsn::from_u64(10), 0, 2);
        for k in ["1", "2", "3"] {
            a.message(&insert(5, k)).unwrap();
        }
        let tx = a.commit(Lsn::from_u64(11), &clock).unwrap();
        assert_eq!(tx.changes.len(), 1);
        assert_eq!(tx.done_after, 3);
    }

    #[test]
    fn a_large_transaction_comes_out_in_parts_with_one_stamp() {
        let clock = Clock::manual(1_000, 0, Duration::from_millis(500));
        let mut a = Assembler::default();
        a.message(&relation(5)).unwrap();
        a.begin(Lsn::from_u64(10), 0, 0);
        a.message(&insert(5, "1")).unwrap();
        let part = a.take_part(&clock).unwrap();
        assert!(!part.complete);
        a.message(&insert(5, "2")).unwrap();
        let rest = a.commit(Lsn::from_u64(11), &clock).unwrap();
        assert_eq!((part.stamp, part.done_after), (rest.stamp, 1));
        assert_eq!(rest.done_after, 2);
    }
}
