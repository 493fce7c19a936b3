//! rules::merge: deciding what a region holds for a row after a change from
//! another region arrives, for tables whose rule is not plain
//! last-writer-wins. Pure functions on JSON rows, so they can be property
//! tested and benchmarked without a database; the receiver feeds them the
//! locked local rows and writes back what they return.
//!
//! Every change carries its origin's whole state of the row after the write
//! (the row, and per merged column what the merge needs), so merging is a
//! function of two states. For regions to converge whatever order changes
//! arrive in, it must be a join (commutative, associative, idempotent), and
//! a write's state must never lose to the state it was written on.
//!
//! **Incarnations.** A row's life from an insert to its delete is one
//! incarnation, named by the insert's version (`tag`) and the number of
//! deletes before it (`gen`). Updates and the delete keep the incarnation;
//! an insert on top of a tombstone starts the next (`gen + 1`). Between two
//! incarnations the later generation wins, and among concurrent inserts of
//! one generation the policy decides once: first-writer-wins the earlier
//! insert, region-priority the insert from the region listed first (then
//! the later), the others the later insert. The winning incarnation's state
//! replaces the other's entirely.
//!
//! **Within an incarnation** the row (existence and every column without a
//! merge of its own) is that of the preferred write, by:
//! 1. with `deletes = "delete-wins"`: a delete first (a tombstone absorbs
//!    every other write of its incarnation; this is forced on tables with
//!    merged columns, since a tombstone keeps no merged values);
//! 2. the write's *epoch* (one more than that of the row it was written on),
//!    so a write always beats the writes it was made on top of;
//! 3. with `deletes = "update-wins"`: the non-delete;
//! 4. the policy's tie-break: last-writer-wins the larger version,
//!    first-writer-wins the smaller, region-priority the listed region
//!    first and then the larger version.
//!
//! **Merged columns** of two live states of one incarnation combine, conflict
//! or not: max and min keep the larger and smaller value (a null only when
//! both are), union every array element once in a canonical order, states
//! the value furthest along the declared order (these four are grow-only:
//! capture refuses a local write that moves them back, or the writing region
//! would disagree with the others); last-writer-wins the value of the side
//! whose column version (the version of the write that last changed the
//! column) is larger; counter keeps per region the running total of that
//! region's own changes with the hlc of the last one, joins those by the
//! larger hlc, and the value is their sum.
//!
//! Plain last-writer-wins without a deletes rule or merged columns is just
//! the larger version, as in SQL. keep-local keeps this region's row on a
//! conflict (regions do not converge on it, on purpose).
//!
//! The state's identity (`version`) is the larger of the two versions; it
//! also remembers the version, epoch and incarnation of the write whose row
//! it kept (`winner`, `epoch`, `gen`, `tag`). A change is logged as a
//! conflict when it was not written on top of this region's state (its base
//! is not the state's identity). The property tests below simulate regions
//! writing one row many times while changes cross, and check that all end
//! identical.

use std::cmp::Ordering;
use std::collections::BTreeMap;

use serde_json::{Map, Value};

use super::{ColumnRule, Deletes, Policy};
use crate::clock::Version;

pub type Row = Map<String, Value>;

/// What a merged column keeps besides its value.
#[derive(Debug, Clone, PartialEq)]
pub enum ColMeta {
    /// last-writer-wins: the version of the write that last changed it.
    Version(Version),
    /// counter: per region, (hlc of its last change, running total of its
    /// changes). Region 0 holds the value the row had before the rule.
    Totals(BTreeMap<u16, (u64, Value)>),
}

/// Merged columns' metadata (a column not listed: see [`Engine::resolve`]).
pub type Cols = BTreeMap<String, ColMeta>;

/// What this region holds for one key.
#[derive(Debug, Clone, PartialEq)]
pub struct Stored {
    /// The state's identity: the largest version merged into it. A later
    /// change made on top of this state names it as its base.
    pub version: Version,
    /// The version whose row (existence and unmerged columns) was kept.
    pub winner: Version,
    /// The kept write's incarnation and epoch (see the module docs).
    pub gen: u32,
    pub tag: Version,
    pub epoch: u32,
    pub deleted: bool,
    /// The row (empty for a tombstone).
    pub row: Row,
    /// Merged columns' metadata (empty for a tombstone).
    pub cols: Cols,
}

impl From<Incoming> for Stored {
    /// The state a change creates on its own (no local row).
    fn from(c: Incoming) -> Stored {
        Stored {
            version: c.version,
            winner: c.version,
            gen: c.gen,
            tag: c.tag,
            epoch: c.epoch,
            deleted: c.deleted,
            row: if c.deleted { Row::new() } else { c.row },
            cols: if c.deleted { Cols::new() } else { c.cols },
        }
    }
}

/// A change from another region: its origin's state of the row after it.
#[derive(Debug, Clone, PartialEq)]
pub struct Incoming {
    pub version: Version,
    /// The version of the row this change was written on, at its origin
    /// (None: the key was new there).
    pub base: Option<Version>,
    pub gen: u32,
    pub tag: Version,
    pub epoch: u32,
    pub deleted: bool,
    /// The new row (empty for a delete).
    pub row: Row,
    /// Merged columns' metadata after this change.
    pub cols: Cols,
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
    /// None when the change was written on top of the local state (or was
    /// already here).
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

/// The facts about a write that decide preference.
struct Write {
    version: Version,
    gen: u32,
    tag: Version,
    epoch: u32,
    deleted: bool,
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
        let conflict = remote.base != Some(l.version);
        let kept = if self.policy == Policy::KeepLocal && conflict {
            Side::Local
        } else {
            match self.prefer(&Write::remote(&remote), &Write::local(&l)) {
                Ordering::Greater => Side::Remote,
                _ => Side::Local,
            }
        };
        let rule = match self.deletes {
            Some(Deletes::DeleteWins) if l.deleted != remote.deleted => "delete-wins",
            Some(Deletes::UpdateWins) if l.deleted != remote.deleted => "update-wins",
            _ => self.policy.name(),
        };
        let version = l.version.max(remote.version);
        // Merged columns combine two live states of one incarnation: the
        // kept state's values are merged in place with the other side's,
        // which are moved, not copied.
        let join = !l.deleted
            && !remote.deleted
            && l.gen == remote.gen
            && l.tag == remote.tag
            && !self.columns.is_empty();
        let mut changed = version != l.version || kept == Side::Remote;
        let (l_default, r_default) = (l.winner, remote.version);
        let (mut stored, mut other_row, mut other_cols, defaults) = match kept {
            Side::Remote => (Stored::from(remote), l.row, l.cols, (r_default, l_default)),
            Side::Local => (l, remote.row, remote.cols, (l_default, r_default)),
        };
        stored.version = version;
        let mut merged = Vec::new();
        if join {
            for (i, (column, rule)) in self.columns.iter().enumerate() {
                let other = other_row
                    .get_mut(column)
                    .map_or(Value::Null, std::mem::take);
                if stored.row.get(column).unwrap_or(&Value::Null) != &other {
                    merged.push(i);
                }
                changed |= merge_column(
                    rule,
                    column,
                    &mut stored,
                    other,
                    other_cols.remove(column),
                    defaults,
                );
            }
        }
        Resolution {
            stored,
            conflict: conflict.then_some(Conflict { rule, kept, merged }),
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

    /// Compares two writes: Greater when `a`'s row is preferred (see the
    /// module docs for the order).
    fn prefer(&self, a: &Write, b: &Write) -> Ordering {
        if self.policy == Policy::LastWriterWins
            && self.deletes.is_none()
            && self.columns.is_empty()
        {
            return a.version.cmp(&b.version);
        }
        let lineage = match self.policy {
            Policy::FirstWriterWins => b.tag.cmp(&a.tag),
            Policy::RegionPriority => {
                (self.rank(a.tag.region), a.tag).cmp(&(self.rank(b.tag.region), b.tag))
            }
            _ => a.tag.cmp(&b.tag),
        };
        let (first, later) = match self.deletes {
            Some(Deletes::DeleteWins) => (a.deleted.cmp(&b.deleted), Ordering::Equal),
            Some(Deletes::UpdateWins) => (Ordering::Equal, b.deleted.cmp(&a.deleted)),
            None => (Ordering::Equal, Ordering::Equal),
        };
        let tie = match self.policy {
            Policy::FirstWriterWins => b.version.cmp(&a.version),
            Policy::RegionPriority => (self.rank(a.version.region), a.version)
                .cmp(&(self.rank(b.version.region), b.version)),
            _ => a.version.cmp(&b.version),
        };
        a.gen
            .cmp(&b.gen)
            .then(lineage)
            .then(first)
            .then(a.epoch.cmp(&b.epoch))
            .then(later)
            .then(tie)
    }

    /// Larger is preferred: listed regions before unlisted, earlier in the
    /// list first.
    fn rank(&self, region: u16) -> usize {
        self.priority
            .iter()
            .position(|&r| r == region)
            .map_or(0, |i| self.priority.len() - i)
    }
}

impl Write {
    fn local(s: &Stored) -> Write {
        Write {
            version: s.winner,
            gen: s.gen,
            tag: s.tag,
            epoch: s.epoch,
            deleted: s.deleted,
        }
    }

    fn remote(c: &Incoming) -> Write {
        Write {
            version: c.version,
            gen: c.gen,
            tag: c.tag,
            epoch: c.epoch,
            deleted: c.deleted,
        }
    }
}

/// Merged columns' metadata as the database and the wire keep it:
/// `{"col": [hlc, region]}` for a version, `{"col": {"region": [hlc,
/// total]}}` for counter totals. Malformed entries are left out (the
/// column then counts as having none).
pub fn cols_from_json(v: Option<&Value>) -> Cols {
    let Some(Value::Object(m)) = v else {
        return Cols::new();
    };
    fn version(x: &Value) -> Option<(u64, &Value)> {
        Some((x.get(0)?.as_u64()?, x.get(1)?))
    }
    m.iter()
        .filter_map(|(c, x)| {
            let meta = match x {
                Value::Array(_) => {
                    let (h, o) = version(x)?;
                    ColMeta::Version(Version {
                        hlc: h,
                        region: u16::try_from(o.as_u64()?).ok()?,
                    })
                }
                Value::Object(t) => ColMeta::Totals(
                    t.iter()
                        .filter_map(|(r, x)| {
                            let (h, total) = version(x)?;
                            Some((r.parse().ok()?, (h, total.clone())))
                        })
                        .collect(),
                ),
                _ => return None,
            };
            Some((c.clone(), meta))
        })
        .collect()
}

/// The inverse of [`cols_from_json`] (None when there is nothing).
pub fn cols_to_json(cols: &Cols) -> Option<Value> {
    (!cols.is_empty()).then(|| {
        Value::Object(
            cols.iter()
                .map(|(c, meta)| {
                    let x = match meta {
                        ColMeta::Version(v) => {
                            Value::from(vec![Value::from(v.hlc), Value::from(v.region)])
                        }
                        ColMeta::Totals(t) => Value::Object(
                            t.iter()
                                .map(|(r, (h, total))| {
                                    (
                                        r.to_string(),
                                        Value::from(vec![Value::from(*h), total.clone()]),
                                    )
                                })
                                .collect(),
                        ),
                    };
                    (c.clone(), x)
                })
                .collect(),
        )
    })
}

/// A counter's totals from its metadata, or as its value implies them
/// before any were kept (the whole value, held by region 0).
fn into_totals(meta: Option<ColMeta>, value: &Value) -> BTreeMap<u16, (u64, Value)> {
    match meta {
        Some(ColMeta::Totals(t)) => t,
        _ => BTreeMap::from([(0, (0, value.clone()))]),
    }
}

/// The sum of a counter's totals.
pub fn total(totals: &BTreeMap<u16, (u64, Value)>) -> Value {
    totals
        .values()
        .fold(Value::from(0), |sum, (_, t)| add(&sum, t))
}

/// Merges column `column` of the other live state of the same incarnation
/// (its value and metadata, moved out of it) into `stored`; `defaults` are
/// the versions that last wrote a last-writer-wins column without one of
/// its own, in stored's and in the other state. Returns whether stored
/// changed.
fn merge_column(
    rule: &ColumnRule,
    column: &str,
    stored: &mut Stored,
    other: Value,
    other_meta: Option<ColMeta>,
    defaults: (Version, Version),
) -> bool {
    if !stored.row.contains_key(column) {
        stored.row.insert(column.to_string(), Value::Null);
    }
    let slot = stored.row.get_mut(column).expect("just made sure");
    let replace = |slot: &mut Value, v: Value| -> bool {
        if *slot == v {
            false
        } else {
            *slot = v;
            true
        }
    };
    match rule {
        ColumnRule::Max | ColumnRule::Min => {
            let want = if *rule == ColumnRule::Max {
                Ordering::Greater
            } else {
                Ordering::Less
            };
            better(&other, slot, want) && replace(slot, other)
        }
        ColumnRule::Union => {
            let u = union(slot, &other);
            replace(slot, u)
        }
        ColumnRule::States(states) => {
            state_rank(states, &other) > state_rank(states, slot) && replace(slot, other)
        }
        ColumnRule::LastWriterWins => {
            let version = |meta: Option<&ColMeta>, default: Version| match meta {
                Some(ColMeta::Version(v)) => *v,
                _ => default,
            };
            let mine = version(stored.cols.get(column), defaults.0);
            let theirs = version(other_meta.as_ref(), defaults.1);
            let value_changed = theirs > mine && replace(slot, other);
            let newest = ColMeta::Version(mine.max(theirs));
            let meta_changed = stored.cols.get(column) != Some(&newest);
            if meta_changed {
                stored.cols.insert(column.to_string(), newest);
            }
            value_changed || meta_changed
        }
        ColumnRule::Counter => {
            let kept = stored.cols.remove(column);
            let mut meta_changed = !matches!(kept, Some(ColMeta::Totals(_)));
            let mut mine = into_totals(kept, slot);
            let theirs = into_totals(other_meta, &other);
            for (region, (hlc, sum)) in theirs {
                match mine.entry(region) {
                    std::collections::btree_map::Entry::Vacant(e) => {
                        e.insert((hlc, sum));
                        meta_changed = true;
                    }
                    std::collections::btree_map::Entry::Occupied(mut e) => {
                        let (h, s) = e.get();
                        if h.cmp(&hlc).then(compare(s, &sum)) == Ordering::Less {
                            e.insert((hlc, sum));
                            meta_changed = true;
                        }
                    }
                }
            }
            let value_changed = replace(slot, total(&mine));
            stored
                .cols
                .insert(column.to_string(), ColMeta::Totals(mine));
            value_changed || meta_changed
        }
    }
}

/// Position of a value in a states order: null first, then values not
/// listed (by their text), then the listed ones in order.
fn state_rank<'a>(states: &[String], v: &'a Value) -> (i64, std::borrow::Cow<'a, str>) {
    match v {
        Value::Null => (-2, "".into()),
        Value::String(s) => (
            states.iter().position(|x| x == s).map_or(-1, |i| i as i64),
            s.as_str().into(),
        ),
        other => (-1, other.to_string().into()),
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

/// Whether `candidate` beats `current` for max (`want = Greater`) or min: a
/// value beats null, never the reverse; values equal by [`compare`] but
/// spelled differently (1 and 1.0) are ordered by their text, so every
/// region keeps the same one.
fn better(candidate: &Value, current: &Value, want: Ordering) -> bool {
    match (current.is_null(), candidate.is_null()) {
        (_, true) => false,
        (true, false) => true,
        _ => {
            compare(candidate, current)
                .then_with(|| candidate.to_string().cmp(&current.to_string()))
                == want
        }
    }
}

/// The larger (`want = Greater`) or smaller value; null only if both are.
#[cfg(test)]
fn pick(a: &Value, b: &Value, want: Ordering) -> Value {
    if better(b, a, want) {
        b.clone()
    } else {
        a.clone()
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

/// a - b, as [`add`] (the test model of capture uses it).
#[cfg(test)]
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
                            ColumnRule::States(vec![
                                "created".into(),
                                "paid".into(),
                                "shipped".into(),
                            ]),
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
}
