//! replication::conflict_log: reading and expiring `meridian.conflict`, the
//! log of every conflict the rule engine decided (written by
//! `meridian.engine_write`), for `meridian conflicts` and `/status`.

use serde_json::Value;

/// One entry of the conflict log.
#[derive(Debug, Clone, PartialEq)]
pub struct LoggedConflict {
    pub at: String,
    pub table: String,
    pub key: Value,
    pub rule: String,
    pub kept: String,
    pub merged: Vec<String>,
    pub local: Option<Value>,
    pub local_version: (i64, i32),
    pub remote: Option<Value>,
    pub remote_version: (i64, i32),
    pub result: Option<Value>,
    /// The physical times of the two versions (UTC, time of day).
    pub local_time: String,
    pub remote_time: String,
}

/// The newest `limit` entries of the conflict log, optionally of one table
/// and no older than `since`, newest first.
pub async fn recent_conflicts(
    client: &tokio_postgres::Client,
    table: Option<&str>,
    since: Option<std::time::Duration>,
    limit: i64,
) -> Result<Vec<LoggedConflict>, tokio_postgres::Error> {
    let since_s = since.map(|d| d.as_secs_f64());
    let rows = client
        .query(
            "SELECT to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.MS'), tbl, pk, rule, kept, merged,
                    local_row, local_hlc, local_origin, remote_row, remote_hlc, remote_origin, result_row,
                    to_char(meridian.hlc_time(local_hlc) AT TIME ZONE 'UTC', 'HH24:MI:SS.MS'),
                    to_char(meridian.hlc_time(remote_hlc) AT TIME ZONE 'UTC', 'HH24:MI:SS.MS')
               FROM meridian.conflict
              WHERE ($1::text IS NULL OR tbl = $1 OR tbl = 'public.' || $1)
                AND ($2::float8 IS NULL OR at >= now() - make_interval(secs => $2))
              ORDER BY id DESC
              LIMIT $3",
            &[&table, &since_s, &limit],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| LoggedConflict {
            at: r.get(0),
            table: r.get(1),
            key: r.get(2),
            rule: r.get(3),
            kept: r.get(4),
            merged: r.get(5),
            local: r.get(6),
            local_version: (r.get(7), r.get(8)),
            remote: r.get(9),
            remote_version: (r.get(10), r.get(11)),
            result: r.get(12),
            local_time: r.get(13),
            remote_time: r.get(14),
        })
        .collect())
}

/// A logged conflict as a few readable lines.
pub fn describe(c: &LoggedConflict) -> String {
    let text = |v: &Option<Value>| match v {
        Some(v) => v.to_string(),
        None => "(deleted)".into(),
    };
    let merged = if c.merged.is_empty() {
        String::new()
    } else {
        format!("; merged {}", c.merged.join(", "))
    };
    format!(
        "{} UTC  {} {}  decided by {}: kept the {} version{}\n    here:   {}  (region {}, written {})\n    remote: {}  (region {}, written {})\n    now:    {}\n",
        c.at,
        c.table,
        c.key,
        c.rule,
        c.kept,
        merged,
        text(&c.local),
        c.local_version.1,
        c.local_time,
        text(&c.remote),
        c.remote_version.1,
        c.remote_time,
        text(&c.result),
    )
}

/// Deletes conflict log entries older than `retention`; returns how many.
pub async fn prune_conflicts(
    client: &tokio_postgres::Client,
    retention: std::time::Duration,
) -> Result<u64, tokio_postgres::Error> {
    client
        .execute(
            "DELETE FROM meridian.conflict WHERE at < now() - make_interval(secs => $1)",
            &[&retention.as_secs_f64()],
        )
        .await
}
