//! replication::housekeeping: once a second, what keeps a region small and
//! its metrics current. Prunes changes every peer has applied, retries held
//! changes that are due (in the appliers' turn), emits a sync point, forgets
//! tombstones below every region's floor, expires the conflict log, and
//! reads each peer's backlog, the held changes by SQLSTATE and the capture
//! slot's retained WAL (warning when it grows).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{resolve, ReplicationStats, PRUNE_EVERY};
use crate::capture;
use crate::config::Config;

/// Housekeeping every [`PRUNE_EVERY`] until `stop`: deletes captured changes
/// every configured peer has applied, and retries held changes (a change
/// for a table created here since applies now).
pub async fn maintain(
    config: Config,
    engines: resolve::EngineHandle,
    barrier: Arc<crate::capture::wal::Barrier>,
    stats: Arc<ReplicationStats>,
    stop: CancellationToken,
) {
    let grace = config.replication.tombstone_grace;
    let mut keeper = Housekeeper {
        peers: config
            .replication
            .peers
            .iter()
            .map(|p| i32::from(p.id))
            .collect(),
        // Tombstones are looked for by a scan of meridian.row_version, so
        // not every second: as often as the grace, between 1 s and a minute.
        forget_every: grace.clamp(Duration::from_secs(1), Duration::from_secs(60)),
        last_forget: tokio::time::Instant::now(),
        slot_warning: SlotWarning::default(),
        config,
        engines,
        barrier,
        stats,
    };
    let mut client = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(PRUNE_EVERY) => {}
            _ = stop.cancelled() => return,
        }
        if client.is_none() {
            client = capture::connect_apply(&keeper.config).await.ok();
        }
        let Some(c) = client.as_mut() else { continue };
        let result = match keeper.round(c).await {
            Ok(()) => keeper.read_gauges(c).await.map_err(Into::into),
            Err(e) => Err(e),
        };
        if let Err(e) = result {
            tracing::debug!(error = %e, "housekeeping failed; reconnecting");
            client = None;
        }
    }
}

/// What housekeeping keeps between rounds.
struct Housekeeper {
    config: Config,
    engines: resolve::EngineHandle,
    barrier: Arc<crate::capture::wal::Barrier>,
    stats: Arc<ReplicationStats>,
    peers: Vec<i32>,
    forget_every: Duration,
    last_forget: tokio::time::Instant,
    slot_warning: SlotWarning,
}

impl Housekeeper {
    /// One round of the work: prune, retry held changes, a sync point,
    /// schema-change rows, the conflict log, tombstones.
    async fn round(&mut self, c: &mut tokio_postgres::Client) -> Result<(), super::ApplyError> {
        let stats = &self.stats;
        let pruned: i64 = c
            .query_one("SELECT meridian.prune($1)", &[&self.peers])
            .await?
            .get(0);
        stats
            .changes_pruned
            .fetch_add(pruned as u64, Ordering::Relaxed);
        // Retries write applied state: in the appliers' turn (see
        // `Barrier::settle`).
        let turn = self.barrier.turn().await;
        let retried = super::held::retry(c, &self.engines.current()).await?;
        drop(turn);
        if retried > 0 {
            stats.changes_unheld.fetch_add(retried, Ordering::Relaxed);
            tracing::info!(retried, "held changes applied");
        }
        // A sync point each round: once capture passes it, the region's
        // floor may move up to it even when nothing else is written (see
        // `meridian.local_floor`).
        self.barrier.emit().await?;
        // Schema changes reach capture through the WAL; the rows can go.
        c.execute("DELETE FROM meridian.ddl_out", &[]).await?;
        let retention = self.config.replication.conflict_retention;
        let expired = super::conflict_log::prune_conflicts(c, retention).await?;
        if expired > 0 {
            tracing::debug!(expired, "conflict log entries past their retention deleted");
        }
        if self.last_forget.elapsed() >= self.forget_every {
            let grace_ms = self.config.replication.tombstone_grace.as_millis() as i64;
            let forgotten: i64 = c
                .query_one(
                    "SELECT meridian.forget_tombstones($1, $2)",
                    &[&self.peers, &grace_ms],
                )
                .await?
                .get(0);
            stats
                .tombstones_forgotten
                .fetch_add(forgotten as u64, Ordering::Relaxed);
            self.last_forget = tokio::time::Instant::now();
        }
        Ok(())
    }

    /// For /metrics and `meridian status`: each peer's backlog (this
    /// region's changes after the last it acknowledged; counted up to a
    /// million: an index range scan each second), the changes held here by
    /// SQLSTATE, and the WAL the capture slot keeps.
    async fn read_gauges(
        &mut self,
        c: &tokio_postgres::Client,
    ) -> Result<(), tokio_postgres::Error> {
        let (config, stats) = (&self.config, &self.stats);
        let backlog = c
            .query(BACKLOG, &[&self.peers, &i32::from(config.region.id)])
            .await?;
        for r in &backlog {
            let id = r.get::<_, i32>(0) as u16;
            if let Some(p) = config.replication.peers.iter().find(|p| p.id == id) {
                let n: i64 = r.get(1);
                stats.with_peer(&p.name, |s| s.backlog = Some(n));
            }
        }
        let by_sqlstate: std::collections::BTreeMap<String, u64> = c
            .query(
                "SELECT sqlstate, count(*) FROM meridian.held GROUP BY 1",
                &[],
            )
            .await?
            .iter()
            .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1) as u64))
            .collect();
        *stats.held_by_sqlstate.lock().expect("not poisoned") = by_sqlstate;
        if let Some(slot) = crate::capture::wal::slot_state(c).await? {
            stats
                .capture_retained_bytes
                .store(slot.retained_bytes.max(0) as u64, Ordering::Relaxed);
            self.slot_warning.note(&slot);
        }
        Ok(())
    }
}

/// Per peer id ($1): how many of this region's ($2) changes come after the
/// last it acknowledged.
const BACKLOG: &str = "SELECT p.id, (SELECT count(*) FROM (
                           SELECT 1 FROM meridian.change c
                            WHERE c.origin = $2
                              AND (c.xid, c.seq) > (coalesce(s.xid, 0)::text::xid8, coalesce(s.seq, 0))
                            LIMIT 1000000) x)
                         FROM unnest($1::int[]) AS p(id)
                         LEFT JOIN meridian.shipped s ON s.peer = p.id";

/// Says, at most once a minute, when the capture slot keeps a lot of WAL
/// (capture is behind, or was down) or has lost WAL it still needed.
#[derive(Default)]
struct SlotWarning {
    last: Option<std::time::Instant>,
}

impl SlotWarning {
    /// Above this much retained WAL the operator is told.
    const RETAINED: i64 = 1 << 30;

    fn note(&mut self, slot: &crate::capture::wal::SlotState) {
        let due = self
            .last
            .map_or(true, |t| t.elapsed() >= Duration::from_secs(60));
        if !due {
            return;
        }
        if slot.wal_status == "lost" {
            tracing::error!(
                "the capture slot lost WAL it still needed (max_slot_wal_keep_size): changes committed \
                 while capture was behind cannot be captured; this region must be rebuilt from a peer"
            );
        } else if slot.retained_bytes > Self::RETAINED {
            tracing::warn!(
                retained_mb = slot.retained_bytes >> 20,
                wal_status = %slot.wal_status,
                active = slot.active,
                "the capture slot keeps much WAL: capture is behind (see meridian_capture_retained_wal_bytes)"
            );
        } else {
            return;
        }
        self.last = Some(std::time::Instant::now());
    }
}
