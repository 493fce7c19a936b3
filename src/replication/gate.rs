//! replication::gate: what holds a batch back before it is applied. Causal
//! order (a batch waits, bounded by [`CAUSAL_WAIT`], until this region has
//! applied from every third region what the origin had applied when it
//! read the batch) and the clock (a batch stamped further ahead than the
//! maximum drift waits until it is within bounds: held, never dropped).

use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use super::progress::applied_vector;
use super::protocol::OriginPosition;
use super::{ReplicationError, ReplicationStats, CAUSAL_WAIT};
use crate::clock::{Clock, ClockError};

/// Whether `have` (this region's applied vector) holds, from every third
/// region, what `after` asks for.
pub(super) fn dependencies_met(
    after: &[OriginPosition],
    have: &[OriginPosition],
    me: u16,
    origin: u16,
) -> bool {
    after
        .iter()
        .filter(|p| p.origin != me && p.origin != origin)
        .all(|need| {
            have.iter().any(|h| {
                h.origin == need.origin
                    && (h.position.xid, h.position.seq) >= (need.position.xid, need.position.seq)
            })
        })
}

/// Causal order: a batch from `origin` waits until this region has applied,
/// from every third region, at least what `origin` had applied when it read
/// the batch, so a row never arrives before one it was written against.
///
/// The wait is bounded by [`CAUSAL_WAIT`]: the vector is read after the
/// batch, so it can ask for more than the batch's transactions saw, and when
/// a third region is cut off from this one but not from `origin`, its changes
/// cannot arrive here at all. Waiting forever would stall `origin` for the
/// whole partition (or, with two slow shippers waiting on each other, for
/// ever). After the bound the batch is applied and counted in
/// `batches_applied_before_dependencies`; convergence does not depend on
/// order (versions decide), only the momentary view does.
/// Returns false if asked to stop while waiting.
pub(super) async fn hold_until_causally_ready(
    client: &Client,
    after: &[OriginPosition],
    me: u16,
    origin: u16,
    stats: &ReplicationStats,
    stop: &CancellationToken,
) -> Result<bool, ReplicationError> {
    if dependencies_met(after, &[], me, origin) {
        return Ok(true);
    }
    let mut counted = false;
    let deadline = tokio::time::Instant::now() + CAUSAL_WAIT;
    loop {
        let have = applied_vector(client).await?;
        if dependencies_met(after, &have, me, origin) {
            return Ok(true);
        }
        if tokio::time::Instant::now() >= deadline {
            stats
                .batches_applied_before_dependencies
                .fetch_add(1, Ordering::Relaxed);
            tracing::info!(origin, "applying a batch before changes its origin had seen (they have not arrived within the causal wait)");
            return Ok(true);
        }
        if !counted {
            stats
                .batches_held_for_causality
                .fetch_add(1, Ordering::Relaxed);
            tracing::debug!(
                origin,
                "batch waits for changes its origin had already applied"
            );
            counted = true;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            _ = stop.cancelled() => return Ok(false),
        }
    }
}

/// The receive event for a batch: the clock moves past its newest stamp. A
/// stamp further ahead than the maximum drift is not accepted: the batch is
/// held (not applied, not dropped) and retried until it is within bounds.
/// Returns false if asked to stop while holding.
pub(super) async fn hold_until_within_drift(
    clock: &Clock,
    newest: u64,
    stats: &ReplicationStats,
    stop: &CancellationToken,
) -> bool {
    let mut counted = false;
    loop {
        match clock.observe(newest) {
            Ok(()) | Err(ClockError::Invalid(_)) => return true,
            Err(e @ ClockError::TooFarAhead { .. }) => {
                if !counted {
                    stats.batches_held_for_drift.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %e, "batch held: its stamps are too far ahead of this region's clock");
                    counted = true;
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                    _ = stop.cancelled() => return false,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication::protocol::Position;

    fn at(origin: u16, xid: u64, seq: i64) -> OriginPosition {
        OriginPosition {
            origin,
            position: Position { xid, seq },
        }
    }

    #[test]
    fn dependencies_are_met_only_by_as_much_of_every_third_region() {
        // Region 1 receives from 2; 3 is the third region.
        let after = [at(1, 50, 0), at(2, 40, 0), at(3, 10, 5)];
        assert!(dependencies_met(&after, &[at(3, 10, 5)], 1, 2));
        assert!(dependencies_met(&after, &[at(3, 11, 0)], 1, 2));
        assert!(!dependencies_met(&after, &[at(3, 10, 4)], 1, 2));
        assert!(!dependencies_met(&after, &[], 1, 2));
        // Its own position and the origin's are not dependencies.
        assert!(dependencies_met(&after[..2], &[], 1, 2));
    }
}
