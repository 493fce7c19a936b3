//! replication::account: what an apply leaves behind besides its rows. The
//! region's counters and per-peer state (lag, changes applied) for
//! `/status` and `/metrics`, the "catching up" progress lines, and the
//! acknowledgements the shipper waits for (one per batch received, in
//! order).

use std::sync::atomic::Ordering;
use std::time::Instant;

use super::protocol::{Message, Position};
use super::queue::Gathered;
use super::{wall_ms, Applied, Conn, ReplicationError, ReplicationStats};
use crate::config::Config;

/// Seconds between "catching up" progress lines.
const CATCH_UP_REPORT: u64 = 5;

/// The accounts of one receiving connection.
pub(super) struct Account<'a> {
    stats: &'a ReplicationStats,
    peer: String,
    origin: u16,
    /// The origin's own link (not a relay).
    direct: bool,
    /// While catching up: since when, changes applied, seconds when last reported.
    catching_up: Option<(Instant, u64, u64)>,
    /// Counts this connection in the peer's state while it lives.
    _link: super::stats::LinkGuard,
}

impl<'a> Account<'a> {
    pub(super) fn new(
        stats: &'a std::sync::Arc<ReplicationStats>,
        config: &Config,
        origin: u16,
        link: super::stats::Link,
    ) -> Account<'a> {
        let peer = super::peer_name(config, origin);
        Account {
            _link: super::stats::LinkGuard::new(stats, &peer, link),
            stats,
            peer,
            origin,
            direct: matches!(link, super::stats::Link::Receiving),
            catching_up: None,
        }
    }

    /// Notes that the origin's own link has just delivered something (see
    /// `PeerState::direct_live`).
    pub(super) fn heard(&self) {
        if self.direct {
            self.stats
                .with_peer(&self.peer, |p| p.heard_at = Some(Instant::now()));
        }
    }

    /// Records that `applied` more changes are applied and, when
    /// `origin_ms` is set, that everything the origin had committed by then
    /// (its wall clock) is applied here: the lag.
    pub(super) fn caught_up(&self, origin_ms: Option<i64>, applied: u64) {
        self.stats.with_peer(&self.peer, |p| {
            p.changes_applied += applied;
            if let Some(ms) = origin_ms {
                p.caught_up_origin_ms = Some(ms);
                p.caught_up_at = Some(Instant::now());
                p.last_delay_ms = Some(wall_ms() - ms);
            }
        })
    }

    /// Counts one apply of `gathered` and reports catch-up progress.
    pub(super) fn applied(&mut self, outcome: &Applied, gathered: &Gathered) {
        let stats = self.stats;
        let engine = &outcome.engine;
        let add = |c: &std::sync::atomic::AtomicU64, n: u64| c.fetch_add(n, Ordering::Relaxed);
        add(&stats.batches_applied, 1);
        add(&stats.changes_applied, outcome.written());
        add(&stats.changes_older, outcome.older);
        add(&stats.changes_held, outcome.held());
        add(&stats.conflicts, engine.conflicts);
        add(&stats.orphans, outcome.orphans);
        if !engine.by_rule.is_empty() {
            let mut by = stats.conflicts_by_rule.lock().expect("not poisoned");
            for ((table, rule), n) in &engine.by_rule {
                *by.entry((table.clone(), rule.to_string())).or_default() += n;
            }
        }
        self.caught_up(gathered.origin_ms, outcome.written());
        self.progress(outcome.written() + outcome.older, gathered);
        if outcome.held() > 0 {
            tracing::warn!(
                origin = self.origin,
                held = outcome.held(),
                "changes held (see meridian.held)"
            );
        }
    }

    /// Catching up (batches that do not reach the origin's end): says how it
    /// goes every few seconds, and when it is done.
    fn progress(&mut self, applied_now: u64, gathered: &Gathered) {
        let origin = self.origin;
        match (&mut self.catching_up, gathered.origin_ms) {
            (None, None) => self.catching_up = Some((Instant::now(), applied_now, 0)),
            (Some((since, total, logged)), None) => {
                *total += applied_now;
                let secs = since.elapsed().as_secs();
                if secs >= *logged + CATCH_UP_REPORT {
                    *logged = secs;
                    let newest = gathered.changes.last().map_or(0, |c| c.tx_hlc);
                    tracing::info!(
                        origin,
                        changes = *total,
                        per_second = *total / secs.max(1),
                        behind_s = crate::clock::physical_ms(newest as u64)
                            .map_or(0.0, |t| (wall_ms() - t) as f64 / 1000.0),
                        "catching up"
                    );
                }
            }
            (Some((since, total, _)), Some(_)) => {
                let total = *total + applied_now;
                if since.elapsed().as_secs() >= CATCH_UP_REPORT {
                    tracing::info!(
                        origin,
                        changes = total,
                        seconds = since.elapsed().as_secs(),
                        "caught up"
                    );
                }
                self.catching_up = None;
            }
            (None, Some(_)) => {}
        }
    }
}

/// One acknowledgement per batch received (`ends`, in order); the counts go
/// with the last (the shipper matches positions only).
pub(super) async fn acknowledge(
    acks: &mut futures_util::stream::SplitSink<Conn, bytes::Bytes>,
    ends: &[Position],
    outcome: &Applied,
) -> Result<(), ReplicationError> {
    let Some((&last, earlier)) = ends.split_last() else {
        return Ok(());
    };
    let ack = |position, last: bool| Message::Ack {
        position,
        applied: if last { outcome.written() } else { 0 },
        older: if last { outcome.older } else { 0 },
        held: if last { outcome.held() } else { 0 },
        duplicate: last && outcome.duplicate,
    };
    for &position in earlier {
        super::send(acks, &ack(position, false)).await?;
    }
    super::send(acks, &ack(last, true)).await
}
