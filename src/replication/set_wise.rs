//! The set-wise apply (see [`apply`](super::apply) for the entry point).
//!
//! **Decided here, written in bulk** (batches of inserts, updates and
//! deletes). Per table: the newest change per key is found in Rust; the
//! rows that exist are locked (`meridian.lock_for_apply`, which also locks
//! the table when some key has no row, so none appears), or, beyond
//! [`ROW_LOCKS_UP_TO`] keys, the table alone; after capture has passed a
//! sync point, the keys' row versions are read by index; each change above
//! its row's version wins, and Postgres gets one statement per table and
//! kind: a DELETE, a COPY of the rows for new keys (an upsert costs 2.4x a
//! plain insert here), an upsert for keys that have a row (COPY into a
//! staging table, then one upsert from it), a COPY of the new row versions
//! and an UPDATE of the others (how rows are written: [`super::rows`]). Counter
//! columns (`functions/counters.sql`) keep their SQL, called only for
//! tables that have them; rule-engine tables go to [`resolve::apply`].
//!
//! A statement that fails (other than a lost deadlock) rolls the whole
//! set-wise part back to its savepoint, and the caller applies the batch
//! in stream order, where a change that cannot be applied is held.

use std::collections::{BTreeMap, HashMap};

use serde_json::Value;

use crate::capture::image::Image;
use tokio_postgres::types::Json;
use tokio_postgres::Transaction;

use super::apply::{settle, Applied, ApplyError, Phases};
use super::copy_text;
use super::protocol::{Change, Operation};
use super::resolve;
use super::rows::{copy_in, insert_rows, upsert_rows, with_defaults, TableShape};
use crate::capture::wal::Barrier;

/// The set-wise path, and whether a foreign key touches its tables (so
/// orphans are to be looked for); `None` when it cannot be used for this
/// batch (a table missing here, or a statement failed: rolled back to its
/// savepoint).
pub(super) async fn apply(
    tx: &mut Transaction<'_>,
    barrier: Option<&Barrier>,
    engines: &resolve::Engines,
    origin: u16,
    todo: &[&Change],
) -> Result<Option<(Applied, bool)>, ApplyError> {
    let mut clock = std::time::Instant::now();
    let mut lap = || {
        let ms = clock.elapsed().as_secs_f64() * 1e3;
        clock = std::time::Instant::now();
        ms
    };
    let mut phases = Phases::default();
    let mut by_table: BTreeMap<&str, Vec<&Change>> = BTreeMap::new();
    for c in todo {
        by_table.entry(c.tbl.as_str()).or_default().push(c);
    }
    let names: Vec<&str> = by_table.keys().copied().collect();
    let mut shapes: HashMap<String, TableShape> = HashMap::new();
    for r in tx
        .query("SELECT * FROM meridian.apply_tables($1)", &[&names])
        .await?
    {
        if !r.get::<_, bool>("present") {
            return Ok(None);
        }
        shapes.insert(
            r.get("tbl"),
            TableShape {
                key_cols: r.get("key_cols"),
                t_keys: r.get::<_, Option<String>>("t_keys").unwrap_or_default(),
                d_keys: r.get::<_, Option<String>>("d_keys").unwrap_or_default(),
                all_cols: r.get::<_, Option<String>>("all_cols").unwrap_or_default(),
                on_conflict: r
                    .get::<_, Option<String>>("on_conflict")
                    .unwrap_or_default(),
                columns: r
                    .get::<_, Option<Vec<String>>>("columns")
                    .unwrap_or_default(),
                json: r.get::<_, Option<Vec<bool>>>("json").unwrap_or_default(),
                counters: r.get("counters"),
                has_fk: r.get("has_fk"),
            },
        );
    }
    // Lock every table's keys (in name order, as every applier does), then
    // wait for capture: from then on the local state cannot change.
    let mut tables = Vec::with_capacity(by_table.len());
    for (tbl, changes) in &by_table {
        let shape = &shapes[*tbl];
        let keys = Keys::of(changes);
        let present = match shape.key_cols {
            Some(_) => lock(tx, tbl, &keys).await?,
            None => None,
        };
        tables.push((*tbl, keys, present));
    }
    phases.lock_ms = lap();
    settle(barrier).await?;
    phases.settle_ms = lap();
    let mut sp = tx.savepoint("meridian_set_wise").await?;
    let mut outcome = Applied::default();
    let mut has_fk = false;
    for (tbl, keys, present) in &tables {
        let shape = &shapes[*tbl];
        has_fk |= shape.has_fk;
        if engines.decides(tbl) {
            continue;
        }
        let result = match &shape.key_cols {
            None => insert_only(&sp, tbl, shape, &by_table[*tbl]).await,
            Some(key_cols) => {
                write_table(
                    &mut sp,
                    tbl,
                    key_cols,
                    shape,
                    keys,
                    present,
                    origin,
                    &by_table[*tbl],
                )
                .await
            }
        };
        match result {
            Ok((applied, older)) => {
                outcome.applied += applied;
                outcome.older += older;
            }
            Err(e) if resolve::is_retryable(&e) => return Err(e.into()),
            Err(e) => {
                tracing::warn!(table = %tbl, error = %crate::capture::describe(&e),
                    "applying set-wise failed; applying change by change");
                sp.rollback().await?;
                return Ok(None);
            }
        }
    }
    sp.commit().await?;
    phases.write_ms = lap();
    let for_engine: Vec<&Change> = todo
        .iter()
        .copied()
        .filter(|c| engines.handles(c))
        .collect();
    outcome.engine = resolve::apply(tx, engines, origin, &for_engine).await?;
    phases.engine_ms = lap();
    outcome.phases = Some(phases);
    Ok(Some((outcome, has_fk)))
}

/// A table's keys in a batch: each distinct key once, in first-seen order,
/// and beside each its newest change (one origin's versions of a row only
/// grow, so the newest is the last).
struct Keys<'a> {
    pks: Vec<&'a Image>,
    newest: Vec<&'a Change>,
}

impl<'a> Keys<'a> {
    fn of(changes: &[&'a Change]) -> Keys<'a> {
        let mut index: HashMap<&[u8], usize> = HashMap::new();
        let mut keys = Keys {
            pks: Vec::new(),
            newest: Vec::new(),
        };
        for c in changes {
            let Some(pk) = c.pk.as_ref() else { continue };
            match index.entry(pk.as_bytes()) {
                std::collections::hash_map::Entry::Occupied(e) => keys.newest[*e.get()] = c,
                std::collections::hash_map::Entry::Vacant(e) => {
                    e.insert(keys.pks.len());
                    keys.pks.push(pk);
                    keys.newest.push(c);
                }
            }
        }
        keys
    }
}

/// Above this many keys of one table in a batch, the apply locks the table
/// against local writes rather than each row: row locks are written to the
/// WAL one by one (and cost a catch-up a fifth of its time), and a batch
/// that large nearly always has new keys, which lock the table anyway.
const ROW_LOCKS_UP_TO: usize = 256;

/// Locks `keys`' rows (and the table, if some have none) and says which
/// have a row; or, for many keys, locks the table (`None`: not known).
async fn lock(
    tx: &Transaction<'_>,
    tbl: &str,
    keys: &Keys<'_>,
) -> Result<Option<Vec<bool>>, tokio_postgres::Error> {
    if keys.pks.len() > ROW_LOCKS_UP_TO {
        tx.batch_execute(&format!("LOCK TABLE {tbl} IN SHARE ROW EXCLUSIVE MODE"))
            .await?;
        return Ok(None);
    }
    let mut present = vec![false; keys.pks.len()];
    for r in tx
        .query(
            "SELECT meridian.lock_for_apply($1, $2::jsonb)",
            &[&tbl, &Json(&keys.pks)],
        )
        .await?
    {
        let i: i64 = r.get(0);
        if let Some(p) = present.get_mut((i - 1) as usize) {
            *p = true;
        }
    }
    Ok(Some(present))
}

/// An insert-only table: every row arrives once, under a key made in its
/// origin.
async fn insert_only(
    tx: &Transaction<'_>,
    tbl: &str,
    shape: &TableShape,
    changes: &[&Change],
) -> Result<(u64, u64), tokio_postgres::Error> {
    let rows: Vec<&Image> = changes
        .iter()
        .filter(|c| c.op == Operation::Insert)
        .filter_map(|c| c.row.as_ref())
        .collect();
    let rows = with_defaults(tx, tbl, shape, rows).await?;
    insert_rows(tx, tbl, shape, &rows).await?;
    Ok((changes.len() as u64, 0))
}

/// One last-writer-wins table's changes: versions read, winners decided,
/// then a few statements. Returns (applied, older).
#[allow(clippy::too_many_arguments)]
async fn write_table(
    tx: &mut Transaction<'_>,
    tbl: &str,
    key_cols: &str,
    shape: &TableShape,
    keys: &Keys<'_>,
    present: &Option<Vec<bool>>,
    origin: u16,
    changes: &[&Change],
) -> Result<(u64, u64), tokio_postgres::Error> {
    let started = std::time::Instant::now();
    let mut steps: Vec<(&str, usize, f64)> = Vec::new();
    let mut at = started;
    let mut lap = |step: &'static str, n: usize| {
        steps.push((step, n, at.elapsed().as_secs_f64() * 1e3));
        at = std::time::Instant::now();
    };
    let found = read_versions(tx, tbl, keys).await?;
    lap("versions", keys.pks.len());
    let origin = i32::from(origin);
    // Counters add every update's delta, whichever version wins the rest
    // of the row (taken from the locked rows before they change).
    let finals: Option<Value> = if shape.counters.is_empty() {
        None
    } else {
        tx.query_one(
            "SELECT meridian.counter_finals($1::text::regclass, meridian.counter_deltas($1, $2::jsonb))",
            &[&tbl, &Json(changes)],
        )
        .await?
        .get(0)
    };
    lap("counter_finals", finals.is_some() as usize);
    let Decision {
        deletes,
        inserts,
        upserts,
        new_versions,
        old_versions,
    } = decide(keys, found, present.as_deref(), origin);
    let won = (new_versions.pks.len() + old_versions.pks.len()) as u64;
    let (t_keys, d_keys) = (&shape.t_keys, &shape.d_keys);
    if !deletes.is_empty() {
        tx.execute(
            &format!("DELETE FROM {tbl} t USING jsonb_populate_recordset(NULL::{tbl}, $1::jsonb) d WHERE ({t_keys}) = ({d_keys})"),
            &[&Json(&deletes)],
        )
        .await?;
        lap("delete", deletes.len());
    }
    let inserts_n = inserts.len();
    if !inserts.is_empty() {
        let rows = with_defaults(tx, tbl, shape, inserts).await?;
        if present.is_some() {
            insert_rows(tx, tbl, shape, &rows).await?;
        } else {
            // A row without a version (from before capture) makes the
            // plain insert fail on the key: then the same rows as upserts.
            let sp = tx.savepoint("meridian_new_keys").await?;
            match insert_rows(&sp, tbl, shape, &rows).await {
                Ok(()) => sp.commit().await?,
                Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) => {
                    sp.rollback().await?;
                    upsert_rows(tx, tbl, key_cols, shape, &rows).await?;
                }
                Err(e) => return Err(e),
            }
        }
        lap("insert", inserts_n);
    }
    if !upserts.is_empty() {
        let rows = with_defaults(tx, tbl, shape, upserts).await?;
        upsert_rows(tx, tbl, key_cols, shape, &rows).await?;
        lap("upsert", rows.len());
    }
    if !new_versions.pks.is_empty() {
        copy_in(
            tx,
            "COPY meridian.row_version (tbl, pk, hlc, origin, deleted) FROM STDIN",
            new_versions.copy_text(tbl, origin),
        )
        .await?;
        lap("new_versions", new_versions.pks.len());
    }
    if !old_versions.pks.is_empty() {
        old_versions.update(tx, tbl, origin).await?;
        lap("old_versions", old_versions.pks.len());
    }
    if finals.is_some() {
        tx.execute(
            "SELECT meridian.set_counters($1::text::regclass, $2::jsonb)",
            &[&tbl, &finals],
        )
        .await?;
        lap("set_counters", 1);
    }
    tracing::debug!(
        table = tbl,
        ?steps,
        ms = started.elapsed().as_secs_f64() * 1e3,
        "table written (step, rows, ms)"
    );
    Ok((won, keys.pks.len() as u64 - won))
}

/// A key's version here, and where it is (its ctid: the version is then
/// updated without looking the key up again).
struct Found {
    version: (i64, i32),
    place: String,
}

/// The versions of a table's keys here, by the keys' index.
async fn read_versions(
    tx: &Transaction<'_>,
    tbl: &str,
    keys: &Keys<'_>,
) -> Result<Vec<Option<Found>>, tokio_postgres::Error> {
    let mut found: Vec<Option<Found>> = (0..keys.pks.len()).map(|_| None).collect();
    for r in tx
        .query(
            "SELECT k.ord, v.hlc, v.origin, v.ctid::text FROM unnest($2::jsonb[]) WITH ORDINALITY AS k(pk, ord)
               JOIN meridian.row_version v ON v.tbl = $1 AND v.pk = k.pk",
            &[&tbl, &keys.pks],
        )
        .await?
    {
        let i: i64 = r.get(0);
        found[(i - 1) as usize] = Some(Found {
            version: (r.get(1), r.get(2)),
            place: r.get(3),
        });
    }
    Ok(found)
}

/// What one table's apply writes: the rows to delete, insert (keys new
/// here) and upsert, and the versions to add and to update.
struct Decision<'a> {
    deletes: Vec<&'a Image>,
    inserts: Vec<&'a Image>,
    upserts: Vec<&'a Image>,
    new_versions: Versions<'a>,
    old_versions: Versions<'a>,
}

/// Decides, for each key, whether its newest change wins over the version
/// here (by (hlc, region), the change's region being `origin`), and how it
/// is written. `present` says which keys have a row when the rows were
/// locked one by one; with the table locked instead, a key without a
/// version is taken as new: after the sync point every row written here has
/// one, but rows from before capture do not (the insert then fails on the
/// key, and the rows are upserted: see `write_table`).
fn decide<'a>(
    keys: &Keys<'a>,
    mut found: Vec<Option<Found>>,
    present: Option<&[bool]>,
    origin: i32,
) -> Decision<'a> {
    let mut d = Decision {
        deletes: Vec::new(),
        inserts: Vec::new(),
        upserts: Vec::new(),
        new_versions: Versions::default(),
        old_versions: Versions::default(),
    };
    for (i, here) in found.iter_mut().enumerate() {
        let c = keys.newest[i];
        if here.as_ref().is_some_and(|f| (c.hlc, origin) <= f.version) {
            continue;
        }
        let deleted = c.op == Operation::Delete;
        let new = present.map_or(here.is_none(), |p| !p[i]);
        match (deleted, new, c.row.as_ref()) {
            (true, _, _) => d.deletes.push(keys.pks[i]),
            (false, true, Some(row)) => d.inserts.push(row),
            (false, false, Some(row)) => d.upserts.push(row),
            _ => {}
        }
        let v = match here.take() {
            Some(f) => {
                d.old_versions.places.push(f.place);
                &mut d.old_versions
            }
            None => &mut d.new_versions,
        };
        v.pks.push(keys.pks[i]);
        v.hlcs.push(c.hlc);
        v.deleted.push(deleted);
    }
    d
}

/// Row versions to write, as the columns of an `unnest`.
#[derive(Default)]
struct Versions<'a> {
    pks: Vec<&'a Image>,
    hlcs: Vec<i64>,
    deleted: Vec<bool>,
    /// Versions that exist: where each one is (ctid, as text).
    places: Vec<String>,
}

impl Versions<'_> {
    /// Updates existing versions where the lookup found them. By ctid, as
    /// a TID scan: the same UPDATE joined on the key (an index descent
    /// comparing `jsonb` keys per row) took 6-10x as long (227-404 ms
    /// against 25-38 ms for 8,000 versions). A version moved since the
    /// lookup cannot happen while the apply holds its locks; should one not
    /// be found where it was, the update is done again by key.
    async fn update(
        &self,
        tx: &Transaction<'_>,
        tbl: &str,
        origin: i32,
    ) -> Result<(), tokio_postgres::Error> {
        let by_place = tx
            .execute(
                "UPDATE meridian.row_version v SET hlc = x.hlc, origin = $2, deleted = x.deleted
                   FROM unnest($3::text[], $4::jsonb[], $5::int8[], $6::bool[]) AS x(place, pk, hlc, deleted)
                  WHERE v.ctid = x.place::tid AND v.tbl = $1 AND v.pk = x.pk",
                &[&tbl, &origin, &self.places, &self.pks, &self.hlcs, &self.deleted],
            )
            .await?;
        if by_place as usize == self.pks.len() {
            return Ok(());
        }
        tracing::debug!(
            table = tbl,
            expected = self.pks.len(),
            found = by_place,
            "row versions moved; updating by key"
        );
        tx.execute(
            "UPDATE meridian.row_version v SET hlc = x.hlc, origin = $2, deleted = x.deleted
               FROM unnest($3::jsonb[], $4::int8[], $5::bool[]) AS x(pk, hlc, deleted)
              WHERE v.tbl = $1 AND v.pk = x.pk",
            &[&tbl, &origin, &self.pks, &self.hlcs, &self.deleted],
        )
        .await?;
        Ok(())
    }

    /// As `meridian.row_version (tbl, pk, hlc, origin, deleted)` COPY text.
    fn copy_text(&self, tbl: &str, origin: i32) -> Vec<u8> {
        let mut text = Vec::with_capacity(self.pks.len() * 64);
        for ((pk, hlc), deleted) in self.pks.iter().zip(&self.hlcs).zip(&self.deleted) {
            copy_text::escape(&mut text, tbl.as_bytes());
            text.push(b'\t');
            copy_text::escape(&mut text, pk.to_json().as_bytes());
            let deleted = if *deleted { 't' } else { 'f' };
            text.extend_from_slice(format!("\t{hlc}\t{origin}\t{deleted}\n").as_bytes());
        }
        text
    }
}

#[cfg(test)]
mod tests;
