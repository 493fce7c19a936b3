//! replication::gate: what holds changes back before they are applied.
//! Causal order (a change waits until this region has applied, from every
//! third region, what its origin had applied when it captured the change:
//! [`dependencies_met`], used over a queue of batches by
//! `replication::queue`) and the clock (a batch stamped further ahead than
//! the maximum drift waits until it is within bounds: held, never dropped).

use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::protocol::OriginPosition;
use super::ReplicationStats;
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
