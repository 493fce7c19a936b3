//! Capture from the WAL: the region's committed transactions, read from its
//! logical replication slot, stamped and recorded in `meridian.change`.
//!
//! Nothing of capture runs inside the client's transaction (the SQL it
//! calls is in `migrations/functions/capture.sql`). This task
//! streams the slot (`pgoutput`, publication `meridian`) over the
//! replication protocol (pgwire-replication owns that connection), builds
//! transactions ([`super::assemble`]), gives each one HLC stamp in commit
//! order, and has [`super::writer`] record batches of them in one local
//! transaction together with the slot position reached
//! (`meridian.capture_progress`). Only then is the slot told it may release
//! that WAL, so a crash at any point neither loses a committed transaction
//! nor records one twice: after a restart the slot resends from its
//! confirmed position and what the progress row covers is skipped.
//!
//! [`Barrier`] lets an apply session wait until every transaction committed
//! before a point is recorded: it emits a non-transactional logical message,
//! which the slot delivers after every transaction that committed before it.

use std::sync::Arc;
use std::time::Duration;

use pgwire_replication::{Lsn, ReplicationClient, ReplicationConfig, ReplicationEvent};
use tokio::sync::watch;
use tokio_postgres::error::SqlState;
use tokio_util::sync::CancellationToken;

use super::assemble::{Assembler, Tx};
use super::writer::{self, Relations};
use super::CaptureError;
use crate::clock::Clock;
use crate::config::Config;
use crate::wire::tls::BackendTls;

/// Prefix of the sync messages (see [`Barrier`]).
const SYNC_PREFIX: &str = "meridian.sync";
/// A batch is recorded once it holds this many changes, or [`GATHER`]
/// after its first transaction; a larger transaction is recorded in parts
/// of this size, so memory stays bounded.
const BATCH_CHANGES: usize = 5_000;
/// How long capture gathers transactions into a batch before recording it
/// (unless the batch is full, or a sync point asks for it now).
const GATHER: Duration = Duration::from_millis(10);
/// How long an apply holding its locks waits for capture (see
/// [`Barrier::settle`]); capture normally passes in milliseconds.
pub const SETTLE_LIMIT: Duration = Duration::from_secs(1);

/// Lets an apply session wait until capture has recorded every transaction
/// that committed before a point. A sync point is a logical message
/// (prefix `meridian.sync`) committed in a transaction of its own, on a
/// connection of its own: the commit makes Postgres flush the WAL up to it
/// (a non-transactional message is not flushed by itself, and the slot
/// only sends flushed WAL), and the slot delivers it after every
/// transaction that committed before it. Capture, having recorded those,
/// publishes the message's LSN here and in `meridian.capture_progress`.
/// Whoever emits one, it only ever says what is true, so no secret is
/// needed.
pub struct Barrier {
    config: Config,
    tls: Option<crate::wire::tls::BackendTls>,
    passed: watch::Sender<u64>,
    /// The connection sync points are committed on.
    sync: tokio::sync::Mutex<Option<tokio_postgres::Client>>,
    /// Held by whoever applies peers' changes, from before its locks until
    /// its commit (see [`Barrier::settle`]).
    applying: tokio::sync::Mutex<()>,
}

impl Barrier {
    /// Places a sync point in the WAL (in a transaction of its own);
    /// returns its LSN as text.
    pub const EMIT: &'static str =
        "SELECT pg_logical_emit_message(true, 'meridian.sync', '')::text";

    pub fn new(config: &Config) -> Result<Barrier, crate::wire::tls::TlsError> {
        Ok(Barrier {
            config: config.clone(),
            tls: crate::wire::tls::BackendTls::from_config(&config.backend)?,
            passed: watch::channel(0).0,
            sync: Default::default(),
            applying: Default::default(),
        })
    }

    /// Waits until capture has recorded everything before `lsn` (as
    /// returned by [`Barrier::EMIT`]); false after `limit`.
    pub async fn wait(&self, lsn: &str, limit: Duration) -> bool {
        let Ok(lsn) = Lsn::parse(lsn) else {
            return false;
        };
        let mut rx = self.passed.subscribe();
        tokio::time::timeout(limit, rx.wait_for(|&p| p >= lsn.as_u64()))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Commits a sync point (on the barrier's own connection); returns its LSN.
    pub async fn emit(&self) -> Result<String, tokio_postgres::Error> {
        let mut sync = self.sync.lock().await;
        if sync.is_none() {
            *sync = Some(super::connect_raw(&self.config, self.tls.as_ref()).await?);
        }
        let result = sync
            .as_ref()
            .expect("connected")
            .query_one(Self::EMIT, &[])
            .await;
        if result.is_err() {
            *sync = None;
        }
        Ok(result?.get(0))
    }

    /// Makes the local state an apply session decides on exact, inside its
    /// transaction: locks what `changes` (the peer protocol's JSON) touch
    /// (`meridian.lock_keys`), then waits until capture has recorded every
    /// transaction committed before.
    ///
    /// The wait is bounded by [`SETTLE_LIMIT`]; `None` then says: roll back
    /// (releasing the locks), [`Barrier::catch_up`], and try again. Capture
    /// can be waiting for this apply's locks without Postgres seeing a
    /// cycle: a local `ALTER TABLE` queues behind the apply's lock, and
    /// capture's next statement on that table queues behind the ALTER.
    ///
    /// One apply at a time: the returned guard is held until the apply
    /// commits. Two applies at once could deadlock with capture, out of
    /// Postgres' sight: the first waits here holding its locks; the second,
    /// past its wait, holds row versions capture must update and waits for
    /// the first one's locks.
    pub async fn settle(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        changes: &serde_json::Value,
    ) -> Result<Option<tokio::sync::MutexGuard<'_, ()>>, tokio_postgres::Error> {
        let turn = self.applying.lock().await;
        tx.execute("SELECT meridian.lock_keys($1)", &[changes])
            .await?;
        let lsn = self.emit().await?;
        Ok(self.wait(&lsn, SETTLE_LIMIT).await.then_some(turn))
    }

    /// [`Barrier::settle`] for a caller that already holds the turn and
    /// has taken its locks itself: places a sync point and waits for
    /// capture to pass it; false after [`SETTLE_LIMIT`] (roll back, catch
    /// up, try again).
    pub async fn settle_locked(&self) -> Result<bool, tokio_postgres::Error> {
        let lsn = self.emit().await?;
        Ok(self.wait(&lsn, SETTLE_LIMIT).await)
    }

    /// Waits, holding no locks, until capture has recorded every
    /// transaction committed before now: as long as it takes (with capture
    /// down nothing can be decided), saying so every 10 s.
    pub async fn catch_up(&self) -> Result<(), tokio_postgres::Error> {
        let lsn = self.emit().await?;
        while !self.wait(&lsn, Duration::from_secs(10)).await {
            tracing::warn!(%lsn, "applying waits for capture to record this region's own recent transactions");
        }
        Ok(())
    }

    /// For other writers of applied state (retries of held changes): the
    /// same turn as [`Barrier::settle`]'s, without waiting for capture.
    pub async fn turn(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.applying.lock().await
    }

    fn pass(&self, lsn: Lsn) {
        self.passed.send_if_modified(|p| {
            let moved = lsn.as_u64() > *p;
            *p = (*p).max(lsn.as_u64());
            moved
        });
    }
}

/// The capture slot as Postgres sees it.
#[derive(Debug, Clone)]
pub struct SlotState {
    /// WAL the slot keeps (from its restart point to the present).
    pub retained_bytes: i64,
    /// Postgres' verdict on that WAL: `reserved`, `extended`, `unreserved`
    /// (beyond `max_wal_size`, kept only while within
    /// `max_slot_wal_keep_size`) or `lost` (removed: capture cannot go on).
    pub wal_status: String,
    /// A capture task is connected to it.
    pub active: bool,
}

/// Reads the capture slot's state; `None` when the slot does not exist.
pub async fn slot_state(
    client: &tokio_postgres::Client,
) -> Result<Option<SlotState>, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT coalesce((pg_current_wal_lsn() - s.restart_lsn)::int8, 0), coalesce(s.wal_status, 'lost'), s.active
               FROM pg_replication_slots s WHERE s.slot_name = meridian.slot_name()",
            &[],
        )
        .await?;
    Ok(row.map(|r| SlotState {
        retained_bytes: r.get(0),
        wal_status: r.get(1),
        active: r.get(2),
    }))
}

/// Runs capture until `stop`: reconnects after failures, never gives up.
pub async fn run(
    config: Config,
    clock: Arc<Clock>,
    barrier: Arc<Barrier>,
    stop: CancellationToken,
) {
    let mut delay = Duration::from_millis(100);
    // The same failure again (a database not migrated yet, a server down)
    // is logged once a minute, not at every retry.
    let mut told: Option<(String, std::time::Instant)> = None;
    loop {
        match session(&config, &clock, &barrier, &stop).await {
            Ok(()) => return,
            Err(e) => {
                let message = e.to_string();
                let repeat = told
                    .as_ref()
                    .is_some_and(|(m, at)| *m == message && at.elapsed() < Duration::from_secs(60));
                if repeat {
                    tracing::debug!(error = %message, "capture interrupted; retrying");
                } else {
                    tracing::warn!(error = %message, "capture interrupted; retrying");
                    told = Some((message, std::time::Instant::now()));
                }
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

/// A database without meridian's schema says so by name.
fn not_installed(config: &Config, e: tokio_postgres::Error) -> CaptureError {
    let missing = e.code().is_some_and(|c| {
        [
            SqlState::UNDEFINED_TABLE,
            SqlState::UNDEFINED_FUNCTION,
            SqlState::INVALID_SCHEMA_NAME,
        ]
        .contains(c)
    });
    if missing {
        CaptureError::Settings(format!(
            "meridian's schema is not installed in database {}: run `meridian migrate --config FILE` \
             (capture starts once it is)",
            config.backend.database
        ))
    } else {
        super::pg("reading capture progress")(e)
    }
}

fn slot_err(context: &'static str) -> impl FnOnce(pgwire_replication::PgWireError) -> CaptureError {
    move |e| CaptureError::Slot(format!("{context}: {e}"))
}

/// Where capture resumes: the progress row says which transaction was
/// recorded last (its commit LSN, or its end LSN once whole) and, for one
/// recorded in parts, how many of its changes.
struct Resume {
    lsn: Lsn,
    done: u64,
}

impl Resume {
    /// Changes of the transaction committing at `commit_lsn` to skip.
    fn skip(&self, commit_lsn: Lsn) -> u64 {
        if commit_lsn < self.lsn {
            u64::MAX
        } else if commit_lsn == self.lsn {
            self.done
        } else {
            0
        }
    }
}

async fn session(
    config: &Config,
    clock: &Clock,
    barrier: &Barrier,
    stop: &CancellationToken,
) -> Result<(), CaptureError> {
    let mut client = super::connect(config).await?;
    let row = client
        .query_one(
            "SELECT meridian.slot_name(), p.lsn::text, p.done FROM meridian.capture_progress p",
            &[],
        )
        .await
        .map_err(|e| not_installed(config, e))?;
    let (slot, lsn, done): (String, String, i64) = (row.get(0), row.get(1), row.get(2));
    let resume = Resume {
        lsn: Lsn::parse(&lsn).map_err(|e| CaptureError::Slot(e.to_string()))?,
        done: done as u64,
    };
    let b = &config.backend;
    let tunnel = match BackendTls::from_config(b)? {
        Some(tls) => Some(SlotTunnel::open(b, tls)?),
        None => None,
    };
    let host = match &tunnel {
        Some(t) => t.dir.path().display().to_string(),
        None => b.host.clone(),
    };
    let mut cfg = ReplicationConfig::new(
        &host,
        &b.user,
        b.resolve_password().unwrap_or_default(),
        &b.database,
        slot,
        "meridian",
    )
    .with_port(b.port)
    .with_application_name("meridian capture")
    // Values as text in one fixed style, whatever the server's defaults.
    .with_options(
        "-c DateStyle=ISO -c IntervalStyle=postgres -c extra_float_digits=3 -c TimeZone=UTC",
    );
    if !b.is_unix_socket() && tunnel.is_none() {
        cfg = cfg.with_tls(pgwire_replication::TlsConfig::disabled());
    }
    let mut slot = ReplicationClient::connect(cfg)
        .await
        .map_err(slot_err("starting the replication stream"))?;
    tracing::info!(resume = %resume.lsn, "capture reading the slot");
    let mut relations = Relations::new();
    let mut asm = Assembler::default();
    let mut batch: Vec<Tx> = Vec::new();
    let mut changes = 0usize;
    // When the batch being gathered got its first event (while it is
    // empty, every event restarts it).
    let mut since = tokio::time::Instant::now();
    loop {
        let event = if batch.is_empty() {
            let event = tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                ev = slot.recv() => ev,
            };
            since = tokio::time::Instant::now();
            event
        } else {
            // Gather for a moment: recording costs mostly per batch, and
            // under load a few milliseconds bring many transactions.
            match tokio::time::timeout_at(since + GATHER, slot.recv()).await {
                Ok(ev) => ev,
                Err(_) => {
                    record(&mut client, &mut relations, &mut batch, &slot).await?;
                    changes = 0;
                    continue;
                }
            }
        };
        let Some(event) = event.map_err(slot_err("reading the slot"))? else {
            return Ok(());
        };
        match event {
            ReplicationEvent::Begin {
                final_lsn,
                commit_time_micros,
                ..
            } => asm.begin(final_lsn, commit_time_micros, resume.skip(final_lsn)),
            ReplicationEvent::XLogData { data, .. } => {
                asm.message(&data)
                    .map_err(|e| CaptureError::Slot(e.to_string()))?;
                if asm.open_changes() >= BATCH_CHANGES {
                    batch.extend(asm.take_part(clock));
                    record(&mut client, &mut relations, &mut batch, &slot).await?;
                    changes = 0;
                }
            }
            ReplicationEvent::Commit { end_lsn, .. } => match asm.commit(end_lsn, clock) {
                Some(tx) => {
                    changes += tx.changes.len();
                    batch.push(tx);
                    if changes >= BATCH_CHANGES {
                        record(&mut client, &mut relations, &mut batch, &slot).await?;
                        changes = 0;
                    }
                }
                // Nothing to record (empty, or applied by meridian).
                None if batch.is_empty() => slot.update_applied_lsn(end_lsn),
                None => {}
            },
            ReplicationEvent::Message { prefix, lsn, .. } if prefix == SYNC_PREFIX => {
                record(&mut client, &mut relations, &mut batch, &slot).await?;
                changes = 0;
                writer::mark(&client, lsn, asm.open_commit_ms()).await?;
                barrier.pass(lsn);
            }
            ReplicationEvent::KeepAlive { wal_end, .. } if batch.is_empty() && !asm.is_open() => {
                slot.update_applied_lsn(wal_end)
            }
            _ => {}
        }
    }
}

/// Records the batch, then lets the slot release what it covers.
async fn record(
    client: &mut tokio_postgres::Client,
    relations: &mut Relations,
    batch: &mut Vec<Tx>,
    slot: &ReplicationClient,
) -> Result<(), CaptureError> {
    writer::record(client, relations, batch).await?;
    if let Some(end) = batch.iter().rev().find(|t| t.complete).map(|t| t.end_lsn) {
        slot.update_applied_lsn(end);
    }
    batch.clear();
    Ok(())
}

/// The capture slot's connection under `backend.tls`. pgwire-replication
/// does TLS only with its `tls-rustls` feature, which also turns on
/// tokio-rustls' default aws-lc-rs provider (a C library built with
/// cmake) beside the ring provider everything else here uses. So the slot
/// client connects to a Unix socket in a private directory (mode 0700,
/// removed with the tunnel), and meridian carries that one connection to
/// Postgres over its own TLS leg (`wire::backend::open`, the one client
/// sessions use), with the same checks.
struct SlotTunnel {
    dir: tempfile::TempDir,
    task: tokio::task::JoinHandle<()>,
}

impl SlotTunnel {
    fn open(b: &crate::config::BackendConfig, tls: BackendTls) -> Result<SlotTunnel, CaptureError> {
        let io = |e: std::io::Error| CaptureError::Slot(format!("the TLS tunnel to Postgres: {e}"));
        let dir = tempfile::Builder::new()
            .prefix("meridian-slot-")
            .tempdir()
            .map_err(io)?;
        let listener =
            tokio::net::UnixListener::bind(dir.path().join(format!(".s.PGSQL.{}", b.port)))
                .map_err(io)?;
        let backend = b.clone();
        let task = tokio::spawn(async move {
            let Ok((mut local, _)) = listener.accept().await else {
                return;
            };
            match crate::wire::backend::open(&backend, Some(&tls)).await {
                Ok(mut remote) => {
                    let _ = tokio::io::copy_bidirectional(&mut local, &mut remote).await;
                }
                Err(e) => tracing::warn!(error = %e, "capture cannot reach Postgres"),
            }
        });
        Ok(SlotTunnel { dir, task })
    }
}

impl Drop for SlotTunnel {
    fn drop(&mut self) {
        self.task.abort();
    }
}
