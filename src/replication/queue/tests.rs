use proptest::prelude::*;

use super::*;
use crate::replication::protocol::Operation;
use crate::replication::relay::Relay;

fn change(xid: u64) -> Change {
    Change::bare(xid, xid as i64, xid as i64, Operation::Insert)
}

fn at(origin: u16, n: u64) -> OriginPosition {
    OriginPosition {
        origin,
        position: Position {
            xid: n,
            seq: n as i64,
        },
    }
}

#[test]
fn a_batch_is_applied_up_to_the_transaction_that_waits() {
    // From region 2 to region 1; region 3 is the third region.
    let mut q = Queue::default();
    let deps = vec![
        Deps {
            xid: 11,
            after: vec![at(3, 5)],
        },
        Deps {
            xid: 12,
            after: vec![at(3, 9), at(1, 100)],
        },
    ];
    q.push_batch(
        Some(Position { xid: 9, seq: 0 }),
        vec![change(10), change(11), change(12)],
        deps,
        Some(7),
        None,
    );
    q.push_floor(8, Some(1));
    let g = q.take_ready(&[], 1, 2, 100).unwrap();
    assert!(g.changes.len() == 1 && g.ends.is_empty() && g.deps.is_empty());
    assert_eq!(g.after, Some(Position { xid: 9, seq: 0 }));
    assert!(
        q.take_ready(&[at(3, 4)], 1, 2, 100).is_none(),
        "11 waits for 3's 5th"
    );
    let g = q.take_ready(&[at(3, 5)], 1, 2, 100).unwrap();
    assert_eq!(g.changes.len(), 1);
    assert_eq!(q.changes(), 1);
    // Each part follows the one before it and carries its own dependencies.
    assert_eq!(g.after, Some(Position { xid: 10, seq: 10 }));
    assert_eq!(g.deps.iter().map(|d| d.xid).collect::<Vec<_>>(), [11]);
    // Its own position (1) is not a dependency; 3's 9th is.
    let g = q.take_ready(&[at(3, 9)], 1, 2, 100).unwrap();
    assert_eq!(g.changes.len(), 1);
    assert_eq!(g.ends, [Position { xid: 12, seq: 12 }]);
    assert_eq!(g.after, Some(Position { xid: 11, seq: 11 }));
    assert_eq!(g.deps.iter().map(|d| d.xid).collect::<Vec<_>>(), [12]);
    assert_eq!(
        (g.floor, g.origin_ms),
        (Some(8), Some(1)),
        "the floor behind the batch comes with it"
    );
    assert!(q.is_empty());
}

#[test]
fn whole_batches_are_gathered_up_to_the_limit() {
    let mut q = Queue::default();
    for x in 0..5 {
        q.push_batch(
            None,
            vec![change(2 * x), change(2 * x + 1)],
            Vec::new(),
            None,
            None,
        );
    }
    let g = q.take_ready(&[], 1, 2, 5).unwrap();
    assert_eq!(g.changes.len(), 4);
    assert_eq!(g.ends.len(), 2);
    assert_eq!(q.take_ready(&[], 1, 2, 2).unwrap().changes.len(), 2);
    assert_eq!(q.changes(), 4);
}

/// A batch in transit: what it follows, its changes and their dependencies.
type Batch = (u64, Vec<Change>, Vec<Deps>);

fn pos(n: u64) -> Position {
    Position {
        xid: n,
        seq: n as i64,
    }
}

/// A simulated cluster: every region writes transactions whose
/// dependencies are its applied vector at the time, ships them in batches
/// to every other region, which queues and applies them through [`Queue`],
/// skipping what it has and refusing a gap as the apply does; and each
/// region keeps what it applied in a [`Relay`] that a third region's relay
/// link draws on (`relay_queues[r][o]`: o's changes relayed to r).
struct Sim {
    n: usize,
    /// Per region, its own transactions' dependencies (index = number - 1).
    log: Vec<Vec<Vec<OriginPosition>>>,
    /// applied[r][o]: how many of o's transactions r has applied.
    applied: Vec<Vec<u64>>,
    /// shipped[o][r]: how many of o's transactions were sent to r.
    shipped: Vec<Vec<u64>>,
    /// In transit o -> r, oldest first.
    wire: Vec<Vec<VecDeque<Batch>>>,
    queues: Vec<Vec<Queue>>,
    relays: Vec<Relay>,
    relay_queues: Vec<Vec<Queue>>,
    /// relay_sent[r][o]: how far o's changes were relayed to r (as a relay
    /// link remembers what it sent).
    relay_sent: Vec<Vec<u64>>,
}

impl Sim {
    fn new(n: usize) -> Sim {
        let grid = || -> Vec<Vec<Queue>> {
            (0..n)
                .map(|_| (0..n).map(|_| Queue::default()).collect())
                .collect()
        };
        Sim {
            n,
            log: vec![Vec::new(); n],
            applied: vec![vec![0; n]; n],
            shipped: vec![vec![0; n]; n],
            wire: (0..n)
                .map(|_| (0..n).map(|_| VecDeque::new()).collect())
                .collect(),
            queues: grid(),
            relays: (0..n)
                .map(|r| {
                    let peers = (0..n).filter(|&p| p != r).map(Sim::id).collect();
                    Relay::new(peers, usize::MAX)
                })
                .collect(),
            relay_queues: grid(),
            relay_sent: vec![vec![0; n]; n],
        }
    }

    fn id(r: usize) -> u16 {
        r as u16 + 1
    }

    fn vector(&self, r: usize) -> Vec<OriginPosition> {
        (0..self.n)
            .filter(|&o| o != r && self.applied[r][o] > 0)
            .map(|o| at(Sim::id(o), self.applied[r][o]))
            .collect()
    }

    fn write(&mut self, r: usize) {
        let deps = self.vector(r);
        self.log[r].push(deps);
    }

    fn ship(&mut self, o: usize, r: usize, most: u64) {
        let from = self.shipped[o][r];
        let to = from.saturating_add(most).min(self.log[o].len() as u64);
        if to == from || o == r {
            return;
        }
        let changes = (from + 1..=to).map(change).collect();
        let deps = (from + 1..=to)
            .map(|x| Deps {
                xid: x,
                after: self.log[o][x as usize - 1].clone(),
            })
            .filter(|d| !d.after.is_empty())
            .collect();
        self.wire[o][r].push_back((from, changes, deps));
        self.shipped[o][r] = to;
    }

    fn deliver(&mut self, o: usize, r: usize) {
        if let Some((after, changes, deps)) = self.wire[o][r].pop_front() {
            self.queues[r][o].push_batch(Some(pos(after)), changes, deps, None, None);
        }
    }

    /// Region `via`'s relay link to `r` sends what it keeps of `o` after
    /// what `r` has applied (at most `most` runs).
    fn relay(&mut self, via: usize, o: usize, r: usize, most: usize) {
        if via == o || via == r || o == r {
            return;
        }
        let mut from = pos(self.applied[r][o].max(self.relay_sent[r][o]));
        let entries = self.relays[via].pending(Sim::id(o), from, usize::MAX);
        for e in entries.into_iter().take(most) {
            let changes = e.after_position(from).to_vec();
            self.relay_queues[r][o].push_batch(Some(from), changes, e.deps.clone(), None, None);
            from = e.end();
        }
        self.relay_sent[r][o] = from.xid;
    }

    /// Applies what region r's queue for o (or its relayed queue) lets
    /// through; returns how many changes it took.
    fn apply(&mut self, r: usize, o: usize, max: usize, relayed: bool) -> usize {
        let have = self.vector(r);
        let queue = match relayed {
            false => &mut self.queues[r][o],
            true => &mut self.relay_queues[r][o],
        };
        let Some(g) = queue.take_ready(&have, Sim::id(r), Sim::id(o), max) else {
            return 0;
        };
        // Nothing applicable is left at the front (unless the limit stopped it).
        if let Some(front) = queue.items.front() {
            let ready = ready_prefix(&front.changes, &front.deps, &have, Sim::id(r), Sim::id(o));
            assert!(ready == 0 || g.changes.len() + front.changes.len() > max);
        }
        // The apply's gap check: it never finds one here.
        let after = g.after.map_or(0, |a| a.xid);
        assert!(
            after <= self.applied[r][o],
            "region {r} got {o}'s changes after a gap"
        );
        let taken = g.changes.len();
        for c in &g.changes {
            // What it has is skipped (two paths, or one run sent twice).
            if c.xid <= self.applied[r][o] {
                continue;
            }
            // Exactly once, in order.
            assert_eq!(
                c.xid,
                self.applied[r][o] + 1,
                "region {r} applies {o}'s changes in order, once"
            );
            // Never before its dependencies (from every third region).
            for d in &self.log[o][c.xid as usize - 1] {
                let third = d.origin as usize - 1;
                if third != r {
                    assert!(
                        self.applied[r][third] >= d.position.xid,
                        "region {r} applied {o}'s change {} before {third}'s {}",
                        c.xid,
                        d.position.xid
                    );
                }
            }
            self.applied[r][o] = c.xid;
        }
        self.relays[r].record(Sim::id(o), g);
        taken
    }
}

#[derive(Debug, Clone)]
enum Step {
    Write(usize),
    Ship(usize, usize, u64),
    Deliver(usize, usize),
    Apply(usize, usize, bool),
    Relay(usize, usize, usize),
}

fn steps(n: usize) -> impl Strategy<Value = Vec<Step>> {
    let step = prop_oneof![
        (0..n).prop_map(Step::Write),
        (0..n, 0..n, 1u64..4).prop_map(|(o, r, k)| Step::Ship(o, r, k)),
        (0..n, 0..n).prop_map(|(o, r)| Step::Deliver(o, r)),
        (0..n, 0..n, any::<bool>()).prop_map(|(r, o, relayed)| Step::Apply(r, o, relayed)),
        (0..n, 0..n, 0..n).prop_map(|(v, o, r)| Step::Relay(v, o, r)),
    ];
    proptest::collection::vec(step, 0..200)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Any interleaving of writes, shipping, delivery, relaying and
    /// applies: every region applies every change once, in order, never
    /// before its dependencies. Then, with the link from the first region
    /// to the last cut for good (three regions or more), every other link
    /// delivers everything and relay links carry the rest: every region
    /// ends with everything and nothing is left waiting (no wait that only
    /// a time bound would end).
    #[test]
    fn every_region_applies_every_change_once_and_never_early(
        n in 2usize..5,
        script in steps(4),
        max in 1usize..6,
    ) {
        let mut sim = Sim::new(n);
        for step in script {
            match step {
                Step::Write(r) if r < n => sim.write(r),
                Step::Ship(o, r, k) if o < n && r < n => sim.ship(o, r, k),
                Step::Deliver(o, r) if o < n && r < n => sim.deliver(o, r),
                Step::Apply(r, o, relayed) if o < n && r < n && o != r => { sim.apply(r, o, max, relayed); }
                Step::Relay(v, o, r) if v < n && o < n && r < n => sim.relay(v, o, r, 1),
                _ => {}
            }
        }
        let cut = |o: usize, r: usize| n >= 3 && o == 0 && r == n - 1;
        loop {
            for o in 0..n {
                for r in (0..n).filter(|&r| !cut(o, r)) {
                    sim.ship(o, r, u64::MAX);
                    while !sim.wire[o][r].is_empty() {
                        sim.deliver(o, r);
                    }
                }
            }
            let mut moved = 0;
            for r in 0..n {
                for o in (0..n).filter(|&o| o != r) {
                    if cut(o, r) {
                        sim.relay(1, o, r, usize::MAX);
                    }
                    moved += sim.apply(r, o, max, false);
                    moved += sim.apply(r, o, max, true);
                }
            }
            if moved == 0 {
                break;
            }
        }
        for r in 0..n {
            for o in (0..n).filter(|&o| o != r) {
                prop_assert_eq!(sim.applied[r][o], sim.log[o].len() as u64, "region {} has all of {}", r, o);
                prop_assert!(sim.queues[r][o].is_empty() || cut(o, r));
            }
        }
    }
}
