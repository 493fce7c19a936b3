//! replication::gate: what holds changes back before they are applied.
//! Causal order (a change waits until this region has applied, from every
//! third region, what its origin had applied when it captured the change:
//! [`dependencies_met`], used over a queue of batches by
//! `replication::queue`) and the clock (a batch stamped further ahead than
//! the maximum drift waits until it is within bounds: held, never dropped).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use super::inbox::Inbox;
use super::progress::{applied_vector, AppliedVector};
use super::protocol::{Message, OriginPosition};
use super::queue::{Gathered, Queue};
use super::{unexpected, ReplicationError, ReplicationStats, APPLY_MAX};
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

/// One connection's causal gate: the origin's batches queued as they
/// arrive, and what of them can be applied now.
pub(super) struct CausalGate {
    inbox: Inbox,
    queue: Queue,
    have: watch::Receiver<Vec<OriginPosition>>,
    applied: Arc<AppliedVector>,
    /// Since when the front of the queue has waited for its dependencies.
    waiting: Option<Instant>,
    /// The wait last said in the log.
    waiting_said: Option<Instant>,
    me: u16,
    origin: u16,
}

impl CausalGate {
    pub(super) async fn new(
        inbox: Inbox,
        applied: &Arc<AppliedVector>,
        client: &Client,
        me: u16,
        origin: u16,
    ) -> Result<CausalGate, ReplicationError> {
        applied.merge(&applied_vector(client).await?);
        Ok(CausalGate {
            inbox,
            queue: Queue::default(),
            have: applied.subscribe(),
            applied: applied.clone(),
            waiting: None,
            waiting_said: None,
            me,
            origin,
        })
    }

    /// What to apply (or, with no changes, a floor to record) next: what the
    /// queue lets through, waiting for messages or the applied vector as
    /// needed, for as long as it takes: nothing goes through before its
    /// dependencies. (What a change waits for reaches this region over
    /// any connected path, see `replication::forward`.)
    pub(super) async fn next(
        &mut self,
        client: &Client,
        stats: &ReplicationStats,
    ) -> Result<Gathered, ReplicationError> {
        let origin = self.origin;
        loop {
            while self.queue.changes() < QUEUE_MAX {
                match self.inbox.ready()? {
                    Some(m) => enqueue(&mut self.queue, m)?,
                    None => break,
                }
            }
            let have = self.have.borrow_and_update().clone();
            if let Some(g) = self.queue.take_ready(&have, self.me, origin, APPLY_MAX) {
                self.waiting = None;
                return Ok(g);
            }
            if self.queue.is_empty() {
                // No timeout here: a shipper with nothing to ship is silent.
                // A dead peer shows as a closed connection (TCP keepalive, or
                // its restart).
                self.waiting = None;
                enqueue(&mut self.queue, self.inbox.next().await?)?;
                continue;
            }
            let since = *self.waiting.get_or_insert_with(|| {
                stats
                    .batches_held_for_causality
                    .fetch_add(1, Ordering::Relaxed);
                tracing::debug!(origin, "changes wait for changes their origin had applied");
                Instant::now()
            });
            if since.elapsed() >= LONG_WAIT && self.waiting_said != Some(since) {
                tracing::info!(origin, seconds = since.elapsed().as_secs(), "changes still wait for changes their origin had applied (not arrived over any link yet)");
                self.waiting_said = Some(since);
            }
            match self.wait().await? {
                Waited::Moved => {}
                Waited::Recheck => self.applied.merge(&applied_vector(client).await?),
            }
        }
    }

    /// Waits, while the queue's front waits for its dependencies, for the
    /// applied vector to move, a message to arrive (if the queue has room),
    /// or a recheck.
    async fn wait(&mut self) -> Result<Waited, ReplicationError> {
        let room = self.queue.changes() < QUEUE_MAX;
        tokio::select! {
            m = self.inbox.next(), if room => {
                enqueue(&mut self.queue, m?)?;
                Ok(Waited::Moved)
            }
            _ = self.have.changed() => Ok(Waited::Moved),
            _ = tokio::time::sleep(RECHECK) => Ok(Waited::Recheck),
        }
    }
}

/// A wait this long is said in the log (once per wait).
const LONG_WAIT: Duration = Duration::from_secs(5);

/// Changes queued beyond this many are left in the inbox (and the shipper
/// waits for acknowledgements): the queue's bound.
const QUEUE_MAX: usize = 2 * APPLY_MAX;
/// How often a receiver whose changes wait reads `meridian.applied` for
/// applies this process did not make.
const RECHECK: Duration = Duration::from_millis(250);

fn enqueue(queue: &mut Queue, message: Message) -> Result<(), ReplicationError> {
    match message {
        Message::Batch {
            after,
            changes,
            deps,
            floor,
            caught_up,
        } => queue.push_batch(Some(after), changes, deps, floor, caught_up),
        Message::Floor { hlc, caught_up } => queue.push_floor(hlc, caught_up),
        other => return Err(unexpected("Batch", &other)),
    }
    Ok(())
}

enum Waited {
    /// The applied vector moved, or a message arrived.
    Moved,
    /// Time to read `meridian.applied` again.
    Recheck,
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
