//! replication::held: retrying the changes that could not be applied when
//! they arrived. `meridian.hold` keeps them in `meridian.held` with the
//! error (never dropped; the stream goes on); housekeeping calls [`retry`]
//! once a second, in the appliers' turn.
//!
//! One mechanism for every held change: the due ones (back-off: 1 s doubling
//! up to 5 minutes, `meridian.held_next_try`) are applied per origin, in
//! stream order, by the same path a batch takes when it cannot be applied
//! set-wise (`apply::in_stream_order`: `meridian.apply_each` for
//! last-writer-wins tables, the rule engine for the others). A change that
//! fails again is held again by that path, which moves its next try on; the
//! rest leave `meridian.held`.

use std::collections::BTreeMap;

use tokio_postgres::{Client, Transaction};

use super::protocol::{Change, Operation};
use super::{apply, resolve::Engines};

/// Held changes one round takes at most.
const PER_ROUND: i64 = 1000;

/// A held change as read back.
struct Held {
    change: Change,
    /// Held on a unique value other than the key (SQLSTATE 23505).
    unique: bool,
    /// Failed retries so far: a retry that fails again increments it.
    attempts: i32,
}

/// Retries the held changes that are due; returns how many left
/// `meridian.held` (applied, outdated, or losers of a unique conflict).
pub async fn retry(client: &mut Client, engines: &Engines) -> Result<u64, apply::ApplyError> {
    let rows = client
        .query(
            "SELECT origin, change, sqlstate, attempts FROM meridian.held
              WHERE next_try <= now() ORDER BY origin, xid, seq LIMIT $1",
            &[&PER_ROUND],
        )
        .await?;
    let mut by_origin: BTreeMap<i32, Vec<Held>> = BTreeMap::new();
    for r in &rows {
        let origin: i32 = r.get(0);
        match serde_json::from_value::<Change>(r.get(1)) {
            Ok(change) => by_origin.entry(origin).or_default().push(Held {
                change,
                unique: r.get::<_, &str>(2) == "23505",
                attempts: r.get(3),
            }),
            Err(e) => {
                tracing::warn!(origin, error = %e, "a held change cannot be read back; left held")
            }
        }
    }
    let mut unheld = 0;
    for (origin, held) in by_origin {
        let mut tx = client.transaction().await?;
        tx.batch_execute(apply::SETTINGS).await?;
        let lost = unique_losers(&tx, engines, origin, &held).await?;
        let todo: Vec<&Change> = held
            .iter()
            .map(|h| &h.change)
            .filter(|c| !lost.contains(&c.position()))
            .collect();
        apply::in_stream_order(&mut tx, None, engines, origin as u16, &todo).await?;
        // Those held again have one attempt more; the others go.
        let xids: Vec<i64> = held.iter().map(|h| h.change.xid as i64).collect();
        let seqs: Vec<i64> = held.iter().map(|h| h.change.seq).collect();
        let attempts: Vec<i32> = held.iter().map(|h| h.attempts).collect();
        unheld += tx
            .execute(
                "DELETE FROM meridian.held h
                  USING unnest($2::bigint[], $3::bigint[], $4::int[]) AS d(xid, seq, attempts)
                  WHERE h.origin = $1 AND h.xid = d.xid AND h.seq = d.seq AND h.attempts = d.attempts",
                &[&origin, &xids, &seqs, &attempts],
            )
            .await?;
        tx.commit().await?;
    }
    Ok(unheld)
}

/// Changes held on a unique value other than the key: the local row holding
/// the value and the change are compared as incarnations, by the table's
/// policy (last-writer-wins without an engine); a losing change is dropped,
/// a losing row deleted, both logged (`meridian.resolve_unique`). Returns
/// the changes that lost.
async fn unique_losers(
    tx: &Transaction<'_>,
    engines: &Engines,
    origin: i32,
    held: &[Held],
) -> Result<Vec<super::protocol::Position>, tokio_postgres::Error> {
    let mut lost = Vec::new();
    for h in held
        .iter()
        .filter(|h| h.unique && matches!(h.change.op, Operation::Insert | Operation::Update))
    {
        let (policy, priority) = match engines.get(&h.change.tbl) {
            Some(e) => (
                Some(e.policy.name()),
                Some(
                    e.priority
                        .iter()
                        .map(|&r| i32::from(r))
                        .collect::<Vec<i32>>(),
                ),
            ),
            None => (None, None),
        };
        let outcome: String = tx
            .query_one(
                "SELECT meridian.resolve_unique($1, $2, $3, $4)",
                &[
                    &origin,
                    &serde_json::to_value(&h.change).expect("serialises"),
                    &policy,
                    &priority,
                ],
            )
            .await?
            .get(0);
        if outcome == "lost" {
            lost.push(h.change.position());
        }
    }
    Ok(lost)
}
