//! replication::stats: the counters and per-peer state of a region's
//! replication, shared by its shippers, receivers and housekeeping, read by
//! `/status` and `/metrics`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::wall_ms;

/// Counters for one region's replication, for `/status`.
#[derive(Debug, Default)]
pub struct ReplicationStats {
    pub batches_sent: AtomicU64,
    pub changes_sent: AtomicU64,
    pub batches_applied: AtomicU64,
    pub changes_applied: AtomicU64,
    pub changes_older: AtomicU64,
    pub changes_held: AtomicU64,
    pub batches_held_for_drift: AtomicU64,
    pub batches_held_for_causality: AtomicU64,
    pub batches_retried: AtomicU64,
    /// Other origins' changes this region shipped on to a peer whose own
    /// link to their origin was down (`replication::forward`).
    pub changes_relayed: AtomicU64,
    pub changes_pruned: AtomicU64,
    pub changes_unheld: AtomicU64,
    pub peers_refused: AtomicU64,
    pub tombstones_forgotten: AtomicU64,
    pub conflicts: AtomicU64,
    /// Rows found without their foreign-key parent after an apply.
    pub orphans: AtomicU64,
    /// Conflicts decided here, by (table, rule).
    pub conflicts_by_rule: std::sync::Mutex<std::collections::BTreeMap<(String, String), u64>>,
    /// Per peer region, by name: links, lag, backlog.
    pub peers: std::sync::Mutex<std::collections::BTreeMap<String, PeerState>>,
    /// Changes waiting in `meridian.held`, by the SQLSTATE of the error that
    /// holds them (read by housekeeping, once a second).
    pub held_by_sqlstate: std::sync::Mutex<std::collections::BTreeMap<String, u64>>,
    /// WAL the capture slot keeps, in bytes (housekeeping, once a second).
    pub capture_retained_bytes: AtomicU64,
}

/// What this region knows of one peer.
#[derive(Debug, Clone, Default)]
pub struct PeerState {
    /// Open connections shipping this region's changes to the peer (0 or 1).
    pub shipping: u32,
    /// Open connections receiving the peer's changes (0 or 1).
    pub receiving: u32,
    /// When the last message came over such a connection.
    pub heard_at: Option<std::time::Instant>,
    /// Open relay links bringing the peer's changes through another region.
    pub relayed_in: u32,
    /// Origins whose changes this region relays to the peer now (the peer
    /// said its link to them is down).
    pub relaying_to: u32,
    /// Changes captured here the peer has not acknowledged (housekeeping).
    pub backlog: Option<i64>,
    /// The origin's clock (ms) when it was last known to have shipped
    /// everything it had committed, and that batch or heartbeat was applied
    /// here; when that was, locally; and how late it was then.
    pub caught_up_origin_ms: Option<i64>,
    pub caught_up_at: Option<std::time::Instant>,
    pub last_delay_ms: Option<i64>,
    pub changes_applied: u64,
}

/// How long after the last caught-up message the lag is taken as the time
/// since that message (the peer sends one at least once a second when
/// idle, and with every batch that reaches its end when busy).
const LAG_FRESH: Duration = Duration::from_secs(2);

impl PeerState {
    /// Replication lag from this peer, in seconds: how far behind the
    /// peer's committed changes this region is. While messages arrive it
    /// is the delay of the last caught-up one (link latency plus apply);
    /// when none has come for [`LAG_FRESH`] (a cut link, a backlog) it is
    /// the time since the peer was last known caught up, so it grows.
    /// None before the first one.
    pub fn lag_seconds(&self, now_ms: i64) -> Option<f64> {
        let at = self.caught_up_at?;
        let ms = if at.elapsed() <= LAG_FRESH {
            self.last_delay_ms?
        } else {
            now_ms - self.caught_up_origin_ms?
        };
        Some(ms.max(0) as f64 / 1000.0)
    }
}

/// A peer's messages count as live this long after the last one (an idle
/// shipper sends a floor about once a second).
pub const SILENT: Duration = Duration::from_secs(3);

impl PeerState {
    /// Whether the peer's own link here is up and has spoken lately.
    pub fn direct_live(&self) -> bool {
        self.receiving > 0 && self.heard_at.is_some_and(|t| t.elapsed() < SILENT)
    }
}

/// What a [`LinkGuard`] counts.
#[derive(Clone, Copy)]
pub(super) enum Link {
    /// This region's changes to the peer.
    Shipping,
    /// The peer's changes from it.
    Receiving,
    /// The peer's changes through another region.
    RelayedIn,
    /// Another origin's changes relayed to the peer.
    RelayingTo,
}

impl Link {
    fn count(self, p: &mut PeerState) -> &mut u32 {
        match self {
            Link::Shipping => &mut p.shipping,
            Link::Receiving => &mut p.receiving,
            Link::RelayedIn => &mut p.relayed_in,
            Link::RelayingTo => &mut p.relaying_to,
        }
    }
}

/// Counts an open link to or from a peer while alive.
pub(super) struct LinkGuard {
    stats: Arc<ReplicationStats>,
    peer: String,
    link: Link,
}

impl LinkGuard {
    pub(super) fn new(stats: &Arc<ReplicationStats>, peer: &str, link: Link) -> LinkGuard {
        stats.with_peer(peer, |p| {
            *link.count(p) += 1;
            if matches!(link, Link::Receiving) {
                p.heard_at = Some(std::time::Instant::now());
            }
        });
        LinkGuard {
            stats: stats.clone(),
            peer: peer.to_string(),
            link,
        }
    }
}

impl Drop for LinkGuard {
    fn drop(&mut self) {
        let link = self.link;
        self.stats.with_peer(&self.peer, |p| {
            let n = link.count(p);
            *n = n.saturating_sub(1);
        });
    }
}

impl ReplicationStats {
    /// Changes waiting in `meridian.held` now.
    pub fn held_now(&self) -> u64 {
        self.held_by_sqlstate
            .lock()
            .expect("not poisoned")
            .values()
            .sum()
    }

    /// Runs `f` on the state of peer `name` (created if new).
    pub fn with_peer<T>(&self, name: &str, f: impl FnOnce(&mut PeerState) -> T) -> T {
        let mut peers = self.peers.lock().expect("not poisoned");
        f(peers.entry(name.to_string()).or_default())
    }

    /// Per peer: links, lag (seconds), backlog, for `/status`.
    pub fn peers_snapshot(&self) -> serde_json::Value {
        let now = wall_ms();
        self.peers
            .lock()
            .expect("not poisoned")
            .iter()
            .map(|(name, p)| {
                serde_json::json!({
                    "peer": name,
                    "shipping": p.shipping > 0,
                    "receiving": p.receiving > 0,
                    "relayed_in": p.relayed_in > 0,
                    "relaying_to": p.relaying_to,
                    "lag_seconds": p.lag_seconds(now),
                    "backlog": p.backlog,
                    "changes_applied": p.changes_applied,
                })
            })
            .collect()
    }

    pub fn snapshot(&self) -> serde_json::Value {
        let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
        serde_json::json!({
            "batches_sent": n(&self.batches_sent),
            "changes_sent": n(&self.changes_sent),
            "batches_applied": n(&self.batches_applied),
            "changes_applied": n(&self.changes_applied),
            "changes_older": n(&self.changes_older),
            "changes_held": n(&self.changes_held),
            "batches_held_for_drift": n(&self.batches_held_for_drift),
            "batches_held_for_causality": n(&self.batches_held_for_causality),
            "batches_retried": n(&self.batches_retried),
            "changes_relayed": n(&self.changes_relayed),
            "changes_pruned": n(&self.changes_pruned),
            "changes_unheld": n(&self.changes_unheld),
            "peers_refused": n(&self.peers_refused),
            "tombstones_forgotten": n(&self.tombstones_forgotten),
            "conflicts": n(&self.conflicts),
            "held_now": self.held_now(),
            "peers": self.peers_snapshot(),
            "orphans": n(&self.orphans),
            "conflicts_by_rule": self
                .conflicts_by_rule
                .lock()
                .expect("not poisoned")
                .iter()
                .map(|((table, rule), n)| serde_json::json!({"table": table, "rule": rule, "count": n}))
                .collect::<Vec<_>>(),
        })
    }
}
