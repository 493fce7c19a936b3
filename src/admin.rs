//! admin: the per-region HTTP endpoint. Today: `/health` (200 when the proxy
//! accepts clients and its PostgreSQL answers, 503 otherwise) and `/status`
//! (JSON counters: sessions, and statements by class). Metrics, lag and conflicts join it with replication.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use tokio::net::TcpListener;

use crate::wire::backend::BackendAddr;
use crate::wire::relay::Shutdown;
use crate::wire::session::SessionContext;

#[derive(Clone)]
struct AdminState {
    region: String,
    backend: BackendAddr,
    sessions: Arc<SessionContext>,
    shutdown: Shutdown,
}

/// Serves the admin endpoint until shutdown begins.
pub async fn serve(
    listener: TcpListener,
    region: String,
    sessions: Arc<SessionContext>,
    shutdown: Shutdown,
) -> std::io::Result<()> {
    let state = AdminState {
        region,
        backend: BackendAddr::from_config(&sessions.backend),
        sessions,
        shutdown,
    };
    let stop = state.shutdown.clone();
    let app = Router::new()
        .route("/health", get(health))
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
    match tokio::time::timeout(Duration::from_secs(1), s.backend.connect()).await {
        Ok(Ok(_)) => (StatusCode::OK, "ok\n".into()),
        Ok(Err(e)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("postgres unreachable: {e}\n"),
        ),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "postgres unreachable: timeout\n".into(),
        ),
    }
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
    Json(serde_json::json!({
        "region": s.region,
        "draining": s.shutdown.drain.is_cancelled(),
        "sessions": {
            "active": n(&st.active),
            "total": n(&st.total),
            "refused_full": n(&st.refused_full),
            "auth_failures": n(&st.auth_failures),
            "protocol_errors": n(&st.protocol_errors),
            "handshake_timeouts": n(&st.handshake_timeouts),
        },
        "statements": statements,
        "replication": s.sessions.replication.snapshot(),
        "stamps": {
            "injected": n(&st.stamps_injected),
            "failures": n(&st.stamp_failures),
        },
    }))
}
