//! replication::relay: the changes of other origins this region has
//! applied, kept (in memory, bounded) so they can be shipped on to a peer
//! whose own link to their origin is down. [`super::forward`] ships them;
//! this module only keeps them and answers "what follows position p of
//! origin o, without a gap".
//!
//! Entries are what one apply took (a run of one origin's stream with the
//! position it follows), kept in the order of their last position. Two
//! paths can bring overlapping runs, and two receivers can record out of
//! order, so [`Relay::pending`] walks the entries and stops at the first
//! gap rather than trusting their boundaries. An entry goes once every
//! peer that may need it (all but its origin) has reported it applied, or,
//! past [`RELAY_MAX`] changes in all, oldest first: a peer missing what
//! was dropped gets it from the origin when that link heals.
//!
//! Pure and synchronous, so the queue simulation can drive it too.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use super::protocol::{Change, Deps, Position};
use super::queue::Gathered;

/// Changes kept for relaying, at most, over all origins.
pub const RELAY_MAX: usize = 100_000;

/// One apply's run of an origin's stream.
#[derive(Debug)]
pub struct Entry {
    /// The position the first change follows.
    pub after: Position,
    pub changes: Vec<Change>,
    pub deps: Vec<Deps>,
    pub floor: Option<i64>,
    pub caught_up: Option<i64>,
}

impl Entry {
    pub fn end(&self) -> Position {
        self.changes.last().map_or(self.after, Change::position)
    }

    /// The changes after `from` (which the entry covers).
    pub fn after_position(&self, from: Position) -> &[Change] {
        let start = self.changes.partition_point(|c| c.position() <= from);
        &self.changes[start..]
    }
}

#[derive(Default)]
struct Inner {
    streams: BTreeMap<u16, VecDeque<Arc<Entry>>>,
    /// (peer, origin): how far the peer says it has applied the origin.
    reported: BTreeMap<(u16, u16), Position>,
    changes: usize,
}

/// What this region keeps for relaying. Records nothing when it has fewer
/// than two peers (nobody to relay to).
pub struct Relay {
    peers: Vec<u16>,
    limit: usize,
    inner: Mutex<Inner>,
    recorded: watch::Sender<u64>,
}

impl Relay {
    /// For a region whose peers are `peers`, keeping up to `limit` changes.
    pub fn new(peers: Vec<u16>, limit: usize) -> Relay {
        Relay {
            peers,
            limit,
            inner: Mutex::default(),
            recorded: watch::Sender::new(0),
        }
    }

    fn enabled(&self) -> bool {
        self.peers.len() >= 2
    }

    /// Keeps what one apply of `origin`'s changes took.
    pub(super) fn record(&self, origin: u16, gathered: Gathered) {
        let Some(after) = gathered.after.filter(|_| self.enabled()) else {
            return;
        };
        if gathered.changes.is_empty() {
            return;
        }
        self.insert(
            origin,
            Entry {
                after,
                changes: gathered.changes,
                deps: gathered.deps,
                floor: gathered.floor,
                caught_up: gathered.origin_ms,
            },
        );
    }

    /// Keeps `entry` of `origin`'s stream (unless one kept covers it).
    pub fn insert(&self, origin: u16, entry: Entry) {
        let (after, end) = (entry.after, entry.end());
        {
            let mut inner = self.inner.lock().expect("not poisoned");
            let stream = inner.streams.entry(origin).or_default();
            if stream.iter().any(|e| e.after <= after && e.end() >= end) {
                return;
            }
            let at = stream.partition_point(|e| e.end() <= end);
            let n = entry.changes.len();
            stream.insert(at, Arc::new(entry));
            inner.changes += n;
            self.evict(&mut inner);
        }
        self.recorded.send_modify(|n| *n += 1);
    }

    /// Notes that `peer` has applied `origin` up to `position`.
    pub fn report(&self, peer: u16, origin: u16, position: Position) {
        let mut inner = self.inner.lock().expect("not poisoned");
        let had = inner.reported.entry((peer, origin)).or_default();
        if *had < position {
            *had = position;
            self.evict(&mut inner);
        }
    }

    /// The entries that follow `from` in `origin`'s stream without a gap,
    /// up to about `most` changes, in order.
    pub fn pending(&self, origin: u16, from: Position, most: usize) -> Vec<Arc<Entry>> {
        let inner = self.inner.lock().expect("not poisoned");
        let mut out = Vec::new();
        let (mut at, mut n) = (from, 0);
        for e in inner.streams.get(&origin).into_iter().flatten() {
            if e.end() <= at {
                continue;
            }
            if e.after > at || n >= most {
                break;
            }
            n += e.after_position(at).len();
            at = e.end();
            out.push(e.clone());
        }
        out
    }

    /// Whether `origin`'s stream is kept from `from` on (a peer at `from`
    /// can be brought up to date from here).
    pub fn covers(&self, origin: u16, from: Position) -> bool {
        let inner = self.inner.lock().expect("not poisoned");
        inner
            .streams
            .get(&origin)
            .and_then(|s| s.iter().find(|e| e.end() > from))
            .map_or(true, |e| e.after <= from)
    }

    /// Changes kept now.
    pub fn changes(&self) -> usize {
        self.inner.lock().expect("not poisoned").changes
    }

    /// Moves whenever something is recorded.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.recorded.subscribe()
    }

    fn evict(&self, inner: &mut Inner) {
        let Inner {
            streams,
            reported,
            changes,
        } = inner;
        for (&origin, stream) in streams.iter_mut() {
            // How far every peer that may need this origin has applied it.
            let everyone = self
                .peers
                .iter()
                .filter(|&&p| p != origin)
                .map(|&p| reported.get(&(p, origin)).copied().unwrap_or_default())
                .min()
                .unwrap_or_default();
            while stream.front().is_some_and(|e| e.end() <= everyone) {
                let e = stream.pop_front().expect("a front");
                *changes -= e.changes.len();
            }
        }
        while *changes > self.limit {
            let oldest = streams
                .values_mut()
                .filter(|s| !s.is_empty())
                .max_by_key(|s| s.iter().map(|e| e.changes.len()).sum::<usize>());
            let Some(e) = oldest.and_then(|s| s.pop_front()) else {
                break;
            };
            *changes -= e.changes.len();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication::protocol::Operation;

    fn entry(after: u64, last: u64) -> Entry {
        Entry {
            after: Position { xid: after, seq: 0 },
            changes: (after + 1..=last)
                .map(|x| Change::bare(x, 0, x as i64, Operation::Insert))
                .collect(),
            deps: Vec::new(),
            floor: None,
            caught_up: None,
        }
    }

    fn at(xid: u64) -> Position {
        Position { xid, seq: 0 }
    }

    fn ends(v: &[Arc<Entry>]) -> Vec<u64> {
        v.iter().map(|e| e.end().xid).collect()
    }

    #[test]
    fn pending_runs_follow_the_position_and_stop_at_a_gap() {
        let relay = Relay::new(vec![1, 2, 3], 1000);
        // Recorded out of order, overlapping, with a gap after 9.
        relay.insert(1, entry(5, 9));
        relay.insert(1, entry(0, 3));
        relay.insert(1, entry(2, 6));
        relay.insert(1, entry(12, 15));
        assert_eq!(ends(&relay.pending(1, at(0), 100)), [3, 6, 9]);
        assert_eq!(ends(&relay.pending(1, at(4), 100)), [6, 9]);
        assert_eq!(
            relay.pending(1, at(4), 100)[0].after_position(at(4)).len(),
            2
        );
        assert!(
            relay.pending(1, at(10), 100).is_empty(),
            "10 to 12 is missing"
        );
        assert!(!relay.covers(1, at(10)));
        assert!(relay.covers(1, at(12)));
        assert_eq!(ends(&relay.pending(1, at(0), 3)), [3]);
        // A run covered by one kept is not kept again.
        let before = relay.changes();
        relay.insert(1, entry(6, 8));
        assert_eq!(relay.changes(), before);
    }

    #[test]
    fn entries_go_once_every_other_peer_has_them_or_past_the_bound() {
        // This region's peers: 1 (the origin), 2 and 3.
        let relay = Relay::new(vec![1, 2, 3], 10);
        relay.insert(1, entry(0, 4));
        relay.insert(1, entry(4, 8));
        relay.report(2, 1, at(8));
        assert_eq!(relay.changes(), 8, "3 may still need them");
        relay.report(3, 1, at(5));
        assert_eq!(relay.changes(), 4, "everyone has 1 to 4");
        assert_eq!(ends(&relay.pending(1, at(5), 100)), [8]);
        relay.report(3, 1, at(8));
        assert_eq!(relay.changes(), 0);
        relay.insert(1, entry(8, 14));
        relay.insert(1, entry(14, 20));
        assert_eq!(relay.changes(), 6, "the bound drops the oldest");
        assert!(!relay.covers(1, at(8)));
    }

    #[test]
    fn a_region_with_one_peer_keeps_nothing() {
        let relay = Relay::new(vec![1], 1000);
        let gathered = Gathered {
            after: Some(at(0)),
            changes: entry(0, 3).changes,
            ..Gathered::default()
        };
        relay.record(1, gathered);
        assert_eq!(relay.changes(), 0);
    }
}
