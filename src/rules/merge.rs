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
pub use values::compare;
use values::{add, better, union};
#[cfg(test)]
use values::{pick, sub};

mod values;

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

#[cfg(test)]
mod tests;
