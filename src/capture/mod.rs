//! capture: meridian's own schema in each region's Postgres, and everything
//! that talks to it from the proxy's side.
//!
//! Capture itself runs inside Postgres, atomically with each write: row
//! triggers installed by `meridian migrate` record every committed change of a
//! replicated table in `meridian.change`, stamped with the transaction's HLC
//! (set by the proxy, see `wire::relay`) or, for writes that bypass the proxy,
//! with a stamp made inside Postgres. The SQL lives in `migrations/`; this
//! module owns
//!
//! - [`migrate`]: applying those migrations (versioned, recorded in
//!   `meridian.migration`, idempotent, serialised by an advisory lock) and
//!   enabling capture on every replicated table, refusing tables without a
//!   primary key unless a rule declares them insert-only;
//! - [`reader`]: reading changes back in an order that never skips a change
//!   committed late by a transaction that started early;
//! - [`clock_store`]: the clock's persisted high-water mark and its lease.

mod assemble;
pub mod clock_store;
pub mod pgoutput;
pub mod reader;
mod rule_rows;
pub mod wal;
mod writer;

use tokio_postgres::{Client, NoTls};

use crate::config::Config;
use crate::rules::RuleSet;

/// One schema migration, embedded in the binary.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    pub version: i32,
    pub name: &'static str,
    pub sql: &'static str,
}

/// Every migration, in order. `migrations/NNNN_name.sql` on disk must match
/// this list (a unit test checks).
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "capture",
        sql: include_str!("../../migrations/0001_capture.sql"),
    },
    Migration {
        version: 2,
        name: "apply",
        sql: include_str!("../../migrations/0002_apply.sql"),
    },
    Migration {
        version: 3,
        name: "tombstones",
        sql: include_str!("../../migrations/0003_tombstones.sql"),
    },
    Migration {
        version: 4,
        name: "counters",
        sql: include_str!("../../migrations/0004_counters.sql"),
    },
    Migration {
        version: 5,
        name: "engine",
        sql: include_str!("../../migrations/0005_engine.sql"),
    },
    Migration {
        version: 6,
        name: "row_states",
        sql: include_str!("../../migrations/0006_row_states.sql"),
    },
    Migration {
        version: 7,
        name: "ddl",
        sql: include_str!("../../migrations/0007_ddl.sql"),
    },
    Migration {
        version: 8,
        name: "rules_ahead",
        sql: include_str!("../../migrations/0008_rules_ahead.sql"),
    },
    Migration {
        version: 9,
        name: "identity_always",
        sql: include_str!("../../migrations/0009_identity_always.sql"),
    },
    Migration {
        version: 10,
        name: "wal_capture",
        sql: include_str!("../../migrations/0010_wal_capture.sql"),
    },
    Migration {
        version: 11,
        name: "version_lookups",
        sql: include_str!("../../migrations/0011_version_lookups.sql"),
    },
];

/// Serialises concurrent `meridian migrate` runs against one database.
const MIGRATE_LOCK: i64 = 0x6d65_7269_6469_616e; // "meridian"

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("could not connect to PostgreSQL ({target}): {source}")]
    Connect {
        target: String,
        source: tokio_postgres::Error,
    },
    #[error("migration {version:04}_{name}.sql failed: {source}")]
    Migration {
        version: i32,
        name: &'static str,
        source: tokio_postgres::Error,
    },
    #[error(
        "the database has meridian migration {0}, newer than this meridian knows; upgrade meridian"
    )]
    NewerSchema(i32),
    #[error("{origin}: no function {function}(jsonb, jsonb, jsonb) in the database")]
    MissingFunction { origin: String, function: String },
    #[error("{origin}: table {table} has no column {column}")]
    MissingColumn {
        origin: String,
        table: String,
        column: String,
    },
    #[error("{}", no_primary_key_message(.0))]
    NoPrimaryKey(Vec<String>),
    #[error("meridian.change holds something this meridian cannot read: {0}")]
    Corrupt(String),
    #[error("the capture slot: {0}")]
    Slot(String),
    #[error("{0}")]
    Settings(String),
    #[error("{context}: {}", describe(.source))]
    Postgres {
        context: String,
        source: tokio_postgres::Error,
    },
}

/// A driver error with the server's own words when it has them.
pub fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} {}: {}", db.severity(), db.code().code(), db.message()),
        None => e.to_string(),
    }
}

fn no_primary_key_message(tables: &[String]) -> String {
    let list = tables.join(", ");
    format!(
        "cannot replicate {list}: no primary key, so rows cannot be matched across regions. \
         Either add a primary key (ALTER TABLE ... ADD PRIMARY KEY (...)), or declare the table \
         insert-only in a conflict-rules file ([[table]] name = \"{}\" insert_only = true), \
         which replicates each row once under a generated identity and refuses UPDATE and DELETE",
        tables.first().map(String::as_str).unwrap_or("schema.table")
    )
}

fn pg(context: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> CaptureError {
    let context = context.into();
    move |source| CaptureError::Postgres { context, source }
}

/// Opens meridian's own connection to the region's Postgres (`backend.user`,
/// `backend.database`). The connection task runs until the client is dropped.
pub async fn connect(config: &Config) -> Result<Client, CaptureError> {
    let b = &config.backend;
    connect_raw(config)
        .await
        .map_err(|source| CaptureError::Connect {
            target: format!(
                "host={} port={} user={} dbname={}",
                b.host, b.port, b.user, b.database
            ),
            source,
        })
}

/// As [`connect`], with the driver's own error.
pub async fn connect_raw(config: &Config) -> Result<Client, tokio_postgres::Error> {
    let b = &config.backend;
    let mut pg = tokio_postgres::Config::new();
    pg.host(&b.host)
        .port(b.port)
        .user(&b.user)
        .dbname(&b.database)
        .application_name("meridian")
        .connect_timeout(b.connect_timeout);
    if let Some(p) = b.resolve_password() {
        pg.password(p);
    }
    let (client, connection) = pg.connect(NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "meridian's control connection ended");
        }
    });
    Ok(client)
}

/// A connection for applying peers' changes: its transactions carry a
/// replication origin, so capture does not record them again.
pub async fn connect_apply(config: &Config) -> Result<Client, CaptureError> {
    let client = connect(config).await?;
    client
        .execute("SELECT meridian.apply_session_setup()", &[])
        .await
        .map_err(pg("marking the apply session"))?;
    Ok(client)
}

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
/// in a rule file. Idempotent. All-or-nothing after the schema migrations: a
/// table without a primary key (and not insert-only) refuses the whole run,
/// naming every such table.
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
    let mut report = MigrateReport::default();
    check_settings(client).await?;
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
    let applied: Vec<i32> = client
        .query(
            "SELECT version FROM meridian.migration ORDER BY version",
            &[],
        )
        .await
        .map_err(pg("reading meridian.migration"))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if let Some(&newest) = applied.last() {
        if !MIGRATIONS.iter().any(|m| m.version == newest) {
            return Err(CaptureError::NewerSchema(newest));
        }
    }
    for m in MIGRATIONS.iter().filter(|m| !applied.contains(&m.version)) {
        let failed = |source| CaptureError::Migration {
            version: m.version,
            name: m.name,
            source,
        };
        let tx = client.transaction().await.map_err(failed)?;
        tx.batch_execute(m.sql).await.map_err(failed)?;
        tx.execute(
            "INSERT INTO meridian.migration (version, name) VALUES ($1, $2)",
            &[&m.version, &m.name],
        )
        .await
        .map_err(failed)?;
        tx.commit().await.map_err(failed)?;
        report.applied.push((m.version, m.name));
    }

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
               AND (n.nspname = ANY($1) OR format('%I.%I', n.nspname, c.relname) = ANY($2))
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
        report.tables.push((name, status));
    }
    tx.commit().await.map_err(pg("committing capture setup"))?;
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
    Ok(report)
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

    #[test]
    fn embedded_migrations_match_the_directory() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
        let mut on_disk: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".sql"))
            .collect();
        on_disk.sort();
        let embedded: Vec<String> = MIGRATIONS
            .iter()
            .map(|m| format!("{:04}_{}.sql", m.version, m.name))
            .collect();
        assert_eq!(on_disk, embedded);
        assert!(MIGRATIONS.windows(2).all(|w| w[0].version < w[1].version));
    }

    #[test]
    fn no_primary_key_message_names_tables_and_both_ways_out() {
        let m = no_primary_key_message(&["public.events".into(), "public.log".into()]);
        assert!(m.contains("public.events, public.log"));
        assert!(m.contains("ADD PRIMARY KEY"));
        assert!(m.contains("insert_only = true"));
    }
}
