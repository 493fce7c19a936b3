//! rules::merge: deciding a conflict between this region's version of a row
//! and a change from another region, for tables whose rule is not plain
//! last-writer-wins. Pure functions on JSON rows, so they can be property
//! tested and benchmarked without a database; the receiver feeds them the
//! locked local rows and writes back what they return.
//!
//! **When is it a conflict?** Every change carries the version of the row it
//! was written on at its origin (its *base*). If that is exactly this
//! region's current version, the change was made on top of what is here: it
//! is simply applied. Otherwise both sides changed the row without seeing
//! each other (or the change is the newer of two that crossed), and the rule
//! decides:
//!
//! - the **row** (its existence and every column without a merge of its own)
//!   goes to one side: by `deletes` when exactly one side is a delete and the
//!   rule has one, else by the policy (last-writer-wins: larger (hlc, region);
//!   first-writer-wins: smaller; region-priority: the region listed first,
//!   then larger (hlc, region); keep-local: this region's);
//! - **merged columns** combine both sides: counter adds the remote update's
//!   delta (new - old; a conflicting insert adds its value), max and min keep
//!   the larger and smaller value (a null only when both are), union keeps
//!   every array element once in a canonical order, states keeps the value
//!   furthest along the declared order;
//! - the resolved state gets the larger of the two versions as its identity,
//!   and remembers which version's row it kept (`winner`), for later
//!   comparisons.
//!
//! Every choice above is symmetric, and the identity is a maximum, so two
//! regions that saw the same changes in different orders end with the same
//! row and the same version (checked by the property tests below). The one
//! exception is keep-local, which keeps regions apart on purpose.
//!
//! Deletes: a tombstone keeps no merged values, so on tables with merged
//! columns a delete that conflicts with an update wins (`deletes` other than
//! delete-wins is refused there by the rule files).

use std::cmp::Ordering;

use serde_json::{Map, Value};

use super::{ColumnRule, Deletes, Policy};
use crate::clock::Version;

pub type Row = Map<String, Value>;

/// What this region holds for one key.
#[derive(Debug, Clone, PartialEq)]
pub struct Stored {
    /// The state's identity: the largest version merged into it. A later
    /// change made on top of this state names it as its base.
    pub version: Version,
    /// The version whose row (existence and unmerged columns) was kept.
    pub winner: Version,
    pub deleted: bool,
    /// The row (empty for a tombstone).
    pub row: Row,
}

impl From<Incoming> for Stored {
    /// The state a change creates on its own (no conflict).
    fn from(c: Incoming) -> Stored {
        Stored {
            version: c.version,
            winner: c.version,
            deleted: c.deleted,
            row: if c.deleted { Row::new() } else { c.row },
        }
    }
}

/// A change from another region.
#[derive(Debug, Clone, PartialEq)]
pub struct Incoming {
    pub version: Version,
    /// The version of the row this change was written on, at its origin
    /// (None: the key was new there).
    pub base: Option<Version>,
    pub deleted: bool,
    /// The new row (empty for a delete).
    pub row: Row,
    /// Old values of counter columns, for updates.
    pub old: Option<Row>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Local,
    Remote,
}

/// A detected conflict, for the conflict log.
#[derive(Debug, Clone, PartialEq)]
pub struct Conflict {
    /// What decided the row: the policy's name, `delete-wins` or `update-wins`.
    pub rule: &'static str,
    /// Whose row was kept.
    pub kept: Side,
    /// Columns whose values differed and were merged (indexes into
    /// [`Engine::columns`]).
    pub merged: Vec<usize>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Resolution {
    pub stored: Stored,
    /// None when the change applied without a conflict (or was already here).
    pub conflict: Option<Conflict>,
    /// Whether the stored state differs from the local one.
    pub changed: bool,
}

/// A table's rule, compiled for resolving (region names resolved to ids).
#[derive(Debug, Clone, PartialEq)]
pub struct Engine {
    pub policy: Policy,
    /// For [`Policy::Custom`]: the SQL function deciding conflicts (called
    /// by the receiver, see `replication::resolve`; here custom behaves
    /// as last-writer-wins).
    pub function: Option<String>,
    /// For region-priority: region ids, highest priority first.
    pub priority: Vec<u16>,
    pub deletes: Option<Deletes>,
    pub columns: Vec<(String, ColumnRule)>,
}

impl Engine {
    /// Decides what this region holds after `remote`, given what it holds
    /// now (both taken by value: rows are moved, not copied).
    pub fn resolve(&self, local: Option<Stored>, remote: Incoming) -> Resolution {
        let Some(l) = local else {
            return Resolution {
                stored: Stored::from(remote),
                conflict: None,
                changed: true,
            };
        };
        if l.version == remote.version {
            // Already here (a resend): nothing to do.
            return Resolution {
                stored: l,
                conflict: None,
                changed: false,
            };
        }
        if remote.base == Some(l.version) {
            return Resolution {
                stored: Stored::from(remote),
                conflict: None,
                changed: true,
            };
        }
        let (kept, rule) = self.row_winner(&l, &remote);
        let version = l.version.max(remote.version);
        let mut changed = version != l.version || kept == Side::Remote;
        let both_live = !l.deleted && !remote.deleted;
        let mut merged = Vec::new();
        // Merged values, computed while both rows are at hand.
        let mut values = Vec::with_capacity(self.columns.len());
        if both_live {
            for (i, (column, rule)) in self.columns.iter().enumerate() {
                if l.row.get(column) != remote.row.get(column) {
                    merged.push(i);
                }
                values.push(merge_column(rule, column, &l.row, &remote));
            }
        }
        let mut stored = match kept {
            Side::Remote => Stored::from(remote),
            Side::Local => l,
        };
        stored.version = version;
        if both_live && !stored.deleted {
            for ((column, _), value) in self.columns.iter().zip(values) {
                match stored.row.get_mut(column) {
                    Some(slot) if *slot == value => {}
                    Some(slot) => {
                        changed = true;
                        *slot = value;
                    }
                    None => {
                        changed = true;
                        stored.row.insert(column.clone(), value);
                    }
                }
            }
        }
        Resolution {
            stored,
            conflict: Some(Conflict { rule, kept, merged }),
            changed,
        }
    }

    /// Whether `remote` conflicts with `local` (neither already here nor
    /// made on top of it).
    pub fn conflicts(local: &Stored, remote: &Incoming) -> bool {
        local.version != remote.version && remote.base != Some(local.version)
    }

    /// Whether the deletes rule decides this conflict (so a custom function
    /// is not asked).
    pub fn deletes_decide(&self, local: &Stored, remote: &Incoming) -> bool {
        self.deletes.is_some() && local.deleted != remote.deleted
    }

    /// Whose row is kept, and what decided it.
    fn row_winner(&self, l: &Stored, r: &Incoming) -> (Side, &'static str) {
        let side = |remote: bool| if remote { Side::Remote } else { Side::Local };
        if l.deleted != r.deleted {
            if let Some(d) = self.deletes {
                return match d {
                    Deletes::DeleteWins => (side(r.deleted), "delete-wins"),
                    Deletes::UpdateWins => (side(!r.deleted), "update-wins"),
                };
            }
        }
        let remote = match self.policy {
            Policy::LastWriterWins | Policy::Custom => r.version > l.winner,
            Policy::FirstWriterWins => r.version < l.winner,
            Policy::RegionPriority => self.priority_key(r.version) > self.priority_key(l.winner),
            Policy::KeepLocal => false,
        };
        (side(remote), self.policy.name())
    }

    /// Larger is preferred: listed regions before unlisted, earlier in the
    /// list first, then the larger version.
    fn priority_key(&self, v: Version) -> (usize, Version) {
        let rank = self
            .priority
            .iter()
            .position(|&r| r == v.region)
            .map_or(0, |i| self.priority.len() - i);
        (rank, v)
    }
}

fn merge_column(rule: &ColumnRule, column: &str, local: &Row, remote: &Incoming) -> Value {
    let null = Value::Null;
    let lv = local.get(column).unwrap_or(&null);
    let rv = remote.row.get(column).unwrap_or(&null);
    match rule {
        ColumnRule::Counter => {
            let delta = match &remote.old {
                Some(old) => sub(rv, old.get(column).unwrap_or(&null)),
                // A conflicting insert: its value counts from zero.
                None => rv.clone(),
            };
            add(lv, &delta)
        }
        ColumnRule::Max => pick(lv, rv, Ordering::Greater),
        ColumnRule::Min => pick(lv, rv, Ordering::Less),
        ColumnRule::Union => union(lv, rv),
        ColumnRule::States(states) => {
            let rank = |v: &Value| -> (i64, String) {
                match v {
                    Value::Null => (-2, String::new()),
                    Value::String(s) => (
                        states.iter().position(|x| x == s).map_or(-1, |i| i as i64),
                        s.clone(),
                    ),
                    other => (-1, other.to_string()),
                }
            };
            if rank(rv) > rank(lv) {
                rv.clone()
            } else {
                lv.clone()
            }
        }
    }
}

/// A total order on JSON values: null < bool < number < string < array <
/// object; numbers by value, the rest by their text.
pub fn compare(a: &Value, b: &Value) -> Ordering {
    fn kind(v: &Value) -> u8 {
        match v {
            Value::Null => 0,
            Value::Bool(_) => 1,
            Value::Number(_) => 2,
            Value::String(_) => 3,
            Value::Array(_) => 4,
            Value::Object(_) => 5,
        }
    }
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => match (x.as_i64(), y.as_i64()) {
            (Some(i), Some(j)) => i.cmp(&j),
            _ => {
                let (f, g) = (x.as_f64().unwrap_or(0.0), y.as_f64().unwrap_or(0.0));
                f.total_cmp(&g)
            }
        },
        (Value::String(x), Value::String(y)) => x.cmp(y),
        (Value::Bool(x), Value::Bool(y)) => x.cmp(y),
        _ => kind(a)
            .cmp(&kind(b))
            .then_with(|| a.to_string().cmp(&b.to_string())),
    }
}

/// The larger (`want = Greater`) or smaller value; null only if both are.
fn pick(a: &Value, b: &Value, want: Ordering) -> Value {
    match (a.is_null(), b.is_null()) {
        (true, _) => b.clone(),
        (_, true) => a.clone(),
        _ if compare(b, a) == want => b.clone(),
        _ => a.clone(),
    }
}

fn number(v: &Value) -> Option<&serde_json::Number> {
    match v {
        Value::Number(n) => Some(n),
        _ => None,
    }
}

/// a + b for JSON numbers (null counts as zero): exact for integers, f64 otherwise.
fn add(a: &Value, b: &Value) -> Value {
    arith(a, b, i64::checked_add, |x, y| x + y)
}

/// a - b, as [`add`].
fn sub(a: &Value, b: &Value) -> Value {
    arith(a, b, i64::checked_sub, |x, y| x - y)
}

fn arith(
    a: &Value,
    b: &Value,
    int: fn(i64, i64) -> Option<i64>,
    float: fn(f64, f64) -> f64,
) -> Value {
    let zero = serde_json::Number::from(0);
    let (x, y) = (number(a).unwrap_or(&zero), number(b).unwrap_or(&zero));
    if let (Some(i), Some(j)) = (x.as_i64(), y.as_i64()) {
        if let Some(r) = int(i, j) {
            return Value::from(r);
        }
    }
    let r = float(x.as_f64().unwrap_or(0.0), y.as_f64().unwrap_or(0.0));
    serde_json::Number::from_f64(r).map_or(Value::Null, Value::Number)
}

/// Every element of both arrays once, sorted by [`compare`]; a non-array
/// counts as empty.
fn union(a: &Value, b: &Value) -> Value {
    let mut all: Vec<Value> = [a, b]
        .into_iter()
        .filter_map(Value::as_array)
        .flatten()
        .cloned()
        .collect();
    if all.is_empty() && a.is_null() && b.is_null() {
        return Value::Null;
    }
    all.sort_by(compare);
    all.dedup();
    Value::Array(all)
}

#[cfg(test)]
mod tests {
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
            deleted: false,
            row: row(
                json!({"id": 1, "name": "base", "n": 10, "hi": 5, "tags": ["a"], "st": "created"}),
            ),
        }
    }

    /// An update on top of `base()` made in `region` at `hlc`.
    fn update(hlc: u64, region: u16, set: Value) -> Incoming {
        let mut r = base().row;
        for (k, x) in set.as_object().unwrap() {
            r.insert(k.clone(), x.clone());
        }
        Incoming {
            version: v(hlc, region),
            base: Some(base().version),
            deleted: false,
            row: r,
            old: Some(row(json!({"n": 10}))),
        }
    }

    fn delete(hlc: u64, region: u16) -> Incoming {
        Incoming {
            version: v(hlc, region),
            base: Some(base().version),
            deleted: true,
            row: Row::new(),
            old: None,
        }
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
            json!({"id": 1, "name": "base", "n": 7, "hi": 9, "tags": ["a", "b", "c"], "st": "shipped"})
        );
        assert_eq!(r.conflict.unwrap().merged, [0, 1, 2, 3]);
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
        let merges = prop::bool::ANY;
        (
            policy,
            deletes,
            merges,
            proptest::sample::subsequence(vec![1u16, 2, 3, 4], 0..=4),
        )
            .prop_map(|(policy, deletes, merges, priority)| {
                // Tables with merged columns only allow delete-wins (see module docs).
                let (deletes, columns) = if merges {
                    (
                        Some(Deletes::DeleteWins),
                        vec![
                            ("n".to_string(), ColumnRule::Counter),
                            ("hi".to_string(), ColumnRule::Max),
                            ("tags".to_string(), ColumnRule::Union),
                            (
                                "st".to_string(),
                                ColumnRule::States(vec![
                                    "created".into(),
                                    "paid".into(),
                                    "shipped".into(),
                                ]),
                            ),
                        ],
                    )
                } else {
                    (deletes, vec![])
                };
                Engine {
                    policy,
                    function: None,
                    priority,
                    deletes,
                    columns,
                }
            })
    }

    /// A change made on top of base() in region `region` (distinct regions,
    /// distinct hlcs).
    fn arb_change(region: u16) -> impl Strategy<Value = Incoming> {
        (
            0u64..50,
            prop::bool::weighted(0.2),
            -5i64..20,
            0i64..30,
            proptest::sample::subsequence(vec!["a", "b", "c", "d"], 0..=3),
            proptest::sample::select(vec!["created", "paid", "shipped", "lost"]),
        )
            .prop_map(move |(hlc, is_delete, n, hi, tags, st)| {
                let hlc = 1000 + hlc * 10 + u64::from(region);
                if is_delete {
                    delete(hlc, region)
                } else {
                    update(
                        hlc,
                        region,
                        json!({"name": format!("r{region}"), "n": n, "hi": hi, "tags": tags, "st": st}),
                    )
                }
            })
    }

    proptest! {
        /// Regions 1..=k each wrote one change on top of the same row; each
        /// then applies the others' in its own order. All end identical:
        /// the merge is commutative and associative.
        #[test]
        fn every_arrival_order_converges(
            engine in arb_engine(),
            changes in (arb_change(1), arb_change(2), arb_change(3), arb_change(4)),
            orders in proptest::collection::vec(Just(vec![0usize, 1, 2, 3]).prop_shuffle(), 4),
        ) {
            let changes = [changes.0, changes.1, changes.2, changes.3];
            let mut finals = Vec::new();
            for (mine, order) in orders.iter().enumerate() {
                let mut state = written(&changes[mine]);
                for &i in order.iter().filter(|&&i| i != mine) {
                    state = engine.resolve(Some(state), changes[i].clone()).stored;
                }
                finals.push(state);
            }
            for f in &finals[1..] {
                prop_assert_eq!(f, &finals[0]);
            }
        }

        /// Applying a change a second time changes nothing, for every merge
        /// but counters (whose changes are applied once by position).
        #[test]
        fn applying_twice_is_applying_once(
            engine in arb_engine(),
            a in arb_change(1),
            b in arb_change(2),
        ) {
            let engine = Engine {
                columns: engine.columns.into_iter().filter(|(_, r)| *r != ColumnRule::Counter).collect(),
                ..engine
            };
            let once = engine.resolve(Some(written(&a)), b.clone()).stored;
            let twice = engine.resolve(Some(once.clone()), b).stored;
            prop_assert_eq!(twice, once);
        }
    }
}
