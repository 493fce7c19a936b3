//! `meridian migrate`: installing and upgrading meridian's schema in a
//! region's database, then enabling capture on every replicated table.
//!
//! The schema comes in two kinds of file (see `migrations/README.md`):
//! tables change through versioned migrations, applied once each and
//! recorded in `meridian.migration`; every function is defined in exactly one
//! file of `migrations/functions/`, and those files and `wiring.sql` (what
//! depends on the functions) are applied again on every run. All of it runs
//! in one transaction, so an upgrade is all or nothing, and a second run
//! changes nothing.

use tokio_postgres::Client;

use super::roles::Roles;
use super::{pg, rule_rows, CaptureError};
use crate::config::Config;
use crate::rules::RuleSet;

/// One versioned migration, embedded in the binary.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    pub version: i32,
    pub name: &'static str,
    pub sql: &'static str,
}

/// The first migration this meridian has: the tables as migrations 1-11
/// left them, so a database that applied those already has it.
pub const BASELINE: i32 = 11;

/// Every versioned migration, in order. `migrations/NNNN_name.sql` on disk
/// must match this list (a unit test checks).
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: BASELINE,
        name: "baseline",
        sql: include_str!("../../migrations/0011_baseline.sql"),
    },
    Migration {
        version: 12,
        name: "stamps_gone",
        sql: include_str!("../../migrations/0012_stamps_gone.sql"),
    },
    Migration {
        version: 13,
        name: "session_marks",
        sql: include_str!("../../migrations/0013_session_marks.sql"),
    },
    Migration {
        version: 14,
        name: "held_backoff",
        sql: include_str!("../../migrations/0014_held_backoff.sql"),
    },
    Migration {
        version: 15,
        name: "change_deps",
        sql: include_str!("../../migrations/0015_change_deps.sql"),
    },
];

/// The files applied on every run after the migrations: every function
/// (`functions/`, any order: bodies are not checked until they run), then
/// what depends on them.
const REAPPLIED: &[(&str, &str)] = &[
    (
        "functions/setup.sql",
        include_str!("../../migrations/functions/setup.sql"),
    ),
    (
        "functions/marks.sql",
        include_str!("../../migrations/functions/marks.sql"),
    ),
    (
        "functions/rules.sql",
        include_str!("../../migrations/functions/rules.sql"),
    ),
    (
        "functions/capture.sql",
        include_str!("../../migrations/functions/capture.sql"),
    ),
    (
        "functions/apply.sql",
        include_str!("../../migrations/functions/apply.sql"),
    ),
    (
        "functions/counters.sql",
        include_str!("../../migrations/functions/counters.sql"),
    ),
    (
        "functions/floors.sql",
        include_str!("../../migrations/functions/floors.sql"),
    ),
    (
        "functions/engine.sql",
        include_str!("../../migrations/functions/engine.sql"),
    ),
    (
        "functions/row_states.sql",
        include_str!("../../migrations/functions/row_states.sql"),
    ),
    (
        "functions/ddl.sql",
        include_str!("../../migrations/functions/ddl.sql"),
    ),
    ("wiring.sql", include_str!("../../migrations/wiring.sql")),
];

/// Checked (and made again, by a superuser) after the rest, outside the
/// owner's role: see the file.
const EVENT_TRIGGERS: &str = include_str!("../../migrations/event_triggers.sql");

/// Serialises concurrent `meridian migrate` runs against one database.
const MIGRATE_LOCK: i64 = 0x6d65_7269_6469_616e; // "meridian"

/// What `migrate` did.
#[derive(Debug, Default)]
pub struct MigrateReport {
    /// Migrations applied by this run (already applied ones are skipped).
    pub applied: Vec<(i32, &'static str)>,
    /// Replicated tables and what enabling capture said about each.
    pub tables: Vec<(String, String)>,
}

/// Installs or upgrades meridian's schema and enables capture on every
/// replicated table: each table of `replication.schemas` plus each table named
/// in a rule file. Idempotent. All-or-nothing after the schema: a table
/// without a primary key (and not insert-only) refuses the whole run, naming
/// every such table.
pub async fn migrate(
    client: &mut Client,
    config: &Config,
    rules: &RuleSet,
) -> Result<MigrateReport, CaptureError> {
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATE_LOCK])
        .await
        .map_err(pg("taking the migration lock"))?;
    let result = migrate_locked(client, config, rules).await;
    let _ = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATE_LOCK])
        .await;
    result
}

async fn migrate_locked(
    client: &mut Client,
    config: &Config,
    rules: &RuleSet,
) -> Result<MigrateReport, CaptureError> {
    let roles = Roles::of(config);
    let me = client
        .query_one(
            "SELECT current_user::text, rolsuper FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await
        .map_err(pg("reading who migrates"))?;
    let (me, superuser): (String, bool) = (me.get(0), me.get(1));
    let as_owner = match &roles {
        Some(r) if superuser => {
            super::roles::create(client, r, config).await?;
            (me != r.owner).then(|| r.owner.clone())
        }
        _ => None,
    };
    if let Some(owner) = &as_owner {
        client
            .batch_execute(&format!("SET ROLE {}", super::roles::ident(owner)))
            .await
            .map_err(pg(format!("SET ROLE {owner}")))?;
    }
    check_settings(client).await?;
    let applied = install_schema(client).await?;
    let tables = enable_capture(client, config, rules).await?;
    if let Some(r) = &roles {
        super::roles::grant_runtime(client, r).await?;
    }
    if as_owner.is_some() {
        client
            .batch_execute("RESET ROLE")
            .await
            .map_err(pg("RESET ROLE"))?;
    }
    client
        .batch_execute(EVENT_TRIGGERS)
        .await
        .map_err(|source| CaptureError::Reapplied {
            file: "event_triggers.sql",
            source,
        })?;
    // The slot is made outside any transaction that wrote (Postgres' rule);
    // from here on every committed change is kept for capture.
    client
        .execute(
            "SELECT pg_create_logical_replication_slot(meridian.slot_name(), 'pgoutput')
              WHERE NOT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = meridian.slot_name())",
            &[],
        )
        .await
        .map_err(pg("creating the capture slot"))?;
    Ok(MigrateReport { applied, tables })
}

/// The pending migrations, then every re-applied file, in one transaction.
/// Returns the migrations applied.
async fn install_schema(client: &mut Client) -> Result<Vec<(i32, &'static str)>, CaptureError> {
    client
        .batch_execute(
            "CREATE SCHEMA IF NOT EXISTS meridian;
             CREATE TABLE IF NOT EXISTS meridian.migration (
                 version int PRIMARY KEY,
                 name text NOT NULL,
                 applied_at timestamptz NOT NULL DEFAULT now())",
        )
        .await
        .map_err(pg("creating schema meridian"))?;
    let tx = client
        .transaction()
        .await
        .map_err(pg("starting the schema upgrade"))?;
    let done: Vec<i32> = tx
        .query(
            "SELECT version FROM meridian.migration ORDER BY version",
            &[],
        )
        .await
        .map_err(pg("reading meridian.migration"))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if let Some(&newest) = done.last() {
        if newest < BASELINE {
            return Err(CaptureError::BeforeBaseline(newest));
        }
        if !MIGRATIONS.iter().any(|m| m.version == newest) {
            return Err(CaptureError::NewerSchema(newest));
        }
    }
    let mut applied = Vec::new();
    for m in MIGRATIONS.iter().filter(|m| !done.contains(&m.version)) {
        let failed = |source| CaptureError::Migration {
            version: m.version,
            name: m.name,
            source,
        };
        tx.batch_execute(m.sql).await.map_err(failed)?;
        tx.execute(
            "INSERT INTO meridian.migration (version, name) VALUES ($1, $2)",
            &[&m.version, &m.name],
        )
        .await
        .map_err(failed)?;
        applied.push((m.version, m.name));
    }
    // Functions may call ones defined in a later file.
    tx.batch_execute("SET LOCAL check_function_bodies = off")
        .await
        .map_err(pg("setting check_function_bodies"))?;
    for &(file, sql) in REAPPLIED {
        tx.batch_execute(sql)
            .await
            .map_err(|source| CaptureError::Reapplied { file, source })?;
    }
    tx.commit()
        .await
        .map_err(pg("committing the schema upgrade"))?;
    Ok(applied)
}

/// Configures the region, records the rules and enables capture on every
/// replicated table (and refreshes it on every table captured so far, so a
/// changed capture function reaches them), in one transaction.
async fn enable_capture(
    client: &mut Client,
    config: &Config,
    rules: &RuleSet,
) -> Result<Vec<(String, String)>, CaptureError> {
    let tx = client
        .transaction()
        .await
        .map_err(pg("starting capture setup"))?;
    let r = &config.replication;
    tx.execute(
        "SELECT meridian.configure($1, $2, $3, $4)",
        &[
            &i32::from(config.region.id),
            &config.region.name,
            &r.schemas,
            &i32::from(r.sequence_stride),
        ],
    )
    .await
    .map_err(pg("meridian.configure"))?;
    let rule_tables = rule_rows::record(&tx, rules).await?;
    let candidates = tx
        .query(
            "SELECT format('%I.%I', n.nspname, c.relname) AS name,
                    EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary) AS has_pk,
                    COALESCE((SELECT t.insert_only FROM meridian.replicated_table t
                              WHERE t.tbl = format('%I.%I', n.nspname, c.relname)), false) AS insert_only
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE c.relkind = 'r' AND c.relpersistence = 'p' AND NOT c.relispartition
               AND (n.nspname = ANY($1) OR format('%I.%I', n.nspname, c.relname) = ANY($2)
                    OR meridian.is_captured(c.oid))
               AND n.nspname <> 'meridian'
             ORDER BY 1",
            &[&r.schemas, &rule_tables],
        )
        .await
        .map_err(pg("listing replicated tables"))?;
    let refused: Vec<String> = candidates
        .iter()
        .filter(|row| !row.get::<_, bool>(1) && !row.get::<_, bool>(2))
        .map(|row| row.get(0))
        .collect();
    if !refused.is_empty() {
        return Err(CaptureError::NoPrimaryKey(refused));
    }
    let mut tables = Vec::new();
    for row in &candidates {
        let name: String = row.get(0);
        let status: String = tx
            .query_one(
                "SELECT meridian.enable_capture($1::text::regclass)",
                &[&name],
            )
            .await
            .map_err(pg(format!("enabling capture on {name}")))?
            .get(0);
        tables.push((name, status));
    }
    tx.commit().await.map_err(pg("committing capture setup"))?;
    Ok(tables)
}

/// Capture reads the WAL through a logical replication slot: Postgres must
/// be configured for it. Says which settings to change, with the lines.
async fn check_settings(client: &Client) -> Result<(), CaptureError> {
    let row = client
        .query_one(
            "SELECT current_setting('wal_level'),
                    current_setting('max_replication_slots')::int,
                    current_setting('max_wal_senders')::int,
                    (SELECT count(*) FROM pg_replication_slots)::int
                      + (SELECT count(*) FROM pg_replication_origin)::int,
                    (SELECT count(*) FROM pg_stat_replication)::int",
            &[],
        )
        .await
        .map_err(pg("reading the server's settings"))?;
    let (level, slots, senders, used_slots, used_senders): (String, i32, i32, i32, i32) =
        (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
    let mut fix = Vec::new();
    if level != "logical" {
        fix.push(format!("wal_level = logical            # now {level}"));
    }
    if slots <= used_slots {
        fix.push(format!(
            "max_replication_slots = {}      # now {slots}, {used_slots} in use (slots and origins); meridian needs one slot per database and an origin per peer",
            used_slots + 20
        ));
    }
    if senders <= used_senders {
        fix.push(format!(
            "max_wal_senders = {}            # now {senders}, {used_senders} in use; meridian needs one per database",
            used_senders + 10
        ));
    }
    if fix.is_empty() {
        return Ok(());
    }
    Err(CaptureError::Settings(format!(
        "meridian captures changes from the WAL through a logical replication slot, and this \
         PostgreSQL is not set up for it. Add to postgresql.conf (or ALTER SYSTEM SET ...), \
         then restart PostgreSQL:\n    {}",
        fix.join("\n    ")
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sql_files(dir: &str) -> Vec<String> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".sql"))
            .collect();
        names.sort();
        names
    }

    #[test]
    fn embedded_migrations_match_the_directory() {
        let embedded: Vec<String> = MIGRATIONS
            .iter()
            .map(|m| format!("{:04}_{}.sql", m.version, m.name))
            .chain(["event_triggers.sql".to_string(), "wiring.sql".to_string()])
            .collect();
        let mut on_disk = sql_files("migrations");
        on_disk.sort_by_key(|n| !n.starts_with(|c: char| c.is_ascii_digit()));
        assert_eq!(on_disk, embedded);
        assert!(MIGRATIONS.windows(2).all(|w| w[0].version < w[1].version));
        assert_eq!(MIGRATIONS[0].version, BASELINE);
    }

    #[test]
    fn every_function_file_is_reapplied_and_only_defines_functions() {
        let mut reapplied: Vec<String> = REAPPLIED
            .iter()
            .filter_map(|(f, _)| f.strip_prefix("functions/"))
            .map(String::from)
            .collect();
        reapplied.sort();
        assert_eq!(reapplied, sql_files("migrations/functions"));
        for (file, sql) in REAPPLIED
            .iter()
            .filter(|(f, _)| f.starts_with("functions/"))
        {
            for line in sql.lines().filter(|l| l.starts_with("CREATE")) {
                assert!(
                    line.starts_with("CREATE OR REPLACE FUNCTION meridian."),
                    "{file}: {line}"
                );
            }
        }
    }
}
