//! replication::queue: one origin's batches received and not yet applied,
//! in stream order, and the causal gate over them. What can be applied is
//! taken from the front: whole batches, and of the first batch whose
//! changes wait for their dependencies the part before them, so a batch
//! never waits for what only its later transactions need (two streams
//! waiting on each other's later parts would otherwise wait for ever; see
//! migrations/0015_change_deps.sql for why exact dependencies leave no
//! cycle). Pure: the receiver feeds it messages and the applied vector.

use std::collections::VecDeque;

use super::gate::dependencies_met;
use super::protocol::{Change, Deps, OriginPosition, Position};

/// What one apply takes from the queue: changes in stream order, applied in
/// one transaction, and the batches they complete.
#[derive(Default)]
pub(super) struct Gathered {
    /// The position in the origin's stream the first change follows.
    pub after: Option<Position>,
    pub changes: Vec<Change>,
    /// The dependencies of the changes' capture transactions (relayed with
    /// them, see `replication::relay`).
    pub deps: Vec<Deps>,
    /// Each batch's last position, in order (each gets its acknowledgement).
    pub ends: Vec<Position>,
    /// The last batch's floor and caught-up time that were set.
    pub floor: Option<i64>,
    pub origin_ms: Option<i64>,
}

impl Gathered {
    /// Nothing to apply, acknowledge or record.
    pub(super) fn is_empty(&self) -> bool {
        self.changes.is_empty() && self.ends.is_empty() && self.floor.is_none()
    }

    /// The newest stamp among the changes (the clock's receive event).
    pub(super) fn newest_stamp(&self) -> u64 {
        self.changes
            .iter()
            .map(|c| c.hlc.max(c.tx_hlc))
            .max()
            .unwrap_or(0) as u64
    }
}

/// A batch, or a floor (no changes), waiting in the queue.
struct Queued {
    /// What the first change follows (none for a floor).
    after: Option<Position>,
    changes: Vec<Change>,
    deps: Vec<Deps>,
    floor: Option<i64>,
    caught_up: Option<i64>,
    /// The batch's last position (none for a floor).
    end: Option<Position>,
}

#[derive(Default)]
pub(super) struct Queue {
    items: VecDeque<Queued>,
    changes: usize,
}

impl Queue {
    pub(super) fn push_batch(
        &mut self,
        after: Option<Position>,
        changes: Vec<Change>,
        deps: Vec<Deps>,
        floor: Option<i64>,
        caught_up: Option<i64>,
    ) {
        self.changes += changes.len();
        let end = changes.last().map(Change::position);
        self.items.push_back(Queued {
            after,
            changes,
            deps,
            floor,
            caught_up,
            end,
        });
    }

    /// A floor holds once everything queued before it is applied.
    pub(super) fn push_floor(&mut self, hlc: i64, caught_up: Option<i64>) {
        self.push_batch(None, Vec::new(), Vec::new(), Some(hlc), caught_up);
    }

    pub(super) fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Changes queued.
    pub(super) fn changes(&self) -> usize {
        self.changes
    }

    /// Takes from the front everything whose dependencies `have` (this
    /// region's applied vector) meets, up to about `max` changes (whole
    /// batches, and a prefix of the first that waits). None if the front
    /// waits (or the queue is empty).
    pub(super) fn take_ready(
        &mut self,
        have: &[OriginPosition],
        me: u16,
        origin: u16,
        max: usize,
    ) -> Option<Gathered> {
        let mut gathered = Gathered::default();
        while let Some(front) = self.items.front_mut() {
            if !gathered.changes.is_empty() && gathered.changes.len() + front.changes.len() > max {
                break;
            }
            let ready = ready_prefix(&front.changes, &front.deps, have, me, origin);
            if ready < front.changes.len() {
                if ready > 0 {
                    take_prefix(front, ready, &mut gathered);
                    self.changes -= ready;
                }
                break;
            }
            self.take_front_into(&mut gathered);
        }
        (!gathered.is_empty()).then_some(gathered)
    }

    fn take_front_into(&mut self, gathered: &mut Gathered) {
        let Some(q) = self.items.pop_front() else {
            return;
        };
        self.changes -= q.changes.len();
        if gathered.after.is_none() {
            gathered.after = q.after;
        }
        gathered.changes.extend(q.changes);
        gathered.deps.extend(q.deps);
        gathered.ends.extend(q.end);
        gathered.floor = q.floor.or(gathered.floor);
        gathered.origin_ms = q.caught_up.or(gathered.origin_ms);
    }
}

/// Moves the first `n` changes of `front` (and their dependencies) into
/// `gathered`; what is left then follows the last of them.
fn take_prefix(front: &mut Queued, n: usize, gathered: &mut Gathered) {
    if gathered.after.is_none() {
        gathered.after = front.after;
    }
    let last = front.changes[n - 1].position();
    gathered.changes.extend(front.changes.drain(..n));
    let taken = front.deps.partition_point(|d| d.xid <= last.xid);
    // A transaction split by the cut keeps its entry for its rest too.
    let split = front.changes.first().is_some_and(|c| c.xid == last.xid);
    match split {
        true => gathered.deps.extend(front.deps[..taken].iter().cloned()),
        false => gathered.deps.extend(front.deps.drain(..taken)),
    }
    front.after = Some(last);
}

/// How many of `changes` (in stream order) lead with their dependencies
/// met; `deps` are their capture transactions' dependencies, in xid order.
pub(super) fn ready_prefix(
    changes: &[Change],
    deps: &[Deps],
    have: &[OriginPosition],
    me: u16,
    origin: u16,
) -> usize {
    let mut deps = deps.iter().peekable();
    let mut checked = None;
    for (i, c) in changes.iter().enumerate() {
        if checked == Some(c.xid) {
            continue;
        }
        while deps.peek().is_some_and(|d| d.xid < c.xid) {
            deps.next();
        }
        if let Some(d) = deps.peek().filter(|d| d.xid == c.xid) {
            if !dependencies_met(&d.after, have, me, origin) {
                return i;
            }
        }
        checked = Some(c.xid);
    }
    changes.len()
}

#[cfg(test)]
mod tests;
