//! admin: the per-region HTTP endpoint, for operators, load balancers and
//! Prometheus:
//!
//! - `/health`: 200 when the proxy accepts clients and its PostgreSQL
//!   answers within a second, 503 otherwise (draining, or Postgres down), so
//!   HAProxy or a Kubernetes probe takes the region out of rotation;
//! - `/metrics`: Prometheus text format (sessions, statements by class,
//!   replication lag and links per peer, capture backlog, applied and held
//!   changes, conflicts by table and rule, clock drift holds);
//! - `/status`: the same and more as JSON (read by `meridian status`).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use tokio::net::TcpListener;

use crate::replication::ReplicationStats;
use crate::shutdown::Shutdown;
use crate::wire::backend::BackendAddr;
use crate::wire::session::SessionContext;

#[derive(Clone)]
struct AdminState {
    region: String,
    backend: BackendAddr,
    sessions: Arc<SessionContext>,
    replication: Arc<ReplicationStats>,
    shutdown: Shutdown,
}

/// Serves the admin endpoint until shutdown begins.
pub async fn serve(
    listener: TcpListener,
    region: String,
    sessions: Arc<SessionContext>,
    replication: Arc<ReplicationStats>,
    shutdown: Shutdown,
) -> std::io::Result<()> {
    let state = AdminState {
        region,
        backend: BackendAddr::from_config(&sessions.backend),
        sessions,
        replication,
        shutdown,
    };
    let stop = state.shutdown.clone();
    let app = Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/status", get(status))
        .with_state(state);
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            tokio::select! { _ = stop.drain.cancelled() => {}, _ = stop.abort.cancelled() => {} }
        })
        .await
}

pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

async fn health(State(s): State<AdminState>) -> (StatusCode, String) {
    if s.shutdown.drain.is_cancelled() {
        return (StatusCode::SERVICE_UNAVAILABLE, "draining\n".into());
    }
    match postgres_reachable(&s).await {
        Ok(()) => (StatusCode::OK, "ok\n".into()),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("postgres unreachable: {e}\n"),
        ),
    }
}

/// Whether a new backend connection to this region's Postgres opens within
/// a second.
async fn postgres_reachable(s: &AdminState) -> Result<(), String> {
    match tokio::time::timeout(Duration::from_secs(1), s.backend.connect()).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timeout".into()),
    }
}

async fn metrics(
    State(s): State<AdminState>,
) -> ([(axum::http::HeaderName, &'static str); 1], String) {
    let postgres_up = postgres_reachable(&s).await.is_ok();
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        render_metrics(&s, postgres_up),
    )
}

/// The Prometheus text exposition of this region's counters.
fn render_metrics(s: &AdminState, postgres_up: bool) -> String {
    let st = &s.sessions.stats;
    let rep = &s.replication;
    let n = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed) as f64;
    let region = [("region", s.region.as_str())];
    let mut m = Exposition::default();
    m.family(
        "meridian_postgres_up",
        "gauge",
        "1 when this region's PostgreSQL accepts a connection within a second.",
    )
    .sample(&region, f64::from(u8::from(postgres_up)));
    m.family(
        "meridian_draining",
        "gauge",
        "1 while the proxy drains after SIGTERM.",
    )
    .sample(
        &region,
        f64::from(u8::from(s.shutdown.drain.is_cancelled())),
    );
    m.family(
        "meridian_client_sessions",
        "gauge",
        "Client sessions open now.",
    )
    .sample(&region, n(&st.active));
    m.family(
        "meridian_client_sessions_total",
        "counter",
        "Client sessions accepted.",
    )
    .sample(&region, n(&st.total));
    m.family(
        "meridian_client_sessions_refused_total",
        "counter",
        "Client sessions refused because the proxy was full.",
    )
    .sample(&region, n(&st.refused_full));
    m.family(
        "meridian_auth_failures_total",
        "counter",
        "Client authentications that failed.",
    )
    .sample(&region, n(&st.auth_failures));
    m.family(
        "meridian_protocol_errors_total",
        "counter",
        "Client sessions closed for a protocol error.",
    )
    .sample(&region, n(&st.protocol_errors));
    m.family(
        "meridian_client_refused_total",
        "counter",
        "Client sessions closed for setting a meridian.* setting or taking a replication origin (SQLSTATE 42501).",
    )
    .sample(&region, n(&st.refused));
    let f = m.family(
        "meridian_client_sessions_relayed_total",
        "counter",
        "Client sessions relayed, by I/O: io_uring for plain sessions where the kernel allows it, epoll for TLS ones and otherwise.",
    );
    for (io, count) in [
        ("io_uring", &st.relayed_io_uring),
        ("epoll", &st.relayed_epoll),
    ] {
        f.sample(&[("region", &s.region), ("io", io)], n(count));
    }
    let f = m.family(
        "meridian_statements_total",
        "counter",
        "Statements relayed, by class.",
    );
    for (class, count) in s.sessions.statements.snapshot() {
        f.sample(&[("region", &s.region), ("class", class)], count as f64);
    }
    let now = crate::replication::wall_ms();
    let peers = rep.peers.lock().expect("not poisoned").clone();
    let f = m.family(
        "meridian_replication_link_up",
        "gauge",
        "1 while a link to (out) or from (in) the peer is connected.",
    );
    for (peer, p) in &peers {
        for (direction, up) in [("out", p.shipping > 0), ("in", p.receiving > 0)] {
            f.sample(
                &[
                    ("region", &s.region),
                    ("peer", peer),
                    ("direction", direction),
                ],
                f64::from(u8::from(up)),
            );
        }
    }
    let f = m.family(
        "meridian_replication_lag_seconds",
        "gauge",
        "How far this region is behind the peer's committed changes (see README).",
    );
    for (peer, p) in &peers {
        if let Some(lag) = p.lag_seconds(now) {
            f.sample(&[("region", &s.region), ("peer", peer)], lag);
        }
    }
    let f = m.family(
        "meridian_capture_backlog_changes",
        "gauge",
        "Changes captured here that the peer has not acknowledged.",
    );
    for (peer, p) in &peers {
        if let Some(b) = p.backlog {
            f.sample(&[("region", &s.region), ("peer", peer)], b as f64);
        }
    }
    let f = m.family(
        "meridian_replication_peer_changes_applied_total",
        "counter",
        "Changes from the peer applied here.",
    );
    for (peer, p) in &peers {
        f.sample(
            &[("region", &s.region), ("peer", peer)],
            p.changes_applied as f64,
        );
    }
    for (name, help, value) in [
        (
            "meridian_replication_batches_sent_total",
            "Batches of this region's changes acknowledged by peers.",
            n(&rep.batches_sent),
        ),
        (
            "meridian_replication_changes_sent_total",
            "Changes of this region acknowledged by peers.",
            n(&rep.changes_sent),
        ),
        (
            "meridian_replication_batches_applied_total",
            "Batches from peers applied here.",
            n(&rep.batches_applied),
        ),
        (
            "meridian_replication_changes_applied_total",
            "Changes from peers applied here.",
            n(&rep.changes_applied),
        ),
        (
            "meridian_replication_changes_older_total",
            "Changes from peers older than the row here (superseded).",
            n(&rep.changes_older),
        ),
        (
            "meridian_replication_changes_held_total",
            "Changes from peers that could not be applied and were held.",
            n(&rep.changes_held),
        ),
        (
            "meridian_replication_changes_unheld_total",
            "Held changes applied on a retry.",
            n(&rep.changes_unheld),
        ),
        (
            "meridian_replication_batches_retried_total",
            "Batches retried after a deadlock or serialization failure.",
            n(&rep.batches_retried),
        ),
        (
            "meridian_replication_peers_refused_total",
            "Peer connections refused (secret, TLS, unknown region).",
            n(&rep.peers_refused),
        ),
        (
            "meridian_clock_drift_holds_total",
            "Batches held because they were stamped too far ahead of this region's clock.",
            n(&rep.batches_held_for_drift),
        ),
        (
            "meridian_causal_holds_total",
            "Batches held until their dependencies from other regions were applied.",
            n(&rep.batches_held_for_causality),
        ),
        (
            "meridian_tombstones_forgotten_total",
            "Tombstones deleted once every region was past them.",
            n(&rep.tombstones_forgotten),
        ),
        (
            "meridian_orphans_total",
            "Rows found without their foreign-key parent.",
            n(&rep.orphans),
        ),
    ] {
        m.family(name, "counter", help).sample(&region, value);
    }
    m.family(
        "meridian_replication_held_changes",
        "gauge",
        "Changes waiting in meridian.held now.",
    )
    .sample(&region, rep.held_now() as f64);
    let f = m.family(
        "meridian_replication_held_changes_by_sqlstate",
        "gauge",
        "Changes waiting in meridian.held now, by the SQLSTATE of the error that holds them \
         (42P01: the table is missing here; 23505: a unique value is taken; 23502: a NOT NULL column).",
    );
    for (sqlstate, count) in rep.held_by_sqlstate.lock().expect("not poisoned").iter() {
        f.sample(
            &[("region", &s.region), ("sqlstate", sqlstate)],
            *count as f64,
        );
    }
    m.family(
        "meridian_capture_retained_wal_bytes",
        "gauge",
        "WAL the capture slot keeps (from its restart point to now).",
    )
    .sample(&region, n(&rep.capture_retained_bytes));
    let f = m.family(
        "meridian_conflicts_total",
        "counter",
        "Conflicts decided here, by table and rule.",
    );
    for ((table, rule), count) in rep.conflicts_by_rule.lock().expect("not poisoned").iter() {
        f.sample(
            &[("region", &s.region), ("table", table), ("rule", rule)],
            *count as f64,
        );
    }
    m.text
}

/// Prometheus text format, written by hand (a few lines; the format is
/// checked by `promtool check metrics` in tests/ops.rs).
#[derive(Default)]
struct Exposition {
    text: String,
    family: String,
}

impl Exposition {
    fn family(&mut self, name: &str, kind: &str, help: &str) -> &mut Self {
        use std::fmt::Write;
        let _ = writeln!(
            self.text,
            "# HELP {name} {}",
            help.replace('\\', "\\\\").replace('\n', "\\n")
        );
        let _ = writeln!(self.text, "# TYPE {name} {kind}");
        self.family = name.to_string();
        self
    }

    fn sample(&mut self, labels: &[(&str, &str)], value: f64) -> &mut Self {
        use std::fmt::Write;
        let labels: Vec<String> = labels
            .iter()
            .map(|(k, v)| format!("{k}=\"{}\"", escape_label(v)))
            .collect();
        let value = if value.is_finite() {
            value.to_string()
        } else if value.is_nan() {
            "NaN".into()
        } else if value > 0.0 {
            "+Inf".into()
        } else {
            "-Inf".into()
        };
        let _ = writeln!(self.text, "{}{{{}}} {value}", self.family, labels.join(","));
        self
    }
}

/// A label value as the text format wants it: backslash, double quote and
/// newline escaped.
fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

async fn status(State(s): State<AdminState>) -> Json<serde_json::Value> {
    let st = &s.sessions.stats;
    let n = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    let statements: serde_json::Map<String, serde_json::Value> = s
        .sessions
        .statements
        .snapshot()
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.into()))
        .collect();
    let postgres = postgres_reachable(&s).await;
    Json(serde_json::json!({
        "region": s.region,
        "draining": s.shutdown.drain.is_cancelled(),
        "postgres": {"up": postgres.is_ok(), "error": postgres.err()},
        "sessions": {
            "active": n(&st.active),
            "total": n(&st.total),
            "refused_full": n(&st.refused_full),
            "auth_failures": n(&st.auth_failures),
            "protocol_errors": n(&st.protocol_errors),
            "refused": n(&st.refused),
            "handshake_timeouts": n(&st.handshake_timeouts),
            "relayed": {"io_uring": n(&st.relayed_io_uring), "epoll": n(&st.relayed_epoll)},
        },
        "statements": statements,
        "replication": s.replication.snapshot(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_follow_the_text_format() {
        let mut m = Exposition::default();
        m.family("x_total", "counter", "Help with a \\ backslash.")
            .sample(&[("table", "a\"b\\c\nd")], 3.0)
            .sample(&[("table", "plain")], 0.5);
        m.family("y", "gauge", "NaN and infinities.")
            .sample(&[], f64::NAN)
            .sample(&[], f64::INFINITY);
        assert_eq!(
            m.text,
            "# HELP x_total Help with a \\\\ backslash.\n# TYPE x_total counter\n\
             x_total{table=\"a\\\"b\\\\c\\nd\"} 3\nx_total{table=\"plain\"} 0.5\n\
             # HELP y NaN and infinities.\n# TYPE y gauge\ny{} NaN\ny{} +Inf\n"
        );
    }
}
