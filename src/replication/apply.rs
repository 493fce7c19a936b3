//! Applying one origin's changes here: the one entry point ([`apply`]) the
//! receiver and tests use, which owns the apply transaction's settings, the
//! resend check (`meridian.applied`), the locks and the wait for capture
//! (the barrier), and returns a typed [`Applied`].
//!
//! Batches of inserts, updates and deletes are decided in Rust and
//! written in bulk ([`set_wise`](super::set_wise)).
//!
//! **In stream order** (batches holding a TRUNCATE or a schema change, and
//! when a set-wise statement fails): `meridian.apply_each`, which applies
//! change by change and keeps a change that cannot be applied in
//! `meridian.held` with its error, so nothing else waits for it. Held
//! changes are retried through the same path (`replication::held`).

use std::time::Duration;

use serde_json::Value;
use tokio_postgres::types::Json;
use tokio_postgres::{Client, Transaction};

use super::protocol::{Change, Position};
use super::resolve;
use super::set_wise;
use crate::capture::wal::{Barrier, SETTLE_LIMIT};

/// Every apply transaction's settings: ordinary triggers and foreign keys
/// do not fire for applied rows (see migrations/functions/apply.sql), and a
/// deadlock with a local writer is found fast, so the batch is retried.
pub(crate) const SETTINGS: &str =
    "SET LOCAL session_replication_role = replica; SET LOCAL deadlock_timeout = '20ms'";

/// Why a batch was not applied.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Postgres(#[from] tokio_postgres::Error),
    /// Capture did not pass the sync point in time while the apply held its
    /// locks (see [`Barrier::settle`]); rolled back.
    #[error("the apply gave way: capture had not recorded this region's recent transactions within {0:?}")]
    GaveWay(Duration),
    /// The changes follow a position this region has not reached: applying
    /// them would skip what lies between. Not applied.
    #[error("changes after {after:?} of origin {origin}, but only {applied:?} is applied here")]
    Gap {
        origin: u16,
        after: Position,
        applied: Position,
    },
}

impl ApplyError {
    /// A lost deadlock or serialization race against local writes: the
    /// whole batch may be tried again.
    pub fn is_retryable(&self) -> bool {
        matches!(self, ApplyError::Postgres(e) if resolve::is_retryable(e))
    }
}

/// What one apply did.
#[derive(Debug, Default)]
pub struct Applied {
    /// Changes written (last-writer-wins tables).
    pub applied: u64,
    /// Changes not above their row's version, so not written.
    pub older: u64,
    /// Changes kept in `meridian.held`.
    pub held: u64,
    /// Everything was applied before (a resend).
    pub duplicate: bool,
    /// Foreign-key orphans found after the batch.
    pub orphans: u64,
    /// The rule engine's part (its applied, conflicts, held).
    pub engine: resolve::Outcome,
    /// Where the set-wise path's time went (none for the other path).
    pub phases: Option<Phases>,
}

/// Milliseconds spent by the set-wise path: reading what the tables are
/// and locking, waiting for capture, writing last-writer-wins tables, the
/// rule engine's tables.
#[derive(Debug, Default, Clone, Copy)]
pub struct Phases {
    pub lock_ms: f64,
    pub settle_ms: f64,
    pub write_ms: f64,
    pub engine_ms: f64,
}

impl Applied {
    pub fn written(&self) -> u64 {
        self.applied + self.engine.applied
    }

    pub fn held(&self) -> u64 {
        self.held + self.engine.held
    }
}

/// Applies `changes` (one origin's, in its stream order) in one transaction
/// together with the origin's new position. Changes at or before the
/// position recorded here were applied before and are skipped. With
/// `after` (the position the first change follows in the origin's stream),
/// changes that would leave a gap are refused ([`ApplyError::Gap`]). With a
/// `barrier`, the apply decides on exact local state (see [`Barrier`]).
pub async fn apply(
    client: &mut Client,
    barrier: Option<&Barrier>,
    engines: &resolve::Engines,
    origin: u16,
    after: Option<Position>,
    changes: &[Change],
) -> Result<Applied, ApplyError> {
    let Some(last) = changes.last() else {
        return Ok(Applied::default());
    };
    let in_order = changes.iter().any(|c| !c.op.is_row());
    let turn = match barrier {
        Some(b) => Some(b.turn().await),
        None => None,
    };
    let started = std::time::Instant::now();
    let mut tx = client.transaction().await?;
    tx.batch_execute(SETTINGS).await?;
    let position = tx
        .query_opt(
            "SELECT xid, seq FROM meridian.applied WHERE origin = $1 FOR UPDATE",
            &[&i32::from(origin)],
        )
        .await?
        .map(|r| (r.get::<_, i64>(0), r.get::<_, i64>(1)));
    let last = (last.xid as i64, last.seq);
    let here = position.map_or(Position::default(), |(xid, seq)| Position {
        xid: xid as u64,
        seq,
    });
    if let Some(after) = after.filter(|&a| a > here) {
        return Err(ApplyError::Gap {
            origin,
            after,
            applied: here,
        });
    }
    if position.is_some_and(|p| last <= p) {
        return Ok(Applied {
            duplicate: true,
            ..Applied::default()
        });
    }
    // Strictly after the position and after each other: a change that came
    // twice (two paths, a run sent again) is applied once.
    let mut at = position;
    let todo: Vec<&Change> = changes
        .iter()
        .filter(|c| {
            let p = (c.xid as i64, c.seq);
            let new = at.map_or(true, |a| p > a);
            if new {
                at = Some(p);
            }
            new
        })
        .collect();
    let set_wise = match in_order {
        true => None,
        false => set_wise::apply(&mut tx, barrier, engines, origin, &todo).await?,
    };
    let (mut outcome, orphans_possible) = match set_wise {
        Some(done) => done,
        // A TRUNCATE or schema change, a table missing here, or a failed
        // statement: in order, holding what cannot be applied.
        None => (
            in_stream_order(&mut tx, barrier, engines, origin, &todo).await?,
            true,
        ),
    };
    if orphans_possible {
        let orphans: i32 = tx
            .query_one(
                "SELECT meridian.handle_orphans($1, $2::jsonb)",
                &[&i32::from(origin), &Json(&todo)],
            )
            .await?
            .get(0);
        outcome.orphans = orphans as u64;
    }
    tx.execute(
        "SELECT meridian.advance_applied($1, $2, $3, $4)",
        &[&i32::from(origin), &last.0, &last.1, &(todo.len() as i64)],
    )
    .await?;
    let before_commit = started.elapsed();
    tx.commit().await?;
    drop(turn);
    tracing::debug!(
        origin,
        changes = todo.len(),
        set_wise = outcome.phases.is_some(),
        phases = ?outcome.phases,
        body_ms = before_commit.as_secs_f64() * 1e3,
        commit_ms = (started.elapsed() - before_commit).as_secs_f64() * 1e3,
        "applied"
    );
    Ok(outcome)
}

/// Waits for capture to pass a sync point (the caller holds its locks).
pub(super) async fn settle(barrier: Option<&Barrier>) -> Result<(), ApplyError> {
    match barrier {
        Some(b) if !b.settle_locked().await? => Err(ApplyError::GaveWay(SETTLE_LIMIT)),
        _ => Ok(()),
    }
}

/// The stream-order path: locks every key touched (`meridian.lock_keys`),
/// then `meridian.apply_each` (change by change, holding what fails) for
/// last-writer-wins tables and the engine for the others.
pub(super) async fn in_stream_order(
    tx: &mut Transaction<'_>,
    barrier: Option<&Barrier>,
    engines: &resolve::Engines,
    origin: u16,
    todo: &[&Change],
) -> Result<Applied, ApplyError> {
    if barrier.is_some() {
        tx.execute("SELECT meridian.lock_keys($1::jsonb)", &[&Json(todo)])
            .await?;
        settle(barrier).await?;
    }
    let (for_engine, plain): (Vec<&Change>, Vec<&Change>) =
        todo.iter().partition(|c| engines.handles(c));
    let mut outcome = Applied::default();
    if !plain.is_empty() {
        let r: Value = tx
            .query_one(
                "SELECT meridian.apply_each($1, meridian.fill_defaults($2::jsonb))",
                &[&i32::from(origin), &Json(&plain)],
            )
            .await?
            .get(0);
        let count = |k: &str| r[k].as_u64().unwrap_or(0);
        outcome.applied = count("applied");
        outcome.older = count("older");
        outcome.held = count("held");
    }
    outcome.engine = resolve::apply(tx, engines, origin, &for_engine).await?;
    Ok(outcome)
}
