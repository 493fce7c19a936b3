//! replication::resolve: applying the changes of tables whose conflicts the
//! rule engine decides (`rules::merge`), inside the receiver's transaction,
//! after `meridian.apply_batch` has applied the batch's other changes; the
//! receiver then records the batch's position.
//!
//! Per table of a batch: lock and read the keys' rows and versions
//! (`meridian.engine_read`), fold the changes through the table's engine in
//! stream order, write the resulting rows and versions
//! (`meridian.engine_write`) and log every conflict in `meridian.conflict`.
//! Each table runs under a savepoint: if it fails (the table is missing
//! here, a constraint refuses a row), its changes go to `meridian.held` with
//! the error and the rest of the batch goes on. Lost deadlocks and
//! serialization failures abort the whole transaction instead (the receiver
//! retries the batch).

use std::collections::{BTreeMap, HashMap};

use serde_json::{json, Value};
use tokio_postgres::error::SqlState;
use tokio_postgres::Transaction;

use super::protocol::WireChange;
use crate::clock::Version;
use crate::config::Config;
use crate::rules::merge::{
    cols_from_json, cols_to_json, Cols, Conflict, Engine, Incoming, Resolution, Row, Side, Stored,
};
use crate::rules::{RuleSet, RulesError};

/// The engines of every table whose rule needs one, by qualified name.
#[derive(Debug, Default, Clone)]
pub struct Engines {
    tables: HashMap<String, Engine>,
}

impl Engines {
    /// Compiles the rules of `config`'s rule directory; region names are
    /// this region's and its peers'.
    pub fn load(config: &Config) -> Result<Engines, RulesError> {
        Engines::from_rules(&RuleSet::load(&config.replication.rules)?, config)
    }

    pub fn from_rules(rules: &RuleSet, config: &Config) -> Result<Engines, RulesError> {
        let region_id = |name: &str| {
            if name == config.region.name {
                return Some(config.region.id);
            }
            config
                .replication
                .peers
                .iter()
                .find(|p| p.name == name)
                .map(|p| p.id)
        };
        let mut tables = HashMap::new();
        for rule in rules.tables.iter().filter(|r| r.needs_engine()) {
            tables.insert(rule.qualified(), rule.engine(region_id)?);
        }
        Ok(Engines { tables })
    }

    pub fn is_empty(&self) -> bool {
        self.tables.is_empty()
    }

    /// Whether `change` is for the engine (an insert, update or delete of an
    /// engine table).
    pub fn handles(&self, change: &WireChange) -> bool {
        matches!(change.op.as_str(), "I" | "U" | "D") && self.tables.contains_key(&change.tbl)
    }

    /// Whether the engine decides the conflicts of table `tbl`.
    pub fn decides(&self, tbl: &str) -> bool {
        self.tables.contains_key(tbl)
    }
}

/// The engines in force, replaced as a whole when the rules are reloaded
/// (SIGHUP); readers take the current set per batch.
#[derive(Debug, Clone, Default)]
pub struct EngineHandle(std::sync::Arc<std::sync::RwLock<std::sync::Arc<Engines>>>);

impl EngineHandle {
    pub fn new(engines: Engines) -> EngineHandle {
        EngineHandle(std::sync::Arc::new(std::sync::RwLock::new(
            std::sync::Arc::new(engines),
        )))
    }

    pub fn current(&self) -> std::sync::Arc<Engines> {
        self.0.read().expect("not poisoned").clone()
    }

    pub fn replace(&self, engines: Engines) {
        *self.0.write().expect("not poisoned") = std::sync::Arc::new(engines);
    }

    /// Reads the rule files again, records them in the database (as
    /// `meridian migrate` does) and puts them in force. On any mistake the
    /// rules in force stay, and the error says why.
    pub async fn reload(&self, config: &Config) -> Result<usize, String> {
        let rules = RuleSet::load(&config.replication.rules).map_err(|e| e.to_string())?;
        let engines = Engines::from_rules(&rules, config).map_err(|e| e.to_string())?;
        // Recording rules is a migrate: it runs as the schema's owner.
        let b = &config.backend;
        let mut client = crate::capture::connect_as(config, b.owner.as_ref().unwrap_or(&b.user))
            .await
            .map_err(|e| e.to_string())?;
        crate::capture::migrate(&mut client, config, &rules)
            .await
            .map_err(|e| e.to_string())?;
        self.replace(engines);
        Ok(rules.tables.len())
    }
}

/// What the engine did with a batch's changes.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub applied: u64,
    pub conflicts: u64,
    pub held: u64,
    /// Conflicts by (table, rule that decided).
    pub by_rule: BTreeMap<(String, &'static str), u64>,
    /// Tables whose changes were held.
    pub held_tables: Vec<String>,
    /// Foreign-key orphans found after the batch (see `meridian.handle_orphans`).
    pub orphans: u64,
}

fn version(hlc: i64, region: i32) -> Version {
    Version {
        hlc: hlc as u64,
        region: region as u16,
    }
}

/// The `winner` of a state a custom function made (no write's version).
const MERGED: Version = Version { hlc: 0, region: 0 };

fn object(v: Option<&Value>) -> Row {
    match v {
        Some(Value::Object(m)) => m.clone(),
        _ => Row::new(),
    }
}

/// Applies `changes` (all for engine tables, from `origin`, after its
/// recorded position) in `tx`.
pub async fn apply(
    tx: &mut Transaction<'_>,
    engines: &Engines,
    origin: u16,
    changes: &[&WireChange],
) -> Result<Outcome, tokio_postgres::Error> {
    let mut by_table: BTreeMap<&str, Vec<&WireChange>> = BTreeMap::new();
    for c in changes {
        by_table.entry(c.tbl.as_str()).or_default().push(c);
    }
    let mut outcome = Outcome::default();
    for (tbl, changes) in by_table {
        let Some(engine) = engines.tables.get(tbl) else {
            continue;
        };
        if apply_group(tx, engine, tbl, origin, &changes, &mut outcome, false).await? {
            continue;
        }
        let held_before = outcome.held;
        // The table's changes failed together: one key at a time, so a row
        // that cannot be written holds only its own key's changes.
        let mut by_key: Vec<(String, Vec<&WireChange>)> = Vec::new();
        for c in changes {
            let key = c.pk.as_ref().map(|k| k.to_string()).unwrap_or_default();
            match by_key.iter_mut().find(|(k, _)| *k == key) {
                Some((_, group)) => group.push(c),
                None => by_key.push((key, vec![c])),
            }
        }
        for (_, group) in by_key {
            apply_group(tx, engine, tbl, origin, &group, &mut outcome, true).await?;
        }
        if outcome.held > held_before {
            outcome.held_tables.push(tbl.to_string());
        }
    }
    Ok(outcome)
}

/// Applies one group of a table's changes in a savepoint. On failure the
/// savepoint is rolled back and, when `hold_failed`, the group is held;
/// returns whether it was applied.
async fn apply_group(
    tx: &mut Transaction<'_>,
    engine: &Engine,
    tbl: &str,
    origin: u16,
    changes: &[&WireChange],
    outcome: &mut Outcome,
    hold_failed: bool,
) -> Result<bool, tokio_postgres::Error> {
    let mut sp = tx.savepoint("meridian_engine").await?;
    match apply_table(&mut sp, engine, tbl, origin, changes).await {
        Ok((applied, rules)) => {
            sp.commit().await?;
            outcome.applied += applied;
            for rule in rules {
                outcome.conflicts += 1;
                *outcome.by_rule.entry((tbl.to_string(), rule)).or_default() += 1;
            }
            Ok(true)
        }
        Err(e) if is_retryable(&e) => Err(e),
        Err(e) => {
            sp.rollback().await?;
            if hold_failed {
                hold(tx, origin, changes, &e).await?;
                outcome.held += changes.len() as u64;
            }
            Ok(false)
        }
    }
}

/// A lost deadlock or serialization race: the whole batch is retried.
pub(crate) fn is_retryable(e: &tokio_postgres::Error) -> bool {
    e.code().is_some_and(|c| {
        *c == SqlState::T_R_DEADLOCK_DETECTED || *c == SqlState::T_R_SERIALIZATION_FAILURE
    })
}

async fn hold(
    tx: &Transaction<'_>,
    origin: u16,
    changes: &[&WireChange],
    error: &tokio_postgres::Error,
) -> Result<(), tokio_postgres::Error> {
    let (message, sqlstate) = match error.as_db_error() {
        Some(db) => (db.message().to_string(), db.code().code().to_string()),
        None => (error.to_string(), "XX000".to_string()),
    };
    tracing::warn!(origin, table = %changes[0].tbl, error = %message, "changes held (see meridian.held)");
    let batch = serde_json::to_value(changes).expect("changes serialise");
    tx.execute(
        "INSERT INTO meridian.held (origin, xid, seq, tbl, change, error, sqlstate)
         SELECT $1, (c ->> 'xid')::bigint, (c ->> 'seq')::bigint, c ->> 'tbl', c, $3, $4
           FROM jsonb_array_elements($2) c
         ON CONFLICT DO NOTHING",
        &[&i32::from(origin), &batch, &message, &sqlstate],
    )
    .await?;
    Ok(())
}

/// One table's changes: read, resolve, write, log. Returns the changes
/// applied without conflict, and the rule that decided each conflict.
async fn apply_table(
    tx: &mut Transaction<'_>,
    engine: &Engine,
    tbl: &str,
    origin: u16,
    changes: &[&WireChange],
) -> Result<(u64, Vec<&'static str>), tokio_postgres::Error> {
    // Keys in first-seen order; local state per key.
    let mut keys: Vec<Value> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    for c in changes {
        let pk = c.pk.clone().unwrap_or(Value::Null);
        index.entry(pk.to_string()).or_insert_with(|| {
            keys.push(pk);
            keys.len() - 1
        });
    }
    let rows = tx
        .query(
            "SELECT pk, \"row\", hlc, origin, deleted, winner_hlc, winner_origin,
                    epoch, tag_hlc, tag_origin, cols, gen
               FROM meridian.engine_read($1, $2)",
            &[&tbl, &Value::Array(keys.clone())],
        )
        .await?;
    let mut state: Vec<Option<Stored>> = vec![None; keys.len()];
    for r in &rows {
        let pk: Value = r.get(0);
        let Some(&i) = index.get(&pk.to_string()) else {
            continue;
        };
        let row: Option<Value> = r.get(1);
        let (v, deleted) = match (r.get::<_, Option<i64>>(2), r.get::<_, Option<i32>>(3)) {
            (Some(hlc), Some(origin)) => (version(hlc, origin), r.get::<_, bool>(4)),
            // A row from before capture was enabled: the oldest version.
            _ if row.is_some() => (version(0, 0), false),
            _ => continue, // nothing here: the change applies as new
        };
        let winner = match (r.get::<_, Option<i64>>(5), r.get::<_, Option<i32>>(6)) {
            (Some(h), Some(o)) => version(h, o),
            _ => v,
        };
        state[i] = Some(Stored {
            version: v,
            winner,
            epoch: r.get::<_, Option<i32>>(7).unwrap_or(0) as u32,
            gen: r.get::<_, Option<i32>>(11).unwrap_or(0) as u32,
            tag: match (r.get::<_, Option<i64>>(8), r.get::<_, Option<i32>>(9)) {
                (Some(h), Some(o)) => version(h, o),
                _ => winner,
            },
            cols: cols_from_json(r.get::<_, Option<Value>>(10).as_ref()),
            deleted,
            row: if deleted {
                Row::new()
            } else {
                object(row.as_ref())
            },
        });
    }
    // Keys with neither row nor version were not locked by the read:
    // engine_write checks they are still absent.
    let fresh: Vec<bool> = state.iter().map(Option::is_none).collect();
    let mut changed = vec![false; keys.len()];
    let mut conflicts = Vec::new();
    let mut rules = Vec::new();
    let mut applied = 0u64;
    for c in changes {
        let pk = c.pk.clone().unwrap_or(Value::Null);
        let i = index[&pk.to_string()];
        let deleted = c.op == "D";
        let v = version(c.hlc, i32::from(origin));
        let remote = Incoming {
            version: v,
            base: c.base_hlc.zip(c.base_origin).map(|(h, o)| version(h, o)),
            epoch: c.epoch.unwrap_or(0) as u32,
            gen: c.gen.unwrap_or(0) as u32,
            tag: c
                .tag_hlc
                .zip(c.tag_origin)
                .map_or(v, |(h, o)| version(h, o)),
            cols: cols_from_json(c.cols.as_ref()),
            deleted,
            row: if deleted {
                Row::new()
            } else {
                object(c.row.as_ref())
            },
        };
        let local = state[i].take();
        let before = local.clone();
        let remote_row = (!deleted).then(|| Value::Object(remote.row.clone()));
        let remote_version = remote.version;
        let r = match (&engine.function, &before) {
            // A state the function made (winner MERGED) is no write's: even
            // a change made on top of its identity at the origin was made
            // on the origin's own state, so the function decides again.
            (Some(function), Some(l))
                if (Engine::conflicts(l, &remote)
                    || (l.winner == MERGED && l.version != remote.version))
                    && !engine.deletes_decide(l, &remote) =>
            {
                custom(tx, function, tbl, l, remote).await?
            }
            _ => engine.resolve(local, remote),
        };
        changed[i] |= r.changed;
        match (&r.conflict, &before) {
            (Some(conflict), Some(l)) => conflicts.push({
                rules.push(conflict.rule);
                json!({
                "tbl": tbl,
                "pk": pk,
                "rule": conflict.rule,
                "kept": match conflict.kept { Side::Local => "local", Side::Remote => "remote" },
                "merged": conflict.merged.iter().map(|&m| engine.columns[m].0.as_str()).collect::<Vec<_>>(),
                "local_row": (!l.deleted).then(|| Value::Object(l.row.clone())),
                "local_hlc": l.version.hlc as i64,
                "local_origin": l.version.region,
                "remote_row": remote_row,
                "remote_hlc": remote_version.hlc as i64,
                "remote_origin": remote_version.region,
                "result_row": (!r.stored.deleted).then(|| Value::Object(r.stored.row.clone())),
                })
            }),
            _ => applied += u64::from(r.changed),
        }
        state[i] = Some(r.stored);
    }
    let results: Vec<Value> = keys
        .iter()
        .zip(&state)
        .zip(changed.iter().zip(&fresh))
        .filter(|(_, (&c, _))| c)
        .filter_map(|((pk, s), (_, &fresh))| s.as_ref().map(|s| (pk, s, fresh)))
        .map(|(pk, s, fresh)| {
            let winner = (s.winner != s.version).then_some(s.winner);
            json!({
                "pk": pk,
                "fresh": fresh,
                "deleted": s.deleted,
                "row": Value::Object(s.row.clone()),
                "hlc": s.version.hlc as i64,
                "origin": s.version.region,
                "winner_hlc": winner.map(|w| w.hlc as i64),
                "winner_origin": winner.map(|w| w.region),
                "epoch": s.epoch,
                "gen": s.gen,
                "tag_hlc": s.tag.hlc as i64,
                "tag_origin": s.tag.region,
                "cols": cols_to_json(&s.cols),
            })
        })
        .collect();
    if !results.is_empty() {
        tx.execute(
            "SELECT meridian.engine_write($1, $2)",
            &[&tbl, &Value::Array(results)],
        )
        .await?;
    }
    if !conflicts.is_empty() {
        tx.execute(
            "INSERT INTO meridian.conflict (tbl, pk, rule, kept, merged, local_row, local_hlc, local_origin,
                                            remote_row, remote_hlc, remote_origin, result_row)
             SELECT c.tbl, c.pk, c.rule, c.kept, ARRAY(SELECT jsonb_array_elements_text(c.merged)),
                    c.local_row, c.local_hlc, c.local_origin, c.remote_row, c.remote_hlc, c.remote_origin,
                    c.result_row
               FROM jsonb_to_recordset($1) AS c(tbl text, pk jsonb, rule text, kept text, merged jsonb,
                                                local_row jsonb, local_hlc bigint, local_origin int,
                                                remote_row jsonb, remote_hlc bigint, remote_origin int,
                                                result_row jsonb)",
            &[&Value::Array(conflicts)],
        )
        .await?;
    }
    Ok((applied, rules))
}

/// A conflict on a table with a custom policy: `function(local, remote,
/// meta)` returns the row to keep (NULL: deleted). The state's identity is
/// the larger version, as for the built-in rules.
async fn custom(
    tx: &mut Transaction<'_>,
    function: &str,
    tbl: &str,
    local: &Stored,
    remote: Incoming,
) -> Result<Resolution, tokio_postgres::Error> {
    let row_of = |deleted: bool, row: &Row| (!deleted).then(|| Value::Object(row.clone()));
    let meta = json!({
        "table": tbl,
        "local": {"hlc": local.version.hlc, "region": local.version.region},
        "remote": {"hlc": remote.version.hlc, "region": remote.version.region},
    });
    // The name was checked to be schema.name of plain identifiers.
    let decided: Option<Value> = tx
        .query_one(
            &format!("SELECT {function}($1::jsonb, $2::jsonb, $3::jsonb)"),
            &[
                &row_of(local.deleted, &local.row),
                &row_of(remote.deleted, &remote.row),
                &meta,
            ],
        )
        .await?
        .get(0);
    let version = local.version.max(remote.version);
    let stored = Stored {
        version,
        winner: MERGED,
        epoch: local.epoch.max(remote.epoch),
        gen: local.gen.max(remote.gen),
        tag: local.tag.min(remote.tag),
        cols: Cols::new(),
        deleted: decided.is_none(),
        row: object(decided.as_ref()),
    };
    let changed = stored != *local;
    Ok(Resolution {
        stored,
        conflict: Some(Conflict {
            rule: "custom",
            kept: if decided.as_ref() == row_of(remote.deleted, &remote.row).as_ref() {
                Side::Remote
            } else {
                Side::Local
            },
            merged: Vec::new(),
        }),
        changed,
    })
}

/// Retries held changes of engine tables (up to 1000, oldest first), one
/// transaction per origin; those that apply leave `meridian.held`. Returns
/// how many did.
pub async fn retry_held(
    client: &mut tokio_postgres::Client,
    engines: &Engines,
) -> Result<u64, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT origin, change, sqlstate FROM meridian.held h
              WHERE h.change ->> 'op' IN ('I', 'U', 'D') AND meridian.is_engine_table(h.tbl)
                AND h.next_try <= now()
              ORDER BY origin, xid, seq LIMIT 1000",
            &[],
        )
        .await?;
    let mut by_origin: BTreeMap<i32, Vec<(WireChange, bool)>> = BTreeMap::new();
    for r in &rows {
        let change: Value = r.get(1);
        let unique = r.get::<_, Option<&str>>(2) == Some("23505");
        if let Ok(c) = serde_json::from_value::<WireChange>(change) {
            by_origin.entry(r.get(0)).or_default().push((c, unique));
        }
    }
    let mut unheld = 0;
    for (origin, changes) in by_origin {
        let mut tx = client.transaction().await?;
        tx.batch_execute(super::apply::SETTINGS).await?;
        // A change held on a unique value other than the key: the local
        // row holding it and the change are compared as incarnations, by
        // the table's policy; a losing change is dropped, a losing row
        // deleted (both logged). See migrations/functions/engine.sql.
        let mut lost = Vec::new();
        for (c, _) in changes.iter().filter(|(c, unique)| *unique && c.op != "D") {
            let Some(engine) = engines.tables.get(&c.tbl) else {
                continue;
            };
            let priority: Vec<i32> = engine.priority.iter().map(|&r| i32::from(r)).collect();
            let outcome: String = tx
                .query_one(
                    "SELECT meridian.resolve_unique($1, $2, $3, $4)",
                    &[
                        &origin,
                        &serde_json::to_value(c).expect("serialises"),
                        &engine.policy.name(),
                        &priority,
                    ],
                )
                .await?
                .get(0);
            if outcome == "lost" {
                lost.push((c.xid, c.seq));
            }
        }
        let refs: Vec<&WireChange> = changes
            .iter()
            .map(|(c, _)| c)
            .filter(|c| !lost.contains(&(c.xid, c.seq)))
            .collect();
        let outcome = apply(&mut tx, engines, origin as u16, &refs).await?;
        let done: Vec<&WireChange> = changes
            .iter()
            .map(|(c, _)| c)
            .filter(|c| !outcome.held_tables.contains(&c.tbl))
            .collect();
        let xids: Vec<i64> = done.iter().map(|c| c.xid as i64).collect();
        let seqs: Vec<i64> = done.iter().map(|c| c.seq).collect();
        tx.execute(
            "DELETE FROM meridian.held h USING unnest($2::bigint[], $3::bigint[]) AS d(xid, seq)
              WHERE h.origin = $1 AND h.xid = d.xid AND h.seq = d.seq",
            &[&origin, &xids, &seqs],
        )
        .await?;
        // The others wait longer before their next try.
        let (xids, seqs): (Vec<i64>, Vec<i64>) = changes
            .iter()
            .map(|(c, _)| c)
            .filter(|c| outcome.held_tables.contains(&c.tbl))
            .map(|c| (c.xid as i64, c.seq))
            .unzip();
        tx.execute(
            "UPDATE meridian.held h SET attempts = h.attempts + 1, next_try = meridian.held_next_try(h.attempts + 1)
               FROM unnest($2::bigint[], $3::bigint[]) AS d(xid, seq)
              WHERE h.origin = $1 AND h.xid = d.xid AND h.seq = d.seq",
            &[&origin, &xids, &seqs],
        )
        .await?;
        tx.commit().await?;
        unheld += done.len() as u64;
    }
    Ok(unheld)
}

/// One entry of the conflict log.
#[derive(Debug, Clone, PartialEq)]
pub struct LoggedConflict {
    pub at: String,
    pub table: String,
    pub key: Value,
    pub rule: String,
    pub kept: String,
    pub merged: Vec<String>,
    pub local: Option<Value>,
    pub local_version: (i64, i32),
    pub remote: Option<Value>,
    pub remote_version: (i64, i32),
    pub result: Option<Value>,
    /// The physical times of the two versions (UTC, time of day).
    pub local_time: String,
    pub remote_time: String,
}

/// The newest `limit` entries of the conflict log, optionally of one table
/// and no older than `since`, newest first.
pub async fn recent_conflicts(
    client: &tokio_postgres::Client,
    table: Option<&str>,
    since: Option<std::time::Duration>,
    limit: i64,
) -> Result<Vec<LoggedConflict>, tokio_postgres::Error> {
    let since_s = since.map(|d| d.as_secs_f64());
    let rows = client
        .query(
            "SELECT to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.MS'), tbl, pk, rule, kept, merged,
                    local_row, local_hlc, local_origin, remote_row, remote_hlc, remote_origin, result_row,
                    to_char(meridian.hlc_time(local_hlc) AT TIME ZONE 'UTC', 'HH24:MI:SS.MS'),
                    to_char(meridian.hlc_time(remote_hlc) AT TIME ZONE 'UTC', 'HH24:MI:SS.MS')
               FROM meridian.conflict
              WHERE ($1::text IS NULL OR tbl = $1 OR tbl = 'public.' || $1)
                AND ($2::float8 IS NULL OR at >= now() - make_interval(secs => $2))
              ORDER BY id DESC
              LIMIT $3",
            &[&table, &since_s, &limit],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| LoggedConflict {
            at: r.get(0),
            table: r.get(1),
            key: r.get(2),
            rule: r.get(3),
            kept: r.get(4),
            merged: r.get(5),
            local: r.get(6),
            local_version: (r.get(7), r.get(8)),
            remote: r.get(9),
            remote_version: (r.get(10), r.get(11)),
            result: r.get(12),
            local_time: r.get(13),
            remote_time: r.get(14),
        })
        .collect())
}

/// A logged conflict as a few readable lines.
pub fn describe(c: &LoggedConflict) -> String {
    let text = |v: &Option<Value>| match v {
        Some(v) => v.to_string(),
        None => "(deleted)".into(),
    };
    let merged = if c.merged.is_empty() {
        String::new()
    } else {
        format!("; merged {}", c.merged.join(", "))
    };
    format!(
        "{} UTC  {} {}  decided by {}: kept the {} version{}\n    here:   {}  (region {}, written {})\n    remote: {}  (region {}, written {})\n    now:    {}\n",
        c.at,
        c.table,
        c.key,
        c.rule,
        c.kept,
        merged,
        text(&c.local),
        c.local_version.1,
        c.local_time,
        text(&c.remote),
        c.remote_version.1,
        c.remote_time,
        text(&c.result),
    )
}

/// Deletes conflict log entries older than `retention`; returns how many.
pub async fn prune_conflicts(
    client: &tokio_postgres::Client,
    retention: std::time::Duration,
) -> Result<u64, tokio_postgres::Error> {
    client
        .execute(
            "DELETE FROM meridian.conflict WHERE at < now() - make_interval(secs => $1)",
            &[&retention.as_secs_f64()],
        )
        .await
}
