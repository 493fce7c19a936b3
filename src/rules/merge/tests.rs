use super::*;
use proptest::prelude::*;
use serde_json::json;

fn v(hlc: u64, region: u16) -> Version {
    Version { hlc, region }
}

fn row(value: Value) -> Row {
    value.as_object().unwrap().clone()
}

fn engine(policy: Policy, columns: Vec<(&str, ColumnRule)>) -> Engine {
    Engine {
        policy,
        function: None,
        priority: vec![3, 1],
        deletes: None,
        columns: columns.into_iter().map(|(c, r)| (c.into(), r)).collect(),
    }
}

fn base() -> Stored {
    Stored {
        version: v(100, 1),
        winner: v(100, 1),
        gen: 0,
        tag: v(100, 1),
        epoch: 0,
        deleted: false,
        row: row(
            json!({"id": 1, "name": "base", "n": 10, "hi": 5, "tags": ["a"], "st": "created", "a": "a0", "b": "b0"}),
        ),
        cols: Cols::new(),
    }
}

/// Whether a local write from `old` to `new` keeps the grow-only merged
/// columns growing (capture refuses it otherwise; see the module docs).
/// Returns the first column that would move back.
fn shrinks<'a>(engine: &'a Engine, old: &Row, new: &Row) -> Option<&'a str> {
    let null = Value::Null;
    engine.columns.iter().find_map(|(column, rule)| {
        let (o, n) = (
            old.get(column).unwrap_or(&null),
            new.get(column).unwrap_or(&null),
        );
        let grown = match rule {
            ColumnRule::Max => pick(o, n, Ordering::Greater) == *n,
            ColumnRule::Min => pick(o, n, Ordering::Less) == *n,
            ColumnRule::Union => union(o, n) == union(n, &null),
            ColumnRule::States(states) => state_rank(states, n) >= state_rank(states, o),
            ColumnRule::Counter | ColumnRule::LastWriterWins => true,
        };
        (!grown).then_some(column.as_str())
    })
}

/// What capture records for a write at `version` on top of `on` (None:
/// a key new in that region): `set` holds the new values (None: a
/// delete). `lww` and `counters` name the merged columns whose metadata
/// capture keeps.
fn write_with(
    on: Option<&Stored>,
    version: Version,
    set: Option<&Value>,
    lww: &[&str],
    counters: &[&str],
) -> Incoming {
    let live = on.filter(|s| !s.deleted);
    let mut r = live.map(|s| s.row.clone()).unwrap_or_default();
    let mut cols = live.map(|s| s.cols.clone()).unwrap_or_default();
    if let Some(set) = set {
        for (k, x) in set.as_object().unwrap() {
            r.insert(k.clone(), x.clone());
        }
    }
    for c in lww {
        // Capture keeps a version for every such column: a changed
        // one gets this write's, the others keep theirs (or the
        // winner's, on rows from before the rule).
        match live {
            Some(s) if s.row.get(*c) == r.get(*c) => {
                cols.entry(c.to_string())
                    .or_insert(ColMeta::Version(s.winner));
            }
            _ => {
                cols.insert(c.to_string(), ColMeta::Version(version));
            }
        }
    }
    for c in counters {
        let mut t = match live {
            Some(s) => into_totals(
                s.cols.get(*c).cloned(),
                s.row.get(*c).unwrap_or(&Value::Null),
            ),
            None => BTreeMap::new(),
        };
        let old = live
            .and_then(|s| s.row.get(*c))
            .cloned()
            .unwrap_or(Value::Null);
        let new = r.get(*c).cloned().unwrap_or(Value::Null);
        let mine = t
            .get(&version.region)
            .map_or(Value::from(0), |(_, x)| x.clone());
        t.insert(version.region, (version.hlc, add(&mine, &sub(&new, &old))));
        cols.insert(c.to_string(), ColMeta::Totals(t));
    }
    let (gen, tag) = match on {
        None => (0, version),
        Some(s) if s.deleted => (s.gen + 1, version),
        Some(s) => (s.gen, s.tag),
    };
    Incoming {
        version,
        base: on.map(|s| s.version),
        gen,
        tag,
        epoch: on.map_or(0, |s| s.epoch + 1),
        deleted: set.is_none(),
        row: if set.is_some() { r } else { Row::new() },
        cols: if set.is_some() { cols } else { Cols::new() },
    }
}

fn write(on: Option<&Stored>, version: Version, set: Option<&Value>, lww: &[&str]) -> Incoming {
    write_with(on, version, set, lww, &["n"])
}

/// An update on top of `base()` made in `region` at `hlc`.
fn update(hlc: u64, region: u16, set: Value) -> Incoming {
    write(Some(&base()), v(hlc, region), Some(&set), &["a", "b"])
}

fn delete(hlc: u64, region: u16) -> Incoming {
    write(Some(&base()), v(hlc, region), None, &["a", "b"])
}

/// What the region where `c` was written holds right after it.
fn written(c: &Incoming) -> Stored {
    Stored::from(c.clone())
}

#[test]
fn a_change_made_on_top_of_the_local_row_simply_applies() {
    let e = engine(Policy::FirstWriterWins, vec![("n", ColumnRule::Counter)]);
    let c = update(200, 2, json!({"name": "new", "n": 11}));
    let r = e.resolve(Some(base()), c.clone());
    assert_eq!(r.conflict, None);
    assert_eq!(r.stored, written(&c));
    // A resend of what is already here changes nothing.
    let again = e.resolve(Some(r.stored.clone()), c.clone());
    assert!(!again.changed);
}

#[test]
fn policies_pick_the_rows_they_promise() {
    let a = update(200, 1, json!({"name": "from 1"}));
    let b = update(300, 2, json!({"name": "from 2"}));
    let c = update(250, 3, json!({"name": "from 3"}));
    let name = |e: &Engine, local: &Incoming, remote: &Incoming| {
        e.resolve(Some(written(local)), remote.clone()).stored.row["name"].clone()
    };
    let lww = engine(Policy::LastWriterWins, vec![]);
    assert_eq!(name(&lww, &a, &b), "from 2");
    assert_eq!(name(&lww, &b, &a), "from 2");
    let fww = engine(Policy::FirstWriterWins, vec![]);
    assert_eq!(name(&fww, &a, &b), "from 1");
    assert_eq!(name(&fww, &b, &a), "from 1");
    let prio = engine(Policy::RegionPriority, vec![]); // 3, then 1, then the rest
    assert_eq!(name(&prio, &b, &c), "from 3");
    assert_eq!(name(&prio, &c, &a), "from 3");
    assert_eq!(name(&prio, &a, &b), "from 1");
    let keep = engine(Policy::KeepLocal, vec![]);
    assert_eq!(name(&keep, &a, &b), "from 1");
    assert_eq!(name(&keep, &b, &a), "from 2");
    let r = prio.resolve(Some(written(&a)), b.clone());
    assert_eq!(
        r.stored.version,
        v(300, 2),
        "the identity is the larger version"
    );
    assert_eq!(r.stored.winner, v(200, 1));
    assert_eq!(
        r.conflict,
        Some(Conflict {
            rule: "region-priority",
            kept: Side::Local,
            merged: vec![]
        })
    );
}

#[test]
fn first_writer_wins_keeps_the_first_insert_and_its_later_updates() {
    let fww = engine(Policy::FirstWriterWins, vec![]);
    // Two regions insert the key; the later one also updates its row
    // before it hears of the other.
    let first = write(None, v(100, 1), Some(&json!({"name": "first"})), &[]);
    let second = write(None, v(120, 2), Some(&json!({"name": "second"})), &[]);
    let second_again = write(
        Some(&written(&second)),
        v(130, 2),
        Some(&json!({"name": "second, edited"})),
        &[],
    );
    // Region 1 gets both of region 2's writes; region 2 gets region 1's.
    let at1 = fww.resolve(Some(written(&first)), second.clone()).stored;
    let at1 = fww.resolve(Some(at1), second_again.clone()).stored;
    let at2 = fww
        .resolve(Some(written(&second_again)), first.clone())
        .stored;
    assert_eq!(at1, at2);
    assert_eq!(at1.row["name"], "first");
    // An edit of the winning row, made on top of it anywhere, applies.
    let edit = write(
        Some(&at2),
        v(200, 2),
        Some(&json!({"name": "first, edited"})),
        &[],
    );
    assert_eq!(
        fww.resolve(Some(at1), edit).stored.row["name"],
        "first, edited"
    );
}

#[test]
fn merged_columns_combine_both_sides() {
    let e = engine(
        Policy::LastWriterWins,
        vec![
            ("n", ColumnRule::Counter),
            ("hi", ColumnRule::Max),
            ("tags", ColumnRule::Union),
            (
                "st",
                ColumnRule::States(vec!["created".into(), "paid".into(), "shipped".into()]),
            ),
        ],
    );
    let a = update(
        200,
        1,
        json!({"n": 13, "hi": 9, "tags": ["b"], "st": "shipped"}),
    );
    let b = update(
        300,
        2,
        json!({"n": 4, "hi": 7, "tags": ["a", "c"], "st": "paid"}),
    );
    let r = e.resolve(Some(written(&a)), b.clone());
    assert_eq!(
        Value::Object(r.stored.row.clone()),
        json!({"id": 1, "name": "base", "n": 7, "hi": 9, "tags": ["a", "b", "c"], "st": "shipped", "a": "a0", "b": "b0"})
    );
    assert_eq!(r.conflict.unwrap().merged, [0, 1, 2, 3]);
}

#[test]
fn concurrent_edits_of_different_columns_both_survive() {
    let e = engine(
        Policy::LastWriterWins,
        vec![
            ("a", ColumnRule::LastWriterWins),
            ("b", ColumnRule::LastWriterWins),
        ],
    );
    let x = update(200, 1, json!({"a": "a1"}));
    let y = update(300, 2, json!({"b": "b2"}));
    let at1 = e.resolve(Some(written(&x)), y.clone()).stored;
    let at2 = e.resolve(Some(written(&y)), x.clone()).stored;
    assert_eq!(at1, at2);
    assert_eq!((&at1.row["a"], &at1.row["b"]), (&json!("a1"), &json!("b2")));
}

#[test]
fn column_versions_are_those_of_the_write_that_changed_the_column() {
    // The counter-example to inferring column versions: region 1 writes
    // a at 200, then b at 400; region 2 writes a at 300 concurrently.
    // a must end as region 2's value everywhere (300 > 200).
    let e = engine(
        Policy::LastWriterWins,
        vec![
            ("a", ColumnRule::LastWriterWins),
            ("b", ColumnRule::LastWriterWins),
        ],
    );
    let a1 = update(200, 1, json!({"a": "a1"}));
    let b1 = write(
        Some(&written(&a1)),
        v(400, 1),
        Some(&json!({"b": "b1"})),
        &["a", "b"],
    );
    let a2 = update(300, 2, json!({"a": "a2"}));
    let at1 = e.resolve(Some(written(&b1)), a2.clone()).stored;
    let at2 = e.resolve(Some(written(&a2)), a1).stored;
    let at2 = e.resolve(Some(at2), b1).stored;
    assert_eq!(at1, at2);
    assert_eq!((&at1.row["a"], &at1.row["b"]), (&json!("a2"), &json!("b1")));
}

#[test]
fn deletes_follow_their_rule() {
    let mut e = engine(Policy::LastWriterWins, vec![]);
    let u = update(300, 2, json!({"name": "x"}));
    let d = delete(200, 1);
    assert!(
        !e.resolve(Some(written(&d)), u.clone()).stored.deleted,
        "newer update wins"
    );
    e.deletes = Some(Deletes::DeleteWins);
    assert!(e.resolve(Some(written(&d)), u.clone()).stored.deleted);
    assert!(e.resolve(Some(written(&u)), d.clone()).stored.deleted);
    e.deletes = Some(Deletes::UpdateWins);
    let r = e.resolve(Some(written(&u)), d.clone());
    assert!(!r.stored.deleted);
    assert_eq!(r.conflict.unwrap().rule, "update-wins");
    // A delete made on top of the update is no conflict: it applies.
    let after = write(Some(&written(&u)), v(400, 1), None, &[]);
    assert!(e.resolve(Some(written(&u)), after).stored.deleted);
}

#[test]
fn values_merge_sensibly() {
    assert_eq!(add(&json!(2), &json!(3)), json!(5));
    assert_eq!(add(&json!(null), &json!(3)), json!(3));
    assert_eq!(add(&json!(1.5), &json!(1)), json!(2.5));
    assert_eq!(
        sub(&json!(i64::MIN), &json!(1)),
        json!(i64::MIN as f64 - 1.0)
    );
    assert_eq!(pick(&json!(null), &json!(1), Ordering::Less), json!(1));
    assert_eq!(pick(&json!(2), &json!(10), Ordering::Greater), json!(10));
    assert_eq!(pick(&json!("b"), &json!("a"), Ordering::Less), json!("a"));
    assert_eq!(union(&json!(null), &json!(null)), json!(null));
    assert_eq!(union(&json!([3, 1]), &json!([2, 1])), json!([1, 2, 3]));
}

const LWW: [&str; 2] = ["a", "b"];

fn arb_engine() -> impl Strategy<Value = Engine> {
    let policy = prop_oneof![
        Just(Policy::LastWriterWins),
        Just(Policy::FirstWriterWins),
        Just(Policy::RegionPriority),
    ];
    let deletes = prop_oneof![
        Just(None),
        Just(Some(Deletes::DeleteWins)),
        Just(Some(Deletes::UpdateWins)),
    ];
    (
        policy,
        deletes,
        prop::bool::ANY,
        proptest::sample::subsequence(vec![1u16, 2, 3, 4], 0..=4),
    )
        .prop_map(|(policy, deletes, merges, priority)| {
            let columns = if merges {
                vec![
                    ("n".to_string(), ColumnRule::Counter),
                    ("hi".to_string(), ColumnRule::Max),
                    ("tags".to_string(), ColumnRule::Union),
                    (
                        "st".to_string(),
                        ColumnRule::States(vec!["created".into(), "paid".into(), "shipped".into()]),
                    ),
                    ("a".to_string(), ColumnRule::LastWriterWins),
                    ("b".to_string(), ColumnRule::LastWriterWins),
                ]
            } else {
                vec![]
            };
            Engine {
                policy,
                function: None,
                priority,
                // As TableRule::engine compiles it: merged columns
                // need delete-wins (see the module docs).
                deletes: if columns.is_empty() {
                    deletes
                } else {
                    Some(Deletes::DeleteWins)
                },
                columns,
            }
        })
}

/// What one write sets (None: a delete).
fn arb_set() -> impl Strategy<Value = Option<Value>> {
    (
        prop::bool::weighted(0.2),
        -5i64..20,
        0i64..30,
        proptest::sample::subsequence(vec!["a", "b", "c", "d"], 0..=3),
        proptest::sample::select(vec!["created", "paid", "shipped", "lost"]),
        proptest::sample::subsequence(vec!["name", "n", "hi", "tags", "st", "a", "b"], 1..=3),
        0u8..4,
    )
        .prop_map(|(is_delete, n, hi, tags, st, which, value)| {
            (!is_delete).then(|| {
                let all = json!({"name": format!("x{value}"), "n": n, "hi": hi, "tags": tags,
                                     "st": st, "a": format!("a{value}"), "b": format!("b{value}")});
                Value::Object(
                    which
                        .iter()
                        .map(|k| (k.to_string(), all[k].clone()))
                        .collect(),
                )
            })
        })
}

/// One step of a simulated cluster of 3 regions sharing one key: region
/// `region` writes (`Some`), or receives the next change it has not
/// seen from region `from` (`None`).
#[derive(Debug, Clone)]
enum Step {
    Write { region: usize, set: Option<Value> },
    Receive { region: usize, from: usize },
}

fn arb_steps() -> impl Strategy<Value = Vec<Step>> {
    let step = prop_oneof![
        (0usize..3, arb_set()).prop_map(|(region, set)| Step::Write { region, set }),
        (0usize..3, 1usize..3).prop_map(|(region, d)| Step::Receive {
            region,
            from: (region + d) % 3
        }),
    ];
    proptest::collection::vec(step, 1..24)
}

/// Runs the steps, then delivers everything still in flight (each
/// origin's changes in order, as the replication stream does).
fn simulate(engine: &Engine, steps: &[Step], deliver_order: &[usize]) -> Vec<Option<Stored>> {
    let (lww, counters): (&[&str], &[&str]) = if engine.columns.is_empty() {
        (&[], &[])
    } else {
        (&LWW, &["n"])
    };
    let mut state: Vec<Option<Stored>> = vec![Some(base()), Some(base()), Some(base())];
    let mut log: Vec<Vec<Incoming>> = vec![Vec::new(); 3];
    let mut next = [[0usize; 3]; 3]; // next[r][from]: next index of from's log r has not applied
    let mut clock = [100u64; 3];
    let receive = |state: &mut Vec<Option<Stored>>,
                   next: &mut [[usize; 3]; 3],
                   clock: &mut [u64; 3],
                   log: &Vec<Vec<Incoming>>,
                   r: usize,
                   from: usize| {
        if let Some(c) = log[from].get(next[r][from]) {
            next[r][from] += 1;
            clock[r] = clock[r].max(c.version.hlc);
            let now = state[r].take();
            state[r] = Some(engine.resolve(now, c.clone()).stored);
        }
    };
    for s in steps {
        match s {
            Step::Write { region, set } => {
                let r = *region;
                // A delete of an absent row, or an update of one, is a no-op;
                // a write to a tombstone is an insert.
                if set.is_none() && state[r].as_ref().map_or(true, |s| s.deleted) {
                    continue;
                }
                clock[r] += 1 + (r as u64);
                let version = v(clock[r], r as u16 + 1);
                let mut set = set.clone();
                if let (Some(Value::Object(m)), Some(s)) = (&mut set, &state[r]) {
                    if s.deleted {
                        // A re-insert gives every column a value.
                        let mut full = base().row;
                        full.extend(m.clone());
                        *m = full;
                    }
                }
                let c = write_with(state[r].as_ref(), version, set.as_ref(), lww, counters);
                if let Some(s) = state[r].as_ref().filter(|s| !s.deleted && !c.deleted) {
                    if shrinks(engine, &s.row, &c.row).is_some() {
                        continue; // refused by capture
                    }
                }
                state[r] = Some(Stored::from(c.clone()));
                log[r].push(c);
            }
            Step::Receive { region, from } => {
                receive(&mut state, &mut next, &mut clock, &log, *region, *from)
            }
        }
    }
    // Drain: in rounds, each region takes from each other region in turn.
    loop {
        let mut moved = false;
        for &r in deliver_order {
            for from in 0..3 {
                if from != r && next[r][from] < log[from].len() {
                    receive(&mut state, &mut next, &mut clock, &log, r, from);
                    moved = true;
                }
            }
        }
        if !moved {
            break;
        }
    }
    state
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Three regions write one row several times while changes cross,
    /// each applying the others' changes in origin order as they
    /// arrive. Once everything is delivered all three hold the same row
    /// and the same version, for every policy, deletes rule and merge.
    #[test]
    fn every_arrival_order_converges(
        engine in arb_engine(),
        steps in arb_steps(),
        order in Just(vec![0usize, 1, 2]).prop_shuffle(),
    ) {
        let finals = simulate(&engine, &steps, &order);
        prop_assert_eq!(&finals[1], &finals[0]);
        prop_assert_eq!(&finals[2], &finals[0]);
    }

    /// Applying a change a second time changes nothing, for every merge
    /// but counters (whose changes are applied once by position).
    #[test]
    fn applying_twice_is_applying_once(
        engine in arb_engine(),
        a in arb_set(),
        b in arb_set(),
    ) {
        let engine = Engine {
            columns: engine.columns.into_iter().filter(|(_, r)| *r != ColumnRule::Counter).collect(),
            ..engine
        };
        let a = write(Some(&base()), v(200, 1), a.as_ref(), &LWW);
        let b = write(Some(&base()), v(300, 2), b.as_ref(), &LWW);
        let once = engine.resolve(Some(written(&a)), b.clone()).stored;
        let twice = engine.resolve(Some(once.clone()), b).stored;
        prop_assert_eq!(twice, once);
    }
}
