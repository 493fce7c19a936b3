//! replication: shipping this region's captured changes to every peer, and
//! applying the changes peers ship here.
//!
//! - **Shipper** (one task per peer, [`ship_to`]): connects to the peer's
//!   `replication.listen` (or a link in front of it), proves it knows the
//!   cluster secret, learns how far the peer has applied this region's
//!   changes, then sends batches read with `meridian.read_changes` (the safe
//!   order) from there, up to [`WINDOW`] batches ahead of the peer's
//!   acknowledgements (each sent after the peer committed the batch). Any failure: reconnect with back-off and
//!   resume from what the peer says it has. A slow or absent peer only delays
//!   its own shipper; client writes never wait for it.
//! - **Receiver** ([`receive`]): for each connection, a challenge, the
//!   shipper's proof, then each batch is checked against the clock (a batch
//!   stamped further ahead than `replication.max_drift` is held, neither
//!   applied nor dropped, and retried) and applied by `meridian.apply_batch`
//!   in one transaction together with the origin's position, then acknowledged.
//!
//! - **Causal order**: each batch carries how far its origin had applied every
//!   other region when the batch was read; the receiver holds the batch until
//!   it has applied at least that much of each, so a change never arrives
//!   before one its transaction could have seen. Conservative (the vector is
//!   read after the batch, so it may ask for more than needed) and bounded
//!   (see [`CAUSAL_WAIT`]).
//!
//! - **Housekeeping** ([`maintain`]): the shipper records each acknowledgement
//!   in `meridian.shipped`; changes every configured peer has applied are
//!   deleted; held changes are retried; tombstones below every region's
//!   floor are forgotten (see `migrations/functions/floors.sql`).
//!
//! - **TLS** ([`tls`]): with `replication.tls`, every peer link is mutual TLS
//!   under the cluster's CA; the secret handshake then runs inside it.

pub mod apply;
mod copy_text;
pub mod protocol;
pub mod resolve;
mod set_wise;
pub mod tls;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_postgres::Client;
use tokio_util::codec::{Framed, LengthDelimitedCodec};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::capture::{self, reader::read_changes, CaptureError};
use crate::clock::{Clock, ClockError};
use crate::config::{Config, PeerConfig};
pub use apply::{Applied, ApplyError};
use protocol::{Message, OriginPosition, ProtocolError, WireChange, WirePosition};

/// Changes per batch, at most.
pub const BATCH: i64 = 5000;
/// Changes one apply transaction takes at most (gathered from several
/// batches): per-apply costs (the sync point, statements per table, the
/// commit) spread over more rows in a catch-up.
pub const APPLY_MAX: usize = 20_000;
/// Batches are made smaller while their encoding exceeds this.
pub const TARGET_FRAME: usize = 8 << 20;
/// How often an idle shipper looks for new changes.
pub const POLL: Duration = Duration::from_millis(5);
/// Batches sent ahead of their acknowledgement.
pub const WINDOW: usize = 32;
/// While batches are in flight, the next one is read at most this often.
pub const GATHER: Duration = Duration::from_millis(10);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Reconnect attempts back off up to this: a healed link is used again
/// within it (at 2 s the catch-up benchmark spent up to 2 s of a heal
/// waiting to reconnect), and a refused connection costs next to nothing.
const BACKOFF_MAX: Duration = Duration::from_millis(500);
/// How often shipped changes are pruned.
pub const PRUNE_EVERY: Duration = Duration::from_secs(1);
/// Times a batch is retried after losing a deadlock to local writes.
const APPLY_RETRIES: u64 = 20;
/// Longest a batch waits for changes its origin had already applied.
pub const CAUSAL_WAIT: Duration = Duration::from_secs(2);
/// How often a shipper takes its region's floor (see [`Message::Floor`]).
pub const FLOOR_EVERY: Duration = Duration::from_secs(1);
/// A silent peer is given up on after this long.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

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
    pub batches_applied_before_dependencies: AtomicU64,
    pub batches_retried: AtomicU64,
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

/// Seconds between "catching up" progress lines.
const CATCH_UP_REPORT: u64 = 5;

/// Wall clock in ms since the epoch (lag is measured against the origin's).
pub fn wall_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Counts an open link to or from a peer while alive.
struct LinkGuard {
    stats: Arc<ReplicationStats>,
    peer: String,
    outgoing: bool,
}

impl LinkGuard {
    fn new(stats: &Arc<ReplicationStats>, peer: &str, outgoing: bool) -> LinkGuard {
        stats.with_peer(peer, |p| {
            if outgoing {
                p.shipping += 1
            } else {
                p.receiving += 1
            }
        });
        LinkGuard {
            stats: stats.clone(),
            peer: peer.to_string(),
            outgoing,
        }
    }
}

impl Drop for LinkGuard {
    fn drop(&mut self) {
        let outgoing = self.outgoing;
        self.stats.with_peer(&self.peer, |p| {
            if outgoing {
                p.shipping = p.shipping.saturating_sub(1)
            } else {
                p.receiving = p.receiving.saturating_sub(1)
            }
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
            "batches_applied_before_dependencies": n(&self.batches_applied_before_dependencies),
            "batches_retried": n(&self.batches_retried),
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

#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error(transparent)]
    Capture(#[from] CaptureError),
    #[error("cannot reach {address}: {source}")]
    Connect {
        address: String,
        source: std::io::Error,
    },
    #[error("peer went silent for {0:?}")]
    Timeout(Duration),
    #[error("TLS handshake failed: {0}")]
    Tls(std::io::Error),
    #[error("applying a batch failed: {0}")]
    Apply(String),
}

type Conn = Framed<tls::BoxedStream, LengthDelimitedCodec>;

async fn send(
    conn: &mut (impl futures_util::Sink<bytes::Bytes, Error = std::io::Error> + Unpin),
    m: &Message,
) -> Result<(), ReplicationError> {
    tokio::time::timeout(IO_TIMEOUT, conn.send(m.encode()))
        .await
        .map_err(|_| ReplicationError::Timeout(IO_TIMEOUT))?
        .map_err(ProtocolError::Io)?;
    Ok(())
}

async fn recv(conn: &mut Conn) -> Result<Message, ReplicationError> {
    let frame = tokio::time::timeout(IO_TIMEOUT, conn.next())
        .await
        .map_err(|_| ReplicationError::Timeout(IO_TIMEOUT))?
        .ok_or(ProtocolError::Closed)?
        .map_err(ProtocolError::Io)?;
    Ok(Message::decode(&frame)?)
}

fn unexpected(expected: &'static str, got: &Message) -> ReplicationError {
    ProtocolError::Unexpected {
        expected,
        got: got.kind().into(),
    }
    .into()
}

/// Ships this region's changes to `peer` until `stop`, reconnecting as needed.
pub async fn ship_to(
    config: Config,
    peer: PeerConfig,
    tls: Option<tls::PeerTls>,
    stats: Arc<ReplicationStats>,
    stop: CancellationToken,
) {
    let span = tracing::info_span!("ship", peer = %peer.name, address = %peer.address);
    async move {
        let mut backoff = BACKOFF_MIN;
        let mut last_error = String::new();
        loop {
            let result = tokio::select! {
                r = ship_once(&config, &peer, tls.as_ref(), &stats, &stop) => r,
                _ = stop.cancelled() => return,
            };
            match result {
                Ok(()) => return,
                Err(e) => {
                    let text = e.to_string();
                    if text != last_error {
                        tracing::warn!(error = %text, "shipping interrupted; retrying");
                        last_error = text;
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = stop.cancelled() => return,
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }
    .instrument(span)
    .await
}

async fn ship_once(
    config: &Config,
    peer: &PeerConfig,
    tls: Option<&tls::PeerTls>,
    stats: &Arc<ReplicationStats>,
    stop: &CancellationToken,
) -> Result<(), ReplicationError> {
    let secret = config.replication.resolve_secret().unwrap_or_default();
    let client = capture::connect(config).await?;
    let stream = tokio::time::timeout(IO_TIMEOUT, TcpStream::connect(&peer.address))
        .await
        .map_err(|_| ReplicationError::Timeout(IO_TIMEOUT))?
        .map_err(|source| ReplicationError::Connect {
            address: peer.address.clone(),
            source,
        })?;
    let _ = stream.set_nodelay(true);
    let stream = tokio::time::timeout(IO_TIMEOUT, tls::connect(tls, stream, &peer.tls_name()))
        .await
        .map_err(|_| ReplicationError::Timeout(IO_TIMEOUT))?
        .map_err(ReplicationError::Tls)?;
    let mut conn = Framed::new(stream, protocol::codec());
    let nonce = match recv(&mut conn).await? {
        Message::Challenge { version, nonce, .. } if version == protocol::VERSION => nonce,
        Message::Challenge { version, .. } => {
            return Err(ProtocolError::Refused(format!(
                "peer speaks protocol {version}, this build {}",
                protocol::VERSION
            ))
            .into())
        }
        other => return Err(unexpected("Challenge", &other)),
    };
    let origin = config.region.id;
    send(
        &mut conn,
        &Message::Hello {
            version: protocol::VERSION,
            origin,
            proof: protocol::proof(&secret, &nonce, origin),
        },
    )
    .await?;
    let position = match recv(&mut conn).await? {
        Message::Welcome { position } => position,
        Message::Refused { reason } => return Err(ProtocolError::Refused(reason).into()),
        other => return Err(unexpected("Welcome", &other)),
    };
    tracing::info!(?position, "connected; shipping from the peer's position");
    let _link = LinkGuard::new(stats, &peer.name, true);
    // Up to WINDOW batches in flight: sending does not wait for the previous
    // batch's acknowledgement (a round trip over the WAN), acknowledgements
    // are matched in order as they come.
    let mut in_flight: std::collections::VecDeque<(WirePosition, u64, tokio::time::Instant)> =
        Default::default();
    let mut sent = position;
    let mut last_send = tokio::time::Instant::now();
    let mut limit = BATCH;
    let grace_ms = config.replication.tombstone_grace.as_millis() as i64;
    let mut last_floor = tokio::time::Instant::now() - FLOOR_EVERY;
    let (mut sink, mut stream) = conn.split();
    loop {
        let room = in_flight.len() < WINDOW;
        let busy = !in_flight.is_empty();
        let next = async {
            if !room {
                return std::future::pending().await;
            }
            if busy {
                // While batches are in flight, gather for a moment: fewer,
                // larger batches mean fewer commits on the receiving side.
                tokio::time::sleep_until(last_send + GATHER).await;
            }
            // The floor is taken before the read: a transaction still
            // running then counts in it, one starting later stamps above it.
            let floor = if last_floor.elapsed() >= FLOOR_EVERY {
                Some(local_floor(&client, grace_ms).await?)
            } else {
                None
            };
            let read_at = wall_ms();
            let changes = read_changes(&client, sent.into(), limit).await?;
            // Only a read that reached the end of what is committed leaves
            // nothing older behind it.
            let complete = (changes.len() as i64) < limit;
            let floor = floor.filter(|_| complete);
            let caught_up = complete.then_some(read_at);
            if changes.is_empty() && floor.is_none() {
                tokio::time::sleep(POLL).await;
            }
            // Read after the changes: at least what their transactions had seen.
            let after = applied_vector(&client).await?;
            Ok::<_, ReplicationError>((changes, after, floor, caught_up))
        };
        tokio::select! {
            read = next => {
                let (changes, after, floor, caught_up) = read?;
                let Some(last) = changes.last() else {
                    if let Some(hlc) = floor {
                        tokio::time::timeout(IO_TIMEOUT, sink.send(Message::Floor { hlc, caught_up }.encode()))
                            .await
                            .map_err(|_| ReplicationError::Timeout(IO_TIMEOUT))?
                            .map_err(ProtocolError::Io)?;
                        last_floor = tokio::time::Instant::now();
                    }
                    continue;
                };
                let last = WirePosition::from(last.position);
                let wire: Vec<WireChange> = changes.into_iter().map(WireChange::from).collect();
                let n = wire.len() as u64;
                let frame = Message::Batch { changes: wire, after, floor, caught_up }.encode();
                if frame.len() > TARGET_FRAME && n > 1 {
                    // Wide rows: fewer changes per batch, so frames stay bounded.
                    limit = (n as i64 / 2).max(1);
                    continue;
                }
                if frame.len() > protocol::MAX_FRAME {
                    return Err(ProtocolError::Refused(format!(
                        "a single change at {last:?} encodes to {} bytes, above the {} byte frame limit",
                        frame.len(),
                        protocol::MAX_FRAME
                    ))
                    .into());
                }
                limit = (limit * 2).min(BATCH);
                tokio::time::timeout(IO_TIMEOUT, sink.send(frame))
                    .await
                    .map_err(|_| ReplicationError::Timeout(IO_TIMEOUT))?
                    .map_err(ProtocolError::Io)?;
                last_send = tokio::time::Instant::now();
                if floor.is_some() {
                    last_floor = last_send;
                }
                in_flight.push_back((last, n, last_send));
                sent = last;
            }
            frame = stream.next() => {
                let frame = frame.ok_or(ProtocolError::Closed)?.map_err(ProtocolError::Io)?;
                let (expected, n, _) = in_flight.pop_front().ok_or_else(|| {
                    ProtocolError::Refused("acknowledgement with nothing in flight".into())
                })?;
                match Message::decode(&frame)? {
                    Message::Ack { position: acked, .. } if acked == expected => {}
                    Message::Ack { position: acked, .. } => {
                        return Err(ProtocolError::Refused(format!(
                            "peer acknowledged {acked:?}, expected {expected:?}"
                        ))
                        .into())
                    }
                    other => return Err(unexpected("Ack", &other)),
                }
                stats.batches_sent.fetch_add(1, Ordering::Relaxed);
                stats.changes_sent.fetch_add(n, Ordering::Relaxed);
                record_shipped(&client, peer.id, expected).await?;
            }
            _ = stop.cancelled() => return Ok(()),
            // The oldest unacknowledged batch has waited too long.
            _ = tokio::time::sleep_until(
                in_flight.front().map_or_else(tokio::time::Instant::now, |f| f.2) + IO_TIMEOUT
            ), if !in_flight.is_empty() => {
                return Err(ReplicationError::Timeout(IO_TIMEOUT));
            }
        }
    }
}

/// Records (durably, on this side) how far `peer` has applied this region's
/// changes, for pruning.
async fn record_shipped(
    client: &Client,
    peer: u16,
    at: WirePosition,
) -> Result<(), ReplicationError> {
    client
        .execute(
            "INSERT INTO meridian.shipped AS s (peer, xid, seq, acked_at) VALUES ($1, $2, $3, now())
             ON CONFLICT (peer) DO UPDATE SET xid = excluded.xid, seq = excluded.seq, acked_at = now()
             WHERE (s.xid, s.seq) < (excluded.xid, excluded.seq)",
            &[&i32::from(peer), &(at.xid as i64), &at.seq],
        )
        .await
        .map_err(|source| CaptureError::Postgres {
            context: "recording a peer's acknowledgement".into(),
            source,
        })?;
    Ok(())
}

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
    let peers: Vec<i32> = config
        .replication
        .peers
        .iter()
        .map(|p| i32::from(p.id))
        .collect();
    let retention = config.replication.conflict_retention;
    let grace = config.replication.tombstone_grace;
    let grace_ms = grace.as_millis() as i64;
    // Tombstones are looked for by a scan of meridian.row_version, so not
    // every second: as often as the grace, between 1 s and a minute.
    let forget_every = grace.clamp(Duration::from_secs(1), Duration::from_secs(60));
    let mut last_forget = tokio::time::Instant::now();
    let mut slot_warning = SlotWarning::default();
    let mut client = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(PRUNE_EVERY) => {}
            _ = stop.cancelled() => return,
        }
        if client.is_none() {
            client = capture::connect_apply(&config).await.ok();
        }
        let Some(c) = client.as_mut() else { continue };
        let result = async {
            let pruned: i64 = c
                .query_one("SELECT meridian.prune($1)", &[&peers])
                .await?
                .get(0);
            // Retries write applied state: in the appliers' turn (see
            // `Barrier::settle`).
            let turn = barrier.turn().await;
            let mut retried: i32 = c
                .query_one("SELECT meridian.retry_held()", &[])
                .await?
                .get(0);
            let engines = engines.current();
            if !engines.is_empty() {
                retried += resolve::retry_held(c, &engines).await? as i32;
            }
            drop(turn);
            // A sync point each round: once capture passes it, the region's
            // floor may move up to it even when nothing else is written
            // (see `meridian.local_floor`).
            barrier.emit().await?;
            // Schema changes reach capture through the WAL; the rows can go.
            c.execute("DELETE FROM meridian.ddl_out", &[]).await?;
            let expired = resolve::prune_conflicts(c, retention).await?;
            if expired > 0 {
                tracing::debug!(expired, "conflict log entries past their retention deleted");
            }
            let mut forgotten = 0i64;
            if last_forget.elapsed() >= forget_every {
                forgotten = c
                    .query_one(
                        "SELECT meridian.forget_tombstones($1, $2)",
                        &[&peers, &grace_ms],
                    )
                    .await?
                    .get(0);
                last_forget = tokio::time::Instant::now();
            }
            // For /metrics and `meridian status`: each peer's backlog (this
            // region's changes after the last it acknowledged; counted up to
            // a million: an index range scan each second) and the changes held here.
            let backlog = c
                .query(BACKLOG, &[&peers, &i32::from(config.region.id)])
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
                slot_warning.note(&slot);
            }
            Ok::<_, tokio_postgres::Error>((pruned, retried, forgotten))
        }
        .await;
        match result {
            Ok((pruned, retried, forgotten)) => {
                stats
                    .tombstones_forgotten
                    .fetch_add(forgotten as u64, Ordering::Relaxed);
                stats
                    .changes_pruned
                    .fetch_add(pruned as u64, Ordering::Relaxed);
                if retried > 0 {
                    stats
                        .changes_unheld
                        .fetch_add(retried as u64, Ordering::Relaxed);
                    tracing::info!(retried, "held changes applied");
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "housekeeping failed; reconnecting");
                client = None;
            }
        }
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

/// What every receiving connection of a region shares.
#[derive(Clone)]
pub struct Receiver {
    pub config: Config,
    /// Capture's barrier: applies decide on exact local state (see
    /// `capture::wal::Barrier::settle`).
    pub barrier: Arc<crate::capture::wal::Barrier>,
    /// Rule engines of the tables whose conflicts they decide.
    pub engines: resolve::EngineHandle,
    pub tls: Option<tls::PeerTls>,
    pub clock: Arc<Clock>,
    pub stats: Arc<ReplicationStats>,
}

/// Accepts peers' shipments until `stop`.
pub async fn receive(listener: TcpListener, receiver: Receiver, stop: CancellationToken) {
    while let Some((stream, peer)) = crate::net::accept(&listener, &stop, "replication").await {
        let (receiver, stop) = (receiver.clone(), stop.clone());
        let span = tracing::info_span!("receive", %peer);
        tokio::spawn(
            async move {
                tokio::select! {
                    r = serve_peer(stream, peer, &receiver, &stop) => {
                        if let Err(e) = r {
                            tracing::info!(error = %e, "peer connection ended");
                        }
                    }
                    _ = stop.cancelled() => {}
                }
            }
            .instrument(span),
        );
    }
}

async fn serve_peer(
    stream: TcpStream,
    peer: SocketAddr,
    receiver: &Receiver,
    stop: &CancellationToken,
) -> Result<(), ReplicationError> {
    let Receiver {
        config,
        barrier,
        engines: rules,
        tls,
        clock,
        stats,
    } = receiver;
    let tls = tls.as_ref();
    let secret = config.replication.resolve_secret().unwrap_or_default();
    let stream = match tokio::time::timeout(IO_TIMEOUT, tls::accept(tls, stream)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            stats.peers_refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%peer, error = %e, "refused a peer: TLS handshake failed");
            return Err(ReplicationError::Tls(e));
        }
        Err(_) => return Err(ReplicationError::Timeout(IO_TIMEOUT)),
    };
    let mut conn = Framed::new(stream, protocol::codec());
    let nonce = protocol::nonce();
    send(
        &mut conn,
        &Message::Challenge {
            version: protocol::VERSION,
            region: config.region.id,
            nonce: nonce.clone(),
        },
    )
    .await?;
    let origin = match recv(&mut conn).await? {
        Message::Hello {
            version,
            origin,
            proof,
        } => {
            let known = config.replication.peers.iter().any(|p| p.id == origin);
            let refusal = if version != protocol::VERSION {
                Some(format!(
                    "protocol {version} not supported (this build speaks {})",
                    protocol::VERSION
                ))
            } else if !protocol::verify(&secret, &nonce, origin, &proof) {
                Some("wrong cluster secret".to_string())
            } else if !known {
                Some(format!("region {origin} is not a configured peer"))
            } else {
                None
            };
            if let Some(reason) = refusal {
                stats.peers_refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%peer, origin, %reason, "refused a peer");
                let _ = send(
                    &mut conn,
                    &Message::Refused {
                        reason: reason.clone(),
                    },
                )
                .await;
                return Err(ProtocolError::Refused(reason).into());
            }
            origin
        }
        other => return Err(unexpected("Hello", &other)),
    };
    let mut client = capture::connect_apply(config).await?;
    let position = applied_position(&client, origin).await?;
    send(&mut conn, &Message::Welcome { position }).await?;
    let (mut conn, stream) = conn.split();
    let mut inbox = Inbox::new(stream);
    tracing::info!(origin, ?position, "peer authenticated; receiving");
    let peer_name = config
        .replication
        .peers
        .iter()
        .find(|p| p.id == origin)
        .map_or_else(|| origin.to_string(), |p| p.name.clone());
    let _link = LinkGuard::new(stats, &peer_name, false);
    // While catching up: since when, changes applied, seconds when last reported.
    let mut catching_up: Option<(std::time::Instant, u64, u64)> = None;
    // Records that everything the origin had committed by `origin_ms` is
    // applied here (its wall clock), for the lag.
    let caught_up = |origin_ms: Option<i64>, applied: u64| {
        stats.with_peer(&peer_name, |p| {
            p.changes_applied += applied;
            if let Some(ms) = origin_ms {
                p.caught_up_origin_ms = Some(ms);
                p.caught_up_at = Some(std::time::Instant::now());
                p.last_delay_ms = Some(wall_ms() - ms);
            }
        })
    };
    // A message read while gathering that must wait for the next round.
    let mut pending: Option<Message> = None;
    loop {
        // No timeout here: a shipper with nothing to ship is silent. A dead
        // peer shows as a closed connection (TCP keepalive, or its restart).
        let message = match pending.take() {
            Some(m) => m,
            None => inbox.next().await?,
        };
        let (changes, after, floor, origin_ms) = match message {
            Message::Batch {
                changes,
                after,
                floor,
                caught_up,
            } => (changes, after, floor, caught_up),
            // Everything the origin sent before this is applied.
            Message::Floor {
                hlc,
                caught_up: origin_ms,
            } => {
                note_floor(&client, origin, hlc).await?;
                caught_up(origin_ms, 0);
                continue;
            }
            other => return Err(unexpected("Batch", &other)),
        };
        if !hold_until_causally_ready(&client, &after, config.region.id, origin, stats, stop)
            .await?
        {
            return Ok(());
        }
        let mut gathered = Gathered {
            ends: changes
                .last()
                .map(WireChange::position)
                .into_iter()
                .collect(),
            changes,
            floor,
            origin_ms,
        };
        pending = gather(&mut inbox, &client, &mut gathered, config.region.id, origin).await?;
        let Gathered {
            changes,
            ends,
            floor,
            origin_ms,
        } = gathered;
        let Some(&last) = ends.last() else {
            continue;
        };
        let newest = changes
            .iter()
            .map(|c| c.hlc.max(c.tx_hlc))
            .max()
            .unwrap_or(0);
        if !hold_until_within_drift(clock, newest as u64, stats, stop).await {
            return Ok(());
        }
        let engines = &*rules.current();
        let mut attempt = 0;
        let outcome = loop {
            match apply::apply(&mut client, Some(barrier), engines, origin, &changes).await {
                Ok(done) => break done,
                // Rolled back to let capture through: retry once it has caught up.
                Err(ApplyError::GaveWay(limit)) => {
                    stats.batches_retried.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(origin, ?limit, "an apply gave way to capture (a local schema change may have queued behind it); retrying");
                    barrier
                        .catch_up()
                        .await
                        .map_err(|e| ReplicationError::Apply(capture::describe(&e)))?;
                }
                // Lost a deadlock or serialization race against local writes: retry.
                Err(e) if attempt < APPLY_RETRIES && e.is_retryable() => {
                    attempt += 1;
                    stats.batches_retried.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(5 * attempt)).await;
                }
                Err(ApplyError::Postgres(e)) => {
                    return Err(ReplicationError::Apply(capture::describe(&e)))
                }
            }
        };
        let engine = &outcome.engine;
        if let Some(hlc) = floor {
            note_floor(&client, origin, hlc).await?;
        }
        stats.batches_applied.fetch_add(1, Ordering::Relaxed);
        stats
            .changes_applied
            .fetch_add(outcome.written(), Ordering::Relaxed);
        stats
            .changes_older
            .fetch_add(outcome.older, Ordering::Relaxed);
        stats
            .changes_held
            .fetch_add(outcome.held(), Ordering::Relaxed);
        stats
            .conflicts
            .fetch_add(engine.conflicts, Ordering::Relaxed);
        stats.orphans.fetch_add(outcome.orphans, Ordering::Relaxed);
        if !engine.by_rule.is_empty() {
            let mut by = stats.conflicts_by_rule.lock().expect("not poisoned");
            for ((table, rule), n) in &engine.by_rule {
                *by.entry((table.clone(), rule.to_string())).or_default() += n;
            }
        }
        caught_up(origin_ms, outcome.written());
        // Catching up (batches that do not reach the origin's end): say how
        // it goes every few seconds, and when it is done.
        let applied_now = outcome.written() + outcome.older;
        match (&mut catching_up, origin_ms) {
            (None, None) => catching_up = Some((std::time::Instant::now(), applied_now, 0)),
            (Some((since, total, logged)), None) => {
                *total += applied_now;
                let secs = since.elapsed().as_secs();
                if secs >= *logged + CATCH_UP_REPORT {
                    *logged = secs;
                    let newest = changes.last().map_or(0, |c| c.tx_hlc);
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
                catching_up = None;
            }
            (None, Some(_)) => {}
        }
        if outcome.held() > 0 {
            tracing::warn!(
                origin,
                held = outcome.held(),
                "changes held (see meridian.held)"
            );
        }
        // One acknowledgement per batch received, in order; the counts go
        // with the last (the shipper matches positions only).
        for &position in &ends[..ends.len() - 1] {
            let ack = Message::Ack {
                position,
                applied: 0,
                older: 0,
                held: 0,
                duplicate: false,
            };
            send(&mut conn, &ack).await?;
        }
        send(
            &mut conn,
            &Message::Ack {
                position: last,
                applied: outcome.written(),
                older: outcome.older,
                held: outcome.held(),
                duplicate: outcome.duplicate,
            },
        )
        .await?;
    }
}

/// Messages decoded ahead of the receiver, at most this many.
const DECODE_AHEAD: usize = 8;

/// A peer's messages, read and decoded by a task of their own, so decoding
/// the next batches overlaps with applying this one (decoded in line, it
/// was 40% of the receiver's time in a catch-up, between applies).
struct Inbox {
    rx: tokio::sync::mpsc::Receiver<Result<Message, ProtocolError>>,
    reader: tokio::task::JoinHandle<()>,
}

impl Inbox {
    fn new(mut stream: futures_util::stream::SplitStream<Conn>) -> Inbox {
        let (tx, rx) = tokio::sync::mpsc::channel(DECODE_AHEAD);
        let reader = tokio::spawn(async move {
            loop {
                let message = match stream.next().await {
                    None => Err(ProtocolError::Closed),
                    Some(Err(e)) => Err(ProtocolError::Io(e)),
                    Some(Ok(frame)) => Message::decode(&frame),
                };
                let end = message.is_err();
                if tx.send(message).await.is_err() || end {
                    return;
                }
            }
        });
        Inbox { rx, reader }
    }

    /// The next message, waiting for it.
    async fn next(&mut self) -> Result<Message, ReplicationError> {
        Ok(self.rx.recv().await.ok_or(ProtocolError::Closed)??)
    }

    /// The next message if one has arrived.
    fn ready(&mut self) -> Result<Option<Message>, ReplicationError> {
        match self.rx.try_recv() {
            Ok(m) => Ok(Some(m?)),
            Err(tokio::sync::mpsc::error::TryRecvError::Empty) => Ok(None),
            Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => {
                Err(ProtocolError::Closed.into())
            }
        }
    }
}

impl Drop for Inbox {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// Batches received together, applied in one transaction.
struct Gathered {
    changes: Vec<WireChange>,
    /// Each batch's last position, in order (each gets its acknowledgement).
    ends: Vec<WirePosition>,
    /// The last batch's floor and caught-up time that were set.
    floor: Option<i64>,
    origin_ms: Option<i64>,
}

/// Adds to `gathered` the batches that have already arrived behind it (and
/// whose causal dependencies are met), up to [`APPLY_MAX`] changes: one apply
/// transaction then carries them all. An apply waits for this region's
/// capture (a sync point) and commits, so per batch it costs more than the
/// shipper spends to read one; applied one by one, a steady stream of small
/// batches would queue up to the shipper's whole window. Returns a message
/// read that has to wait for the next round.
async fn gather(
    inbox: &mut Inbox,
    client: &Client,
    gathered: &mut Gathered,
    me: u16,
    origin: u16,
) -> Result<Option<Message>, ReplicationError> {
    let mut have: Option<Vec<OriginPosition>> = None;
    while gathered.changes.len() < APPLY_MAX {
        let Some(message) = inbox.ready()? else {
            return Ok(None);
        };
        let Message::Batch {
            changes,
            after,
            floor,
            caught_up,
        } = message
        else {
            return Ok(Some(message));
        };
        if have.is_none() {
            have = Some(applied_vector(client).await?);
        }
        if !dependencies_met(&after, have.as_deref().unwrap_or_default(), me, origin) {
            let message = Message::Batch {
                changes,
                after,
                floor,
                caught_up,
            };
            return Ok(Some(message));
        }
        gathered
            .ends
            .extend(changes.last().map(WireChange::position));
        gathered.changes.extend(changes);
        gathered.floor = floor.or(gathered.floor);
        gathered.origin_ms = caught_up.or(gathered.origin_ms);
    }
    Ok(None)
}

/// Whether `have` (this region's applied vector) holds, from every third
/// region, what `after` asks for.
fn dependencies_met(
    after: &[OriginPosition],
    have: &[OriginPosition],
    me: u16,
    origin: u16,
) -> bool {
    after
        .iter()
        .filter(|p| p.origin != me && p.origin != origin)
        .all(|need| {
            have.iter().any(|h| {
                h.origin == need.origin
                    && (h.position.xid, h.position.seq) >= (need.position.xid, need.position.seq)
            })
        })
}

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

/// This region's floor: every change it captures from now on has a row
/// version above it (`meridian.local_floor`).
async fn local_floor(client: &Client, grace_ms: i64) -> Result<i64, ReplicationError> {
    let row = client
        .query_one("SELECT meridian.local_floor($1)", &[&grace_ms])
        .await
        .map_err(|source| CaptureError::Postgres {
            context: "taking this region's floor".into(),
            source,
        })?;
    Ok(row.get(0))
}

/// Records `origin`'s floor once everything it sent before is applied.
async fn note_floor(client: &Client, origin: u16, hlc: i64) -> Result<(), ReplicationError> {
    client
        .execute(
            "SELECT meridian.note_floor($1, $2)",
            &[&i32::from(origin), &hlc],
        )
        .await
        .map_err(|source| CaptureError::Postgres {
            context: "recording a peer's floor".into(),
            source,
        })?;
    Ok(())
}

/// Everything this region has applied, per origin.
async fn applied_vector(client: &Client) -> Result<Vec<OriginPosition>, ReplicationError> {
    let rows = client
        .query("SELECT origin, xid, seq FROM meridian.applied", &[])
        .await
        .map_err(|source| CaptureError::Postgres {
            context: "reading meridian.applied".into(),
            source,
        })?;
    Ok(rows
        .iter()
        .map(|r| OriginPosition {
            origin: r.get::<_, i32>(0) as u16,
            position: WirePosition {
                xid: r.get::<_, i64>(1) as u64,
                seq: r.get(2),
            },
        })
        .collect())
}

/// Causal order: a batch from `origin` waits until this region has applied,
/// from every third region, at least what `origin` had applied when it read
/// the batch, so a row never arrives before one it was written against.
///
/// The wait is bounded by [`CAUSAL_WAIT`]: the vector is read after the
/// batch, so it can ask for more than the batch's transactions saw, and when
/// a third region is cut off from this one but not from `origin`, its changes
/// cannot arrive here at all. Waiting forever would stall `origin` for the
/// whole partition (or, with two slow shippers waiting on each other, for
/// ever). After the bound the batch is applied and counted in
/// `batches_applied_before_dependencies`; convergence does not depend on
/// order (versions decide), only the momentary view does.
/// Returns false if asked to stop while waiting.
async fn hold_until_causally_ready(
    client: &Client,
    after: &[OriginPosition],
    me: u16,
    origin: u16,
    stats: &ReplicationStats,
    stop: &CancellationToken,
) -> Result<bool, ReplicationError> {
    if dependencies_met(after, &[], me, origin) {
        return Ok(true);
    }
    let mut counted = false;
    let deadline = tokio::time::Instant::now() + CAUSAL_WAIT;
    loop {
        let have = applied_vector(client).await?;
        if dependencies_met(after, &have, me, origin) {
            return Ok(true);
        }
        if tokio::time::Instant::now() >= deadline {
            stats
                .batches_applied_before_dependencies
                .fetch_add(1, Ordering::Relaxed);
            tracing::info!(origin, "applying a batch before changes its origin had seen (they have not arrived within the causal wait)");
            return Ok(true);
        }
        if !counted {
            stats
                .batches_held_for_causality
                .fetch_add(1, Ordering::Relaxed);
            tracing::debug!(
                origin,
                "batch waits for changes its origin had already applied"
            );
            counted = true;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            _ = stop.cancelled() => return Ok(false),
        }
    }
}

async fn applied_position(client: &Client, origin: u16) -> Result<WirePosition, ReplicationError> {
    let row = client
        .query_opt(
            "SELECT xid, seq FROM meridian.applied WHERE origin = $1",
            &[&i32::from(origin)],
        )
        .await
        .map_err(|source| CaptureError::Postgres {
            context: "reading meridian.applied".into(),
            source,
        })?;
    Ok(row.map_or(WirePosition::default(), |r| WirePosition {
        xid: r.get::<_, i64>(0) as u64,
        seq: r.get(1),
    }))
}

/// The receive event for a batch: the clock moves past its newest stamp. A
/// stamp further ahead than the maximum drift is not accepted: the batch is
/// held (not applied, not dropped) and retried until it is within bounds.
/// Returns false if asked to stop while holding.
async fn hold_until_within_drift(
    clock: &Clock,
    newest: u64,
    stats: &ReplicationStats,
    stop: &CancellationToken,
) -> bool {
    let mut counted = false;
    loop {
        match clock.observe(newest) {
            Ok(()) | Err(ClockError::Invalid(_)) => return true,
            Err(e @ ClockError::TooFarAhead { .. }) => {
                if !counted {
                    stats.batches_held_for_drift.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %e, "batch held: its stamps are too far ahead of this region's clock");
                    counted = true;
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                    _ = stop.cancelled() => return false,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(origin: u16, xid: u64, seq: i64) -> OriginPosition {
        OriginPosition {
            origin,
            position: WirePosition { xid, seq },
        }
    }

    #[test]
    fn dependencies_are_met_only_by_as_much_of_every_third_region() {
        // Region 1 receives from 2; 3 is the third region.
        let after = [at(1, 50, 0), at(2, 40, 0), at(3, 10, 5)];
        assert!(dependencies_met(&after, &[at(3, 10, 5)], 1, 2));
        assert!(dependencies_met(&after, &[at(3, 11, 0)], 1, 2));
        assert!(!dependencies_met(&after, &[at(3, 10, 4)], 1, 2));
        assert!(!dependencies_met(&after, &[], 1, 2));
        // Its own position and the origin's are not dependencies.
        assert!(dependencies_met(&after[..2], &[], 1, 2));
    }
}
