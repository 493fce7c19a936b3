//! link: the WAN emulator. A userspace TCP relay that adds latency, jitter
//! and a bandwidth limit between two regions, and can partition them, so a
//! whole multi-region cluster runs on one machine (the kernel's netem is not
//! available here). Modelled on what toxiproxy offers, built for meridian:
//!
//! - **Delay without reordering.** Each chunk read from one side is due at
//!   `read time + latency ± jitter`, but never before the chunk read before
//!   it on the same connection and direction: TCP never reorders bytes, so
//!   neither does the link.
//! - **Bandwidth** per direction of each connection, by pacing writes.
//! - **Partition** closes every connection through the link and refuses new
//!   ones (they are accepted and closed at once) until healed: both peers see
//!   the connection drop, as after a long network outage.
//! - **Bounded**: at most [`MAX_CHUNKS_IN_FLIGHT`] chunks of
//!   [`CHUNK`] bytes wait per direction; a full queue stops reading, and TCP
//!   flow control pushes back on the sender.
//! - **Control** at run time over HTTP (see [`serve_control`]); settings apply
//!   to data read after the change.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use rand::Rng;
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// Bytes read per chunk.
pub const CHUNK: usize = 16 * 1024;
/// Chunks waiting for delivery per direction of a connection.
pub const MAX_CHUNKS_IN_FLIGHT: usize = 256;

/// What the link does to traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LinkSettings {
    /// One-way delay.
    pub latency: Duration,
    /// Each chunk's delay is uniform in `latency ± jitter` (never below zero).
    pub jitter: Duration,
    /// Bytes per second per direction of each connection; `None` is unlimited.
    pub bandwidth: Option<u64>,
}

impl LinkSettings {
    /// One chunk's delay.
    fn sample_delay(&self, rng: &mut impl Rng) -> Duration {
        if self.jitter.is_zero() {
            return self.latency;
        }
        let j = self.jitter.as_nanos() as i128;
        let offset = rng.gen_range(-j..=j);
        let nanos = (self.latency.as_nanos() as i128 + offset).max(0);
        Duration::from_nanos(nanos as u64)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LinkError {
    #[error("bandwidth {0:?}: expected a number and a unit, e.g. 10MB/s, 512kB/s, 100Mbit/s")]
    Bandwidth(String),
}

/// Parses `10MB/s`, `512kB`, `100Mbit/s`, `1GiB/s`, ... into bytes per second
/// (k, M, G are powers of 1000; Ki, Mi, Gi of 1024; bit divides by 8).
pub fn parse_bandwidth(text: &str) -> Result<u64, LinkError> {
    let bad = || LinkError::Bandwidth(text.to_string());
    let t = text.trim();
    let t = t.strip_suffix("/s").unwrap_or(t);
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(bad)?;
    let (number, unit) = t.split_at(split);
    let number: f64 = number.parse().map_err(|_| bad())?;
    let (scale, bits) = match unit.trim() {
        "B" => (1.0, false),
        "kB" | "KB" => (1e3, false),
        "MB" => (1e6, false),
        "GB" => (1e9, false),
        "KiB" => (1024.0, false),
        "MiB" => (1024.0 * 1024.0, false),
        "GiB" => (1024.0 * 1024.0 * 1024.0, false),
        "bit" => (1.0, true),
        "kbit" | "Kbit" => (1e3, true),
        "Mbit" => (1e6, true),
        "Gbit" => (1e9, true),
        _ => return Err(bad()),
    };
    let bytes = number * scale / if bits { 8.0 } else { 1.0 };
    if !(bytes >= 1.0 && bytes.is_finite()) {
        return Err(bad());
    }
    Ok(bytes as u64)
}

/// A running link's shared state: settings, partition, counters.
#[derive(Debug)]
pub struct LinkState {
    pub listen: SocketAddr,
    pub to: String,
    settings: RwLock<LinkSettings>,
    partitioned: AtomicBool,
    /// Replaced (cancelled) on every partition, closing current connections.
    cut: watch::Sender<CancellationToken>,
    pub connections: AtomicU64,
    pub refused: AtomicU64,
    pub bytes: AtomicU64,
}

impl LinkState {
    pub fn settings(&self) -> LinkSettings {
        *self.settings.read().unwrap_or_else(|e| e.into_inner())
    }

    pub fn set_settings(&self, s: LinkSettings) {
        *self.settings.write().unwrap_or_else(|e| e.into_inner()) = s;
    }

    pub fn is_partitioned(&self) -> bool {
        self.partitioned.load(Ordering::Acquire)
    }

    /// Closes every connection and refuses new ones until [`LinkState::heal`].
    pub fn partition(&self) {
        self.partitioned.store(true, Ordering::Release);
        self.cut.send_modify(|token| {
            token.cancel();
            *token = CancellationToken::new();
        });
    }

    pub fn heal(&self) {
        self.partitioned.store(false, Ordering::Release);
    }

    fn current_cut(&self) -> CancellationToken {
        self.cut.borrow().clone()
    }

    pub fn status(&self) -> serde_json::Value {
        let s = self.settings();
        serde_json::json!({
            "listen": self.listen.to_string(),
            "to": self.to,
            "latency_ms": s.latency.as_secs_f64() * 1000.0,
            "jitter_ms": s.jitter.as_secs_f64() * 1000.0,
            "bandwidth_bytes_per_s": s.bandwidth,
            "partitioned": self.is_partitioned(),
            "connections": self.connections.load(Ordering::Relaxed),
            "refused_while_partitioned": self.refused.load(Ordering::Relaxed),
            "bytes_forwarded": self.bytes.load(Ordering::Relaxed),
        })
    }
}

/// Binds a link; [`run`] serves it.
pub async fn bind(
    listen: SocketAddr,
    to: String,
    settings: LinkSettings,
) -> std::io::Result<(TcpListener, Arc<LinkState>)> {
    let listener = TcpListener::bind(listen).await?;
    let state = Arc::new(LinkState {
        listen: listener.local_addr()?,
        to,
        settings: RwLock::new(settings),
        partitioned: AtomicBool::new(false),
        cut: watch::Sender::new(CancellationToken::new()),
        connections: AtomicU64::new(0),
        refused: AtomicU64::new(0),
        bytes: AtomicU64::new(0),
    });
    Ok((listener, state))
}

/// Accepts and relays until `stop`.
pub async fn run(listener: TcpListener, state: Arc<LinkState>, stop: CancellationToken) {
    while let Some((inbound, peer)) = crate::net::accept(&listener, &stop, "link").await {
        if state.is_partitioned() {
            state.refused.fetch_add(1, Ordering::Relaxed);
            drop(inbound);
            continue;
        }
        state.connections.fetch_add(1, Ordering::Relaxed);
        let (state, stop, cut) = (state.clone(), stop.clone(), state.current_cut());
        let span = tracing::info_span!("link", %peer, to = %state.to);
        tokio::spawn(
            async move {
                let outbound = match TcpStream::connect(&state.to).await {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::info!(error = %e, "link target unreachable; closing");
                        return;
                    }
                };
                let _ = outbound.set_nodelay(true);
                tokio::select! {
                    _ = relay(inbound, outbound, &state) => {}
                    _ = cut.cancelled() => tracing::info!("partitioned: connection cut"),
                    _ = stop.cancelled() => {}
                }
            }
            .instrument(span),
        );
    }
}

/// Relays both directions of one connection through the delay line.
pub async fn relay<A, B>(a: A, b: B, state: &LinkState)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (ar, aw) = tokio::io::split(a);
    let (br, bw) = tokio::io::split(b);
    // Each direction delivers what it read, then passes the EOF on (shutdown
    // of its write side); the connection ends when both have.
    tokio::join!(direction(ar, bw, state), direction(br, aw, state));
}

/// One direction: a reader stamping each chunk with its due time, and a
/// writer delivering chunks at those times, in order, paced to the bandwidth.
async fn direction<R, W>(mut from: R, mut to: W, state: &LinkState)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(MAX_CHUNKS_IN_FLIGHT);
    let reader = async move {
        let mut last_due = Instant::now();
        loop {
            let mut buf = vec![0u8; CHUNK];
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            buf.truncate(n);
            let delay = state.settings().sample_delay(&mut rand::thread_rng());
            // Never before the previous chunk: no reordering within a connection.
            let due = (Instant::now() + delay).max(last_due);
            last_due = due;
            if tx.send((due, buf)).await.is_err() {
                return;
            }
        }
    };
    let writer = async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
            state.bytes.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            if let Some(rate) = state.settings().bandwidth {
                let secs = chunk.len() as f64 / rate as f64;
                tokio::time::sleep(Duration::from_secs_f64(secs)).await;
            }
        }
        let _ = to.shutdown().await;
    };
    // The writer finishes delivering what was read before an EOF.
    let (_, ()) = tokio::join!(reader, writer);
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SettingsQuery {
    latency: Option<String>,
    jitter: Option<String>,
    bandwidth: Option<String>,
}

/// The control API:
///
/// - `GET /` and `GET /status`: settings, partition state and counters (JSON);
/// - `POST /partition`, `POST /heal`;
/// - `POST /settings?latency=100ms&jitter=10ms&bandwidth=1MB/s` (any subset;
///   `bandwidth=none` removes the limit).
pub async fn serve_control(
    listener: TcpListener,
    state: Arc<LinkState>,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/", get(status))
        .route("/status", get(status))
        .route("/partition", post(partition))
        .route("/heal", post(heal))
        .route("/settings", post(settings))
        .with_state(state);
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
}

async fn status(State(s): State<Arc<LinkState>>) -> Json<serde_json::Value> {
    Json(s.status())
}

async fn partition(State(s): State<Arc<LinkState>>) -> Json<serde_json::Value> {
    s.partition();
    tracing::info!(to = %s.to, "partitioned");
    Json(s.status())
}

async fn heal(State(s): State<Arc<LinkState>>) -> Json<serde_json::Value> {
    s.heal();
    tracing::info!(to = %s.to, "healed");
    Json(s.status())
}

async fn settings(
    State(s): State<Arc<LinkState>>,
    Query(q): Query<SettingsQuery>,
) -> Result<Json<serde_json::Value>, (StatusCode, String)> {
    let bad = |e: String| (StatusCode::BAD_REQUEST, e + "\n");
    let mut new = s.settings();
    let duration = |name: &str, v: &str| {
        humantime::parse_duration(v).map_err(|e| bad(format!("{name}={v}: {e}")))
    };
    if let Some(v) = &q.latency {
        new.latency = duration("latency", v)?;
    }
    if let Some(v) = &q.jitter {
        new.jitter = duration("jitter", v)?;
    }
    if let Some(v) = &q.bandwidth {
        new.bandwidth = match v.as_str() {
            "none" | "unlimited" => None,
            v => Some(parse_bandwidth(v).map_err(|e| bad(e.to_string()))?),
        };
    }
    s.set_settings(new);
    tracing::info!(to = %s.to, ?new, "settings changed");
    Ok(Json(s.status()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use tokio::io::duplex;

    fn state(settings: LinkSettings) -> LinkState {
        LinkState {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            to: "test".into(),
            settings: RwLock::new(settings),
            partitioned: AtomicBool::new(false),
            cut: watch::Sender::new(CancellationToken::new()),
            connections: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
        }
    }

    #[test]
    fn bandwidth_units() {
        assert_eq!(parse_bandwidth("10MB/s"), Ok(10_000_000));
        assert_eq!(parse_bandwidth("512kB"), Ok(512_000));
        assert_eq!(parse_bandwidth("100Mbit/s"), Ok(12_500_000));
        assert_eq!(parse_bandwidth("1MiB/s"), Ok(1_048_576));
        assert_eq!(parse_bandwidth("1.5GB/s"), Ok(1_500_000_000));
        for bad in ["", "fast", "10", "10 parsecs", "0MB/s", "-1MB/s"] {
            assert!(parse_bandwidth(bad).is_err(), "{bad}");
        }
    }

    /// Virtual time: data arrives exactly one latency later, in order.
    #[tokio::test(start_paused = true)]
    async fn delivers_after_the_latency() {
        let s = state(LinkSettings {
            latency: Duration::from_millis(30),
            ..LinkSettings::default()
        });
        let (mut client, link_a) = duplex(1 << 16);
        let (link_b, mut server) = duplex(1 << 16);
        let run = relay(link_a, link_b, &s);
        let check = async {
            let start = Instant::now();
            client.write_all(b"ping").await.unwrap();
            let mut got = [0u8; 4];
            server.read_exact(&mut got).await.unwrap();
            assert_eq!(&got, b"ping");
            assert_eq!(start.elapsed(), Duration::from_millis(30));
            server.write_all(b"pong").await.unwrap();
            client.read_exact(&mut got).await.unwrap();
            assert_eq!(&got, b"pong");
            assert_eq!(start.elapsed(), Duration::from_millis(60));
        };
        tokio::select! {
            _ = run => panic!("relay ended early"),
            _ = check => {}
        }
    }

    /// Closing one side passes the EOF through after the data in flight.
    #[tokio::test(start_paused = true)]
    async fn eof_follows_the_data() {
        let s = state(LinkSettings {
            latency: Duration::from_millis(20),
            ..LinkSettings::default()
        });
        let (mut client, link_a) = duplex(1 << 16);
        let (link_b, mut server) = duplex(1 << 16);
        let check = async {
            client.write_all(b"last words").await.unwrap();
            client.shutdown().await.unwrap();
            let mut got = Vec::new();
            server.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, b"last words");
            drop(server);
        };
        let ((), ()) = tokio::join!(relay(link_a, link_b, &s), check);
    }

    /// Virtual time: 1 MB at 1 MB/s takes a second (plus the latency).
    #[tokio::test(start_paused = true)]
    async fn paces_to_the_bandwidth() {
        let s = state(LinkSettings {
            latency: Duration::from_millis(10),
            bandwidth: Some(1_000_000),
            ..LinkSettings::default()
        });
        let (mut client, link_a) = duplex(1 << 20);
        let (link_b, mut server) = duplex(1 << 20);
        let payload = vec![7u8; 1_000_000];
        let check = async {
            let start = Instant::now();
            client.write_all(&payload).await.unwrap();
            let mut got = vec![0u8; payload.len()];
            server.read_exact(&mut got).await.unwrap();
            let took = start.elapsed();
            assert!(
                took >= Duration::from_millis(990) && took <= Duration::from_millis(1100),
                "{took:?}"
            );
        };
        tokio::select! {
            _ = relay(link_a, link_b, &s) => panic!("relay ended early"),
            _ = check => {}
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]
        /// With any jitter, bytes arrive complete and in order, never before
        /// `latency - jitter`.
        #[test]
        fn jitter_never_reorders(
            writes in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..2000), 1..30),
            latency_ms in 0u64..50,
            jitter_ms in 0u64..50,
        ) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().unwrap();
            rt.block_on(async {
                let s = state(LinkSettings {
                    latency: Duration::from_millis(latency_ms),
                    jitter: Duration::from_millis(jitter_ms),
                    bandwidth: None,
                });
                let (mut client, link_a) = duplex(1 << 20);
                let (link_b, mut server) = duplex(1 << 20);
                let expected: Vec<u8> = writes.concat();
                let check = async {
                    let start = Instant::now();
                    for w in &writes {
                        client.write_all(w).await.unwrap();
                    }
                    let mut got = vec![0u8; expected.len()];
                    server.read_exact(&mut got).await.unwrap();
                    assert_eq!(got, expected);
                    assert!(start.elapsed() >= Duration::from_millis(latency_ms.saturating_sub(jitter_ms)));
                };
                tokio::select! {
                    _ = relay(link_a, link_b, &s) => panic!("relay ended early"),
                    _ = check => {}
                }
            });
        }
    }
}
