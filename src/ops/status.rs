//! `meridian status --config FILE`: one region's view of the cluster, for a
//! person. Live figures (sessions, links, lag) come from the region's admin
//! endpoint (`/status`); backlog, held changes and conflicts from its
//! database, so the report still says something useful when `meridian run`
//! is down.

use std::fmt::Write;

use serde_json::Value;

use crate::capture;
use crate::config::Config;
use crate::replication::conflict_log;

/// Builds the report. Errors only when neither the admin endpoint nor the
/// database answers; each unreachable part is otherwise named in the text.
pub async fn report(config: &Config) -> Result<String, String> {
    let mut out = String::new();
    let r = &config.region;
    let _ = writeln!(out, "region {} (id {})", r.name, r.id);
    let live = match config.admin.listen {
        Some(addr) => match super::http_get(&addr.to_string(), "/status").await {
            Ok((200, body)) => serde_json::from_str::<Value>(&body).ok(),
            Ok((code, _)) => {
                let _ = writeln!(out, "  admin {addr}: answered {code}");
                None
            }
            Err(e) => {
                let _ = writeln!(
                    out,
                    "  admin endpoint not reachable ({e}): is `meridian run` running?"
                );
                None
            }
        },
        None => {
            let _ = writeln!(
                out,
                "  no admin.listen in the config: live figures unavailable"
            );
            None
        }
    };
    if let Some(s) = &live {
        let sessions = &s["sessions"];
        let _ = writeln!(
            out,
            "  proxy {}: {} client session(s) open, {} since start{}; postgres {}",
            config.proxy.listen,
            sessions["active"],
            sessions["total"],
            if s["draining"].as_bool() == Some(true) {
                "; DRAINING"
            } else {
                ""
            },
            match s["postgres"]["up"].as_bool() {
                Some(true) => "ok".to_string(),
                _ => format!(
                    "UNREACHABLE ({})",
                    s["postgres"]["error"].as_str().unwrap_or("?")
                ),
            }
        );
    }
    let db = capture::connect(config).await;
    if let Err(e) = &db {
        let _ = writeln!(out, "  database not reachable: {e}");
        if live.is_none() {
            return Err(out);
        }
    }
    let db = db.ok();
    // Per peer: links and lag (live), backlog and last acknowledgement (database).
    let mut acks = std::collections::HashMap::new();
    if let Some(c) = &db {
        if let Ok(rows) = c
            .query(
                "SELECT peer, extract(epoch FROM now() - acked_at)::float8 FROM meridian.shipped",
                &[],
            )
            .await
        {
            for row in rows {
                acks.insert(row.get::<_, i32>(0) as u16, row.get::<_, f64>(1));
            }
        }
    }
    if config.replication.peers.is_empty() {
        let _ = writeln!(out, "  no peers configured");
    } else {
        let _ = writeln!(
            out,
            "\n  {:<16} {:<6} {:<6} {:>12} {:>10}  last acknowledgement",
            "peer", "out", "in", "lag", "backlog"
        );
    }
    for p in &config.replication.peers {
        let state = live.as_ref().and_then(|s| {
            s["replication"]["peers"]
                .as_array()?
                .iter()
                .find(|x| x["peer"] == p.name.as_str())
                .cloned()
        });
        let flag = |k: &str| match state.as_ref().map(|s| s[k].as_bool()) {
            Some(Some(true)) => "up",
            Some(Some(false)) => "DOWN",
            _ => "?",
        };
        let lag = state
            .as_ref()
            .and_then(|s| s["lag_seconds"].as_f64())
            .map_or("?".to_string(), |l| format!("{l:.3} s"));
        let backlog = state
            .as_ref()
            .and_then(|s| s["backlog"].as_i64())
            .map_or("?".to_string(), |b| b.to_string());
        let ack = acks
            .get(&p.id)
            .map_or("never".to_string(), |s| format!("{:.0} s ago", s.max(0.0)));
        let _ = writeln!(
            out,
            "  {:<16} {:<6} {:<6} {:>12} {:>10}  {ack}",
            p.name,
            flag("shipping"),
            flag("receiving"),
            lag,
            backlog
        );
    }
    if let Some(s) = &live {
        let rep = &s["replication"];
        let _ = writeln!(
            out,
            "\n  applied here: {} batch(es), {} change(s); held now: {}",
            rep["batches_applied"], rep["changes_applied"], rep["held_now"]
        );
    }
    if let Some(c) = &db {
        match crate::capture::wal::slot_state(c).await {
            Ok(Some(slot)) => {
                let _ = writeln!(
                    out,
                    "  capture slot: {} MB of WAL kept ({}), {}",
                    slot.retained_bytes >> 20,
                    slot.wal_status,
                    if slot.active {
                        "capture connected"
                    } else {
                        "NO CAPTURE CONNECTED"
                    }
                );
            }
            Ok(None) => {
                let _ = writeln!(out, "  capture slot: MISSING (run meridian migrate)");
            }
            Err(e) => {
                let _ = writeln!(out, "  capture slot: cannot read: {e}");
            }
        }
        match conflict_log::recent_conflicts(c, None, None, 5).await {
            Ok(list) if list.is_empty() => {
                let _ = writeln!(out, "  conflicts: none logged");
            }
            Ok(list) => {
                let total: i64 = c
                    .query_one("SELECT count(*) FROM meridian.conflict", &[])
                    .await
                    .map_or(0, |r| r.get(0));
                let _ = writeln!(out, "  conflicts: {total} logged; the latest:");
                for x in &list {
                    for line in conflict_log::describe(x).lines() {
                        let _ = writeln!(out, "    {line}");
                    }
                }
            }
            Err(e) => {
                let _ = writeln!(out, "  conflicts: cannot read meridian.conflict: {e}");
            }
        }
    }
    Ok(out)
}
