use proptest::prelude::*;

use super::*;
use crate::replication::protocol::Operation;

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

/// A batch in transit: its changes and their dependencies.
type Batch = (Vec<Change>, Vec<Deps>);

/// A simulated cluster: every region writes transactions whose
/// dependencies are its applied vector at the time, ships them in batches
/// to every other region, which queues and applies them through [`Queue`].
struct Sim {
    n: usize,
    /// Per region, its own transactions' dependencies (index = number - 1).
    log: Vec<Vec<Vec<OriginPosition>>>,
    /// applied[r][o]: how many of o's transactions r has applied.
    applied: Vec<Vec<u64>>,
    /// shipped[o][r]: how many of o's transactions were sent to r.
    shipped: Vec<Vec<u64>>,
    /// In transit o -> r, oldest first: (changes, deps).
    wire: Vec<Vec<VecDeque<Batch>>>,
    queues: Vec<Vec<Queue>>,
}

impl Sim {
    fn new(n: usize) -> Sim {
        Sim {
            n,
            log: vec![Vec::new(); n],
            applied: vec![vec![0; n]; n],
            shipped: vec![vec![0; n]; n],
            wire: (0..n)
                .map(|_| (0..n).map(|_| VecDeque::new()).collect())
                .collect(),
            queues: (0..n)
                .map(|_| (0..n).map(|_| Queue::default()).collect())
                .collect(),
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
        self.wire[o][r].push_back((changes, deps));
        self.shipped[o][r] = to;
    }

    fn deliver(&mut self, o: usize, r: usize) {
        if let Some((changes, deps)) = self.wire[o][r].pop_front() {
            self.queues[r][o].push_batch(None, changes, deps, None, None);
        }
    }

    /// Applies what region r's queue for o lets through; returns how many.
    fn apply(&mut self, r: usize, o: usize, max: usize) -> usize {
        let have = self.vector(r);
        let Some(g) = self.queues[r][o].take_ready(&have, Sim::id(r), Sim::id(o), max) else {
            return 0;
        };
        for c in &g.changes {
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
        // Nothing applicable is left at the front (unless the limit stopped it).
        if let Some(front) = self.queues[r][o].items.front() {
            let have = self.vector(r);
            let ready = ready_prefix(&front.changes, &front.deps, &have, Sim::id(r), Sim::id(o));
            assert!(ready == 0 || g.changes.len() + front.changes.len() > max);
        }
        g.changes.len()
    }
}

#[derive(Debug, Clone)]
enum Step {
    Write(usize),
    Ship(usize, usize, u64),
    Deliver(usize, usize),
    Apply(usize, usize),
}

fn steps(n: usize) -> impl Strategy<Value = Vec<Step>> {
    let step = prop_oneof![
        (0..n).prop_map(Step::Write),
        (0..n, 0..n, 1u64..4).prop_map(|(o, r, k)| Step::Ship(o, r, k)),
        (0..n, 0..n).prop_map(|(o, r)| Step::Deliver(o, r)),
        (0..n, 0..n).prop_map(|(r, o)| Step::Apply(r, o)),
    ];
    proptest::collection::vec(step, 0..200)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Any interleaving of writes, shipping, delivery and applies: every
    /// region applies every change once, in order, never before its
    /// dependencies, and once everything is delivered nothing is left
    /// waiting (no wait that only a time bound would end).
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
                Step::Apply(r, o) if o < n && r < n && o != r => { sim.apply(r, o, max); }
                _ => {}
            }
        }
        // Then every link delivers everything, and regions apply until
        // nothing moves.
        loop {
            for o in 0..n {
                for r in 0..n {
                    sim.ship(o, r, u64::MAX);
                    while !sim.wire[o][r].is_empty() {
                        sim.deliver(o, r);
                    }
                }
            }
            let mut moved = 0;
            for r in 0..n {
                for o in (0..n).filter(|&o| o != r) {
                    moved += sim.apply(r, o, max);
                }
            }
            if moved == 0 {
                break;
            }
        }
        for r in 0..n {
            for o in (0..n).filter(|&o| o != r) {
                prop_assert_eq!(sim.applied[r][o], sim.log[o].len() as u64, "region {} has all of {}", r, o);
                prop_assert!(sim.queues[r][o].is_empty());
            }
        }
    }
}
