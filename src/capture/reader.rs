//! Reading captured changes back, in a safe order.
//!
//! A change's sequence number is taken when the row is written, not when its
//! transaction commits: T1 takes 10, T2 takes 11, T2 commits first. A reader
//! that moved its position past 11 would skip 10 forever. So changes are read
//! in (transaction id, sequence) order and only from transactions older than
//! the oldest transaction still running (`pg_snapshot_xmin`): those are
//! certainly finished, so nothing can appear behind the read position later.
//! The price: one long-running writing transaction holds back everything that
//! started after it until it ends.

use serde_json::Value;
use tokio_postgres::GenericClient;

use super::CaptureError;

/// Where a reader is: the last change it has read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Position {
    pub xid: u64,
    pub seq: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Insert,
    Update,
    Delete,
    Truncate,
    /// A schema change (DDL); `row` holds the statement and its search_path.
    Schema,
}

impl Operation {
    fn from_code(code: &str) -> Option<Operation> {
        Some(match code {
            "I" => Operation::Insert,
            "U" => Operation::Update,
            "D" => Operation::Delete,
            "T" => Operation::Truncate,
            "S" => Operation::Schema,
            _ => return None,
        })
    }
}

/// One captured row change.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub position: Position,
    /// Region id where the write was made.
    pub origin: i32,
    /// The row version given to this change: `max(tx_hlc, previous version + 1)`.
    pub hlc: i64,
    /// The writing transaction's stamp.
    pub tx_hlc: i64,
    /// False when the write bypassed the proxy and Postgres made the stamp.
    pub via_proxy: bool,
    /// `schema.table`.
    pub table: String,
    pub operation: Operation,
    /// Primary key columns as a JSON object (none for TRUNCATE).
    pub key: Option<Value>,
    /// The new row for inserts and updates.
    pub row: Option<Value>,
    /// Old values of counter columns, for updates of tables with counters.
    pub old: Option<Value>,
    /// The version (hlc, region) the row had when this change was written
    /// on it; None for a key new in the origin.
    pub base: Option<(i64, i32)>,
    /// Rule-engine tables only: the write's epoch, lineage (the version of
    /// the insert that started the row) and last-writer-wins column versions
    /// (see `rules::merge`).
    pub epoch: Option<i32>,
    pub gen: Option<i32>,
    pub tag: Option<(i64, i32)>,
    pub cols: Option<Value>,
}

/// Reads up to `limit` changes after `after`, in safe order.
pub async fn read_changes(
    client: &impl GenericClient,
    after: Position,
    limit: i64,
) -> Result<Vec<Change>, CaptureError> {
    let rows = client
        .query(
            "SELECT xid::text, seq, origin, hlc, tx_hlc, via_proxy, tbl, op::text, pk, \"row\", old,
                    base_hlc, base_origin, epoch, tag_hlc, tag_origin, cols, gen
             FROM meridian.read_changes($1::text::xid8, $2, $3::bigint::int)",
            &[&after.xid.to_string(), &after.seq, &limit],
        )
        .await
        .map_err(|source| CaptureError::Postgres {
            context: "reading meridian.change".into(),
            source,
        })?;
    rows.iter()
        .map(|r| {
            let op: &str = r.get(7);
            let operation = Operation::from_code(op)
                .ok_or_else(|| CaptureError::Corrupt(format!("unknown operation {op:?}")))?;
            Ok(Change {
                position: Position {
                    xid: r.get::<_, String>(0).parse().unwrap_or(0),
                    seq: r.get(1),
                },
                origin: r.get(2),
                hlc: r.get(3),
                tx_hlc: r.get(4),
                via_proxy: r.get(5),
                table: r.get(6),
                operation,
                key: r.get(8),
                row: r.get(9),
                old: r.get(10),
                base: r.get::<_, Option<i64>>(11).zip(r.get::<_, Option<i32>>(12)),
                epoch: r.get(13),
                tag: r.get::<_, Option<i64>>(14).zip(r.get::<_, Option<i32>>(15)),
                cols: r.get(16),
                gen: r.get(17),
            })
        })
        .collect()
}
