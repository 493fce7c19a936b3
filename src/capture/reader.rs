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

use super::image::Image;
use serde::{Deserialize, Serialize};
use tokio_postgres::GenericClient;

use super::CaptureError;

/// Where a reader is: the last change it has read. Also what the peer
/// protocol carries as a position in an origin's stream.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Position {
    pub xid: u64,
    pub seq: i64,
}

/// A position in another origin's change stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OriginPosition {
    pub origin: u16,
    pub position: Position,
}

/// The causal dependencies of the changes of one capture transaction
/// (`xid`): how much of each origin this region had applied when capture
/// recorded them (`meridian.change_deps`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deps {
    pub xid: u64,
    pub after: Vec<OriginPosition>,
}

/// What a change does; on the wire and in SQL the letter of `meridian.change.op`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Operation {
    #[serde(rename = "I")]
    Insert,
    #[serde(rename = "U")]
    Update,
    #[serde(rename = "D")]
    Delete,
    #[serde(rename = "T")]
    Truncate,
    /// A schema change (DDL); `row` holds the statement and its search_path.
    #[serde(rename = "S")]
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

    /// An insert, update or delete of one row (not a TRUNCATE or schema change).
    pub fn is_row(self) -> bool {
        matches!(
            self,
            Operation::Insert | Operation::Update | Operation::Delete
        )
    }
}

/// One captured row change: the one shape a change has from the log
/// (`meridian.change`, read here) to the peer protocol and the apply. Its
/// serde form is what the peer protocol carries and what the SQL apply
/// functions read (`meridian.apply_each`, `lock_keys`, `hold`, the rule
/// engine's), so the field names are theirs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Change {
    /// Where the change is in its origin's stream: (transaction, sequence).
    pub xid: u64,
    pub seq: i64,
    /// Region id where the write was made. Not on the wire: a receiver
    /// knows it from the connection's handshake.
    #[serde(skip)]
    pub origin: i32,
    /// The row version given to this change: `max(tx_hlc, previous version + 1)`.
    pub hlc: i64,
    /// The writing transaction's stamp.
    pub tx_hlc: i64,
    /// False when the write bypassed the proxy and Postgres made the
    /// stamp. Not on the wire (the origin's own diagnostics).
    #[serde(skip)]
    pub via_proxy: bool,
    /// `schema.table`.
    pub tbl: String,
    pub op: Operation,
    /// Primary key columns (none for TRUNCATE).
    pub pk: Option<Image>,
    /// The new row for inserts and updates.
    pub row: Option<Image>,
    /// Old values of counter columns, for updates of tables with counters.
    pub old: Option<Image>,
    /// The version (hlc, region) the row had at the origin when this
    /// change was written on it; none for a key new there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_hlc: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_origin: Option<i32>,
    /// Rule-engine tables only: the write's epoch, lineage (the version of
    /// the insert that started the row) and last-writer-wins column versions
    /// (see `rules::merge`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gen: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag_hlc: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag_origin: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cols: Option<Image>,
}

impl Change {
    /// Where this change is in its origin's stream.
    pub fn position(&self) -> Position {
        Position {
            xid: self.xid,
            seq: self.seq,
        }
    }
}

#[cfg(test)]
impl Change {
    /// A change with no images or metadata, for unit tests to fill in.
    pub(crate) fn bare(xid: u64, seq: i64, hlc: i64, op: Operation) -> Change {
        Change {
            xid,
            seq,
            origin: 0,
            hlc,
            tx_hlc: hlc,
            via_proxy: false,
            tbl: "public.t".into(),
            op,
            pk: None,
            row: None,
            old: None,
            base_hlc: None,
            base_origin: None,
            epoch: None,
            gen: None,
            tag_hlc: None,
            tag_origin: None,
            cols: None,
        }
    }
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
            let code: &str = r.get(7);
            let op = Operation::from_code(code)
                .ok_or_else(|| CaptureError::Corrupt(format!("unknown operation {code:?}")))?;
            Ok(Change {
                xid: r.get::<_, String>(0).parse().unwrap_or(0),
                seq: r.get(1),
                origin: r.get(2),
                hlc: r.get(3),
                tx_hlc: r.get(4),
                via_proxy: r.get(5),
                tbl: r.get(6),
                op,
                pk: r.get(8),
                row: r.get(9),
                old: r.get(10),
                base_hlc: r.get(11),
                base_origin: r.get(12),
                epoch: r.get(13),
                tag_hlc: r.get(14),
                tag_origin: r.get(15),
                cols: r.get(16),
                gen: r.get(17),
            })
        })
        .collect()
}

/// The dependencies of the capture transactions `first..=last` (the xids of
/// changes [`read_changes`] returned), in xid order.
pub async fn read_deps(
    client: &impl GenericClient,
    first: u64,
    last: u64,
) -> Result<Vec<Deps>, CaptureError> {
    let rows = client
        .query(
            "SELECT xid::text, origins, xids, seqs FROM meridian.change_deps
              WHERE xid BETWEEN $1::text::xid8 AND $2::text::xid8 ORDER BY xid",
            &[&first.to_string(), &last.to_string()],
        )
        .await
        .map_err(|source| CaptureError::Postgres {
            context: "reading meridian.change_deps".into(),
            source,
        })?;
    rows.iter()
        .map(|r| {
            let xid: String = r.get(0);
            let (origins, xids, seqs): (Vec<i32>, Vec<i64>, Vec<i64>) =
                (r.get(1), r.get(2), r.get(3));
            let after = origins
                .iter()
                .zip(&xids)
                .zip(&seqs)
                .map(|((&o, &x), &s)| OriginPosition {
                    origin: o as u16,
                    position: Position {
                        xid: x as u64,
                        seq: s,
                    },
                })
                .collect();
            let xid = xid
                .parse()
                .map_err(|_| CaptureError::Corrupt(format!("change_deps xid {xid:?}")))?;
            Ok(Deps { xid, after })
        })
        .collect()
}
