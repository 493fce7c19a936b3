//! Recording decoded transactions: a batch becomes a few SQL statements in
//! one local transaction.
//!
//! Each relation's rows of the batch go to its generated capture function
//! (`meridian.capture_<oid>`, written by `meridian.enable_capture`) in one
//! statement, in stream order; a schema change or a TRUNCATE ends every
//! group, so they keep their place among the row changes. The slot
//! position reached and the batch's causal dependencies (this region's
//! applied vector) are written in the same transaction.

use std::collections::HashMap;
use std::sync::Arc;

use tokio_postgres::Client;

use super::assemble::{Decoded, DecodedRow, Op, Tx};
use super::pgoutput::{Relation, Value};
use super::CaptureError;

/// What capture knows of a published relation, looked up once per oid.
pub struct RelInfo {
    /// The description this was looked up for (a new one means the table changed).
    desc: Arc<Relation>,
    captured: bool,
    /// `schema.table` as `format('%I.%I')` spells it.
    name: String,
    /// Positions of the primary key's columns in the decoded row.
    key: Vec<usize>,
    /// `meridian.ddl_out`: its inserts are schema changes.
    ddl_out: bool,
    /// The table's columns now are the ones the WAL describes (images need
    /// no trimming).
    exact: bool,
}

pub type Relations = HashMap<u32, RelInfo>;

/// One statement of a batch.
#[derive(Debug)]
pub enum Step {
    Rows { rel: u32, rows: Vec<RowArgs> },
    Truncate { names: Vec<String>, pin: String },
    Ddl { ddl: serde_json::Value, pin: String },
}

/// The arguments of one capture-function call.
#[derive(Debug)]
pub struct RowArgs {
    op: &'static str,
    new: Option<serde_json::Value>,
    old: Option<serde_json::Value>,
    pin: String,
    old_key_held: bool,
}

/// Records `batch` and the slot position after its last transaction.
pub async fn record(
    client: &mut Client,
    relations: &mut Relations,
    batch: &[Tx],
) -> Result<(), CaptureError> {
    let Some(last) = batch.last() else {
        return Ok(());
    };
    let steps = plan(client, relations, batch).await?;
    let tx = client
        .transaction()
        .await
        .map_err(super::pg("starting a capture batch"))?;
    for step in &steps {
        match step {
            Step::Rows { rel, rows } => {
                let exact = relations.get(rel).is_some_and(|r| r.exact);
                let sql = format!(
                    "SELECT meridian.capture_rows_{rel}($1::text[], $2::jsonb[], $3::jsonb[], $4::text[], $5::bool[], {exact})"
                );
                let ops: Vec<&str> = rows.iter().map(|r| r.op).collect();
                let news: Vec<Option<&serde_json::Value>> =
                    rows.iter().map(|r| r.new.as_ref()).collect();
                let olds: Vec<Option<&serde_json::Value>> =
                    rows.iter().map(|r| r.old.as_ref()).collect();
                let pins: Vec<&str> = rows.iter().map(|r| r.pin.as_str()).collect();
                let held: Vec<bool> = rows.iter().map(|r| r.old_key_held).collect();
                tx.query_one(&sql, &[&ops, &news, &olds, &pins, &held])
                    .await
                    .map_err(super::pg(format!("recording changes of relation {rel}")))?;
            }
            Step::Truncate { names, pin } => {
                for name in names {
                    tx.execute("SELECT meridian.capture_truncate($1, $2)", &[name, pin])
                        .await
                        .map_err(super::pg("recording a TRUNCATE"))?;
                }
            }
            Step::Ddl { ddl, pin } => {
                tx.execute("SELECT meridian.capture_ddl($1, $2)", &[ddl, pin])
                    .await
                    .map_err(super::pg("recording a schema change"))?;
            }
        }
    }
    let done = if last.complete {
        0
    } else {
        last.done_after as i64
    };
    let at = if last.complete {
        last.end_lsn
    } else {
        last.commit_lsn
    };
    // What this region has applied of every origin now: the dependencies
    // of everything recorded in this transaction (see
    // migrations/0015_change_deps.sql).
    tx.execute(
        "INSERT INTO meridian.change_deps (xid, origins, xids, seqs)
         SELECT pg_current_xact_id(), array_agg(origin ORDER BY origin),
                array_agg(xid ORDER BY origin), array_agg(seq ORDER BY origin)
           FROM meridian.applied HAVING count(*) > 0",
        &[],
    )
    .await
    .map_err(super::pg("recording the batch's dependencies"))?;
    tx.execute(
        "UPDATE meridian.capture_progress
            SET lsn = $1::text::pg_lsn, done = $2, committed_at = to_timestamp($3::float8 / 1000)",
        &[&at.to_pg_string(), &done, &(last.commit_ms as f64)],
    )
    .await
    .map_err(super::pg("recording capture progress"))?;
    tx.commit()
        .await
        .map_err(super::pg("committing a capture batch"))
}

/// Records that everything before `lsn` is recorded (a sync point, which
/// committed at `commit_ms`, passed).
pub async fn mark(
    client: &Client,
    lsn: pgwire_replication::Lsn,
    commit_ms: Option<i64>,
) -> Result<(), CaptureError> {
    client
        .execute(
            "UPDATE meridian.capture_progress
                SET lsn = $1::text::pg_lsn, done = 0,
                    committed_at = coalesce(to_timestamp($2::float8 / 1000), committed_at)
              WHERE lsn < $1::text::pg_lsn",
            &[&lsn.to_pg_string(), &commit_ms.map(|m| m as f64)],
        )
        .await
        .map_err(super::pg("recording capture progress"))?;
    Ok(())
}

/// Groups a batch into steps: each relation's rows together, in stream
/// order, every group closed by a schema change or TRUNCATE.
async fn plan(
    client: &Client,
    relations: &mut Relations,
    batch: &[Tx],
) -> Result<Vec<Step>, CaptureError> {
    let mut steps: Vec<Step> = Vec::new();
    let mut open: HashMap<u32, usize> = HashMap::new();
    for tx in batch {
        for (i, change) in tx.changes.iter().enumerate() {
            match change {
                Decoded::Truncate(rels) => {
                    let mut names = Vec::new();
                    for rel in rels {
                        let info = lookup(client, relations, rel).await?;
                        if info.captured {
                            names.push(info.name.clone());
                        }
                    }
                    open.clear();
                    steps.push(Step::Truncate {
                        names,
                        pin: tx.pin(),
                    });
                }
                Decoded::Row(row) => {
                    let info = lookup(client, relations, &row.rel).await?;
                    if info.ddl_out {
                        if row.op == Op::Insert {
                            open.clear();
                            let ddl = row
                                .new_text("row")
                                .and_then(|t| serde_json::from_slice(t).ok())
                                .unwrap_or(serde_json::Value::Null);
                            steps.push(Step::Ddl { ddl, pin: tx.pin() });
                        }
                        continue;
                    }
                    if !info.captured {
                        continue;
                    }
                    let held = row.op == Op::Update && old_key_held(&info.key, row, &tx.changes, i);
                    let at = *open.entry(row.rel.oid).or_insert_with(|| {
                        steps.push(Step::Rows {
                            rel: row.rel.oid,
                            rows: Vec::new(),
                        });
                        steps.len() - 1
                    });
                    if let Step::Rows { rows, .. } = &mut steps[at] {
                        rows.push(RowArgs {
                            op: row.op.as_str(),
                            new: row.new_json(),
                            old: row.old_json(),
                            pin: tx.pin(),
                            old_key_held: held,
                        });
                    }
                }
            }
        }
    }
    Ok(steps)
}

/// For an update that changed the key: does a later change of the same
/// transaction give a row the old key (keys shifted or swapped)? Then that
/// change covers the key and no delete of it is recorded.
fn old_key_held(key: &[usize], row: &DecodedRow, changes: &[Decoded], at: usize) -> bool {
    let key_of = |values: &[Value]| -> Option<Vec<Value>> {
        key.iter().map(|&i| values.get(i).cloned()).collect()
    };
    let Some(old) = row.old.as_deref().and_then(key_of) else {
        return false;
    };
    if key.is_empty() || key_of(&row.new).as_ref() == Some(&old) {
        return false;
    }
    changes.iter().enumerate().any(|(j, c)| match c {
        Decoded::Row(other) => {
            j > at
                && other.rel.oid == row.rel.oid
                && other.op != Op::Delete
                && key_of(&other.new).as_ref() == Some(&old)
        }
        Decoded::Truncate(_) => false,
    })
}

async fn lookup<'a>(
    client: &Client,
    relations: &'a mut Relations,
    rel: &Arc<Relation>,
) -> Result<&'a RelInfo, CaptureError> {
    if !relations
        .get(&rel.oid)
        .is_some_and(|known| Arc::ptr_eq(&known.desc, rel))
    {
        let found = client
            .query_one(
                "SELECT format('%I.%I', $1::text, $2::text),
                        EXISTS (SELECT 1 FROM pg_class c WHERE c.oid = $3::oid)
                          AND meridian.is_captured($3::oid::regclass),
                        coalesce((SELECT array_agg(a.attname::text ORDER BY k.ord)
                                    FROM pg_index i
                                    CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
                                    JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
                                   WHERE i.indrelid = $3::oid AND i.indisprimary), '{}'),
                        coalesce((SELECT array_agg(a.attname::text ORDER BY a.attnum) FROM pg_attribute a
                                   WHERE a.attrelid = $3::oid AND a.attnum > 0 AND NOT a.attisdropped
                                     AND a.attgenerated = ''), '{}')",
                &[&rel.schema, &rel.name, &rel.oid],
            )
            .await
            .map_err(super::pg("looking up a captured table"))?;
        let key_names: Vec<String> = found.get(2);
        let key = key_names
            .iter()
            .filter_map(|k| rel.columns.iter().position(|c| &c.name == k))
            .collect();
        let now: Vec<String> = found.get(3);
        let exact = now.len() == rel.columns.len()
            && now.iter().zip(&rel.columns).all(|(a, b)| *a == b.name);
        relations.insert(
            rel.oid,
            RelInfo {
                exact,
                desc: rel.clone(),
                name: found.get(0),
                captured: found.get(1),
                key,
                ddl_out: rel.schema == "meridian" && rel.name == "ddl_out",
            },
        );
    }
    Ok(&relations[&rel.oid])
}
