//! capture: meridian's own schema in each region's Postgres, and everything
//! that talks to it from meridian's side.
//!
//! Every committed change of a replicated table is read from the WAL through
//! the region's logical replication slot ([`wal`]), stamped with an HLC in
//! commit order and recorded in `meridian.change` and `meridian.row_version`
//! by SQL functions meridian installs; nothing of capture runs in the
//! client's transaction. The SQL lives in `migrations/`; this module owns
//!
//! - [`migrate`]: installing and upgrading that schema (versioned table
//!   migrations, then every function re-applied) and enabling capture on
//!   every replicated table, refusing tables without a primary key unless a
//!   rule declares them insert-only;
//! - [`wal`]: the capture task, and the barrier an apply waits on;
//! - [`reader`]: reading changes back in an order that never skips a change
//!   committed late by a transaction that started early;
//! - [`clock_store`]: the clock's persisted high-water mark and its lease.

mod assemble;
pub mod clock_store;
pub mod image;
mod migrate;
pub mod pgoutput;
pub mod reader;
pub mod roles;
mod rule_rows;
pub mod wal;
mod writer;

use tokio_postgres::{Client, NoTls};

use crate::config::Config;
use crate::wire::tls::BackendTls;

pub use migrate::{migrate, MigrateReport, Migration, MIGRATIONS};

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
    #[error(
        "the database has meridian's migrations only up to {0}; this meridian starts from migration \
         {baseline} (the tables as 0001-0011 left them): migrate it to {baseline} with the meridian it \
         came from first, or start this region's database afresh",
        baseline = migrate::BASELINE
    )]
    BeforeBaseline(i32),
    #[error("migrations/{file} failed: {}", describe(.source))]
    Reapplied {
        file: &'static str,
        source: tokio_postgres::Error,
    },
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
    #[error("backend.tls: {0}")]
    Tls(#[from] crate::wire::tls::TlsError),
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
    connect_as(config, &config.backend.user).await
}

/// As [`connect`], as role `user` (`meridian migrate` connects as
/// `backend.owner`, or as the role given with `--as`).
pub async fn connect_as(config: &Config, user: &str) -> Result<Client, CaptureError> {
    let b = &config.backend;
    let tls = BackendTls::from_config(b)?;
    connect_raw_as(config, user, tls.as_ref())
        .await
        .map_err(|source| CaptureError::Connect {
            target: format!(
                "host={} port={} user={} dbname={}{}",
                b.host,
                b.port,
                user,
                b.database,
                match (&tls, &b.tls_ca) {
                    (None, _) => String::new(),
                    (Some(_), None) => " over TLS, backend.tls = \"require\"".into(),
                    (Some(_), Some(ca)) => format!(
                        " over TLS, verified against backend.tls_ca = {}",
                        ca.display()
                    ),
                }
            ),
            source,
        })
}

/// As [`connect`], with `backend.tls` already loaded, and the driver's own
/// error.
pub async fn connect_raw(
    config: &Config,
    tls: Option<&BackendTls>,
) -> Result<Client, tokio_postgres::Error> {
    connect_raw_as(config, &config.backend.user, tls).await
}

async fn connect_raw_as(
    config: &Config,
    user: &str,
    tls: Option<&BackendTls>,
) -> Result<Client, tokio_postgres::Error> {
    let b = &config.backend;
    let mut pg = tokio_postgres::Config::new();
    pg.host(&b.host)
        .port(b.port)
        .user(user)
        .dbname(&b.database)
        .application_name("meridian")
        // What meridian commits (captured changes with the slot position
        // they reach, applied changes with the position a peer is then told
        // of, the clock's lease) is acted on at once: the slot releases that
        // WAL, the peer prunes, stamps are issued. So it must be durable when
        // the commit returns, also where the server's default is off.
        .options("-c synchronous_commit=on")
        .connect_timeout(b.connect_timeout);
    if let Some(p) = b.resolve_password() {
        pg.password(p);
    }
    let client = match tls {
        None => spawn_connection(pg.connect(NoTls).await?),
        Some(tls) => {
            // The rustls config decides what is checked (`require` checks
            // nothing, `verify-full` the chain and the host name); the
            // driver only has to insist on TLS.
            pg.ssl_mode(tokio_postgres::config::SslMode::Require);
            let connector = tokio_postgres_rustls::MakeRustlsConnect::new((*tls.config).clone());
            spawn_connection(pg.connect(connector).await?)
        }
    };
    Ok(client)
}

fn spawn_connection<S, T>(
    (client, connection): (Client, tokio_postgres::Connection<S, T>),
) -> Client
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "meridian's control connection ended");
        }
    });
    client
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_primary_key_message_names_tables_and_both_ways_out() {
        let m = no_primary_key_message(&["public.events".into(), "public.log".into()]);
        assert!(m.contains("public.events, public.log"));
        assert!(m.contains("ADD PRIMARY KEY"));
        assert!(m.contains("insert_only = true"));
    }
}
