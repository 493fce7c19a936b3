//! replication::resolve: applying the changes of tables whose conflicts the
//! rule engine decides (`rules::merge`), inside the receiver's transaction,
//! after the batch's other changes are applied (`replication::apply`),
//! which then records the batch's position.
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

use super::protocol::{Change, Operation};
use crate::capture::image::Image;
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
    pub fn handles(&self, change: &Change) -> bool {
        change.op.is_row() && self.tables.contains_key(&change.tbl)
    }

    /// The engine of table `tbl`, if it has one.
    pub fn get(&self, tbl: &str) -> Option<&Engine> {
        self.tables.get(tbl)
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
    changes: &[&Change],
) -> Result<Outcome, tokio_postgres::Error> {
    let mut by_table: BTreeMap<&str, Vec<&Change>> = BTreeMap::new();
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
        let mut by_key: Vec<(String, Vec<&Change>)> = Vec::new();
        for c in changes {
            let key = c.pk.as_ref().map(Image::to_json).unwrap_or_default();
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
    changes: &[&Change],
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
    changes: &[&Change],
    error: &tokio_postgres::Error,
) -> Result<(), tokio_postgres::Error> {
    let (message, sqlstate) = match error.as_db_error() {
        Some(db) => (db.message().to_string(), db.code().code().to_string()),
        None => (error.to_string(), "XX000".to_string()),
    };
    tracing::warn!(origin, table = %changes[0].tbl, error = %message, "changes held (see meridian.held)");
    let batch = serde_json::to_value(changes).expect("changes serialise");
    tx.execute(
        "SELECT meridian.hold($1, $2, $3, $4)",
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
    changes: &[&Change],
) -> Result<(u64, Vec<&'static str>), tokio_postgres::Error> {
    // Keys in first-seen order; local state per key.
    let mut keys: Vec<Value> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    for c in changes {
        let pk = c.pk.as_ref().map_or(Value::Null, Image::to_value);
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
        let pk = c.pk.as_ref().map_or(Value::Null, Image::to_value);
        let i = index[&pk.to_string()];
        let deleted = c.op == Operation::Delete;
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
            cols: cols_from_json(c.cols.as_ref().map(Image::to_value).as_ref()),
            deleted,
            row: if deleted {
                Row::new()
            } else {
                object(c.row.as_ref().map(Image::to_value).as_ref())
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
