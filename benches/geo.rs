//! Geo benchmark: a local N-region cluster (`meridian demo`, default 3
//! regions) under a mixed workload sent to every region's proxy at once, at
//! several one-way link latencies. For each latency it starts a fresh demo
//! cluster and measures:
//!
//! - client-visible latency per region (reads and writes, p50/p95/p99),
//! - throughput (committed transactions per second) per region,
//! - replication lag per link, from probe rows (see `watcher`),
//! - conflicts logged per second (`meridian.conflict` rows, every region),
//! - time until every region's tables are identical once the load stops, with
//!   and without a partition of one region first.
//!
//! It writes `target/geo-report/report.md`, `results.json` and SVG charts.
//!
//! cargo bench --bench geo                         # about 3 minutes on 2 cores
//!
//! Environment (defaults): GEO_LATENCIES=0,30,100 (one-way ms), GEO_JITTER_PCT=0,
//! GEO_REGIONS=3, GEO_WARMUP=3, GEO_SECONDS=30 (recorded steady load),
//! GEO_PARTITION_SECONDS=5, GEO_PARTITION_REGION=<last region>, GEO_CLIENTS=4
//! (per region), GEO_RATE=100 (tx/s offered per region, 0 = closed loop),
//! GEO_WRITE_RATIO=0.2, GEO_HOT_FRACTION=0.1 (of writes, on shared rows),
//! GEO_HOT_KEYS=8, GEO_KEYS=10000, GEO_PROBE_HZ=20 (lag probes per region),
//! GEO_PORT=16432 (+10 per latency), GEO_OUT=target/geo-report,
//! GEO_CONVERGE_TIMEOUT=60.
//!
//! The default rate is low on purpose: on the project's 2-core machine an idle
//! 3-region demo already keeps about 40% of the CPUs busy, and from about 200
//! tx/s per region on the machine saturates and lag grows to seconds.

#[path = "geo/svg.rs"]
mod svg;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_postgres::{Client, NoTls, Statement};
use tokio_util::sync::CancellationToken;

// ---------------------------------------------------------------------------
// Parameters
// ---------------------------------------------------------------------------

/// Every knob, from GEO_* environment variables.
#[derive(Clone, Debug)]
struct Params {
    regions: usize,
    latencies_ms: Vec<u64>,
    jitter_pct: f64,
    warmup: u64,
    seconds: u64,
    partition_seconds: u64,
    clients: usize,
    /// Transactions per second offered per region (all its clients together); 0 = as fast as possible.
    rate: f64,
    write_ratio: f64,
    hot_fraction: f64,
    hot_keys: i32,
    keys: i64,
    probe_hz: f64,
    port: u16,
    partition_region: Option<String>,
    out: PathBuf,
    converge_timeout: u64,
    /// GEO_* variables that were set, for the report's command line.
    set_vars: Vec<(String, String)>,
}

impl Params {
    fn from_env() -> Params {
        let mut set_vars = Vec::new();
        let mut get = |name: &str| -> Option<String> {
            let v = std::env::var(name).ok().filter(|v| !v.trim().is_empty())?;
            set_vars.push((name.to_string(), v.clone()));
            Some(v)
        };
        fn num<T: std::str::FromStr>(name: &str, v: Option<String>, default: T) -> T {
            match v {
                None => default,
                Some(v) => v
                    .trim()
                    .parse()
                    .unwrap_or_else(|_| panic!("{name}={v:?} is not a valid number")),
            }
        }
        let latencies_ms = match get("GEO_LATENCIES") {
            None => vec![0, 30, 100],
            Some(v) => {
                v.split(',')
                    .map(|x| {
                        x.trim().trim_end_matches("ms").parse().unwrap_or_else(|_| {
                            panic!("GEO_LATENCIES: {x:?} is not a number of ms")
                        })
                    })
                    .collect()
            }
        };
        let p = Params {
            regions: num("GEO_REGIONS", get("GEO_REGIONS"), 3),
            latencies_ms,
            jitter_pct: num("GEO_JITTER_PCT", get("GEO_JITTER_PCT"), 0.0),
            warmup: num("GEO_WARMUP", get("GEO_WARMUP"), 3),
            seconds: num("GEO_SECONDS", get("GEO_SECONDS"), 30),
            partition_seconds: num("GEO_PARTITION_SECONDS", get("GEO_PARTITION_SECONDS"), 5),
            clients: num("GEO_CLIENTS", get("GEO_CLIENTS"), 4),
            rate: num("GEO_RATE", get("GEO_RATE"), 100.0),
            write_ratio: num("GEO_WRITE_RATIO", get("GEO_WRITE_RATIO"), 0.2),
            hot_fraction: num("GEO_HOT_FRACTION", get("GEO_HOT_FRACTION"), 0.1),
            hot_keys: num("GEO_HOT_KEYS", get("GEO_HOT_KEYS"), 8),
            keys: num("GEO_KEYS", get("GEO_KEYS"), 10_000),
            probe_hz: num("GEO_PROBE_HZ", get("GEO_PROBE_HZ"), 20.0),
            port: num("GEO_PORT", get("GEO_PORT"), 16432),
            partition_region: get("GEO_PARTITION_REGION"),
            out: get("GEO_OUT")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("target/geo-report")),
            converge_timeout: num("GEO_CONVERGE_TIMEOUT", get("GEO_CONVERGE_TIMEOUT"), 60),
            set_vars: Vec::new(),
        };
        assert!((2..=8).contains(&p.regions), "GEO_REGIONS must be 2..8");
        assert!(p.clients >= 1, "GEO_CLIENTS must be at least 1");
        assert!(
            (0.0..=1.0).contains(&p.write_ratio),
            "GEO_WRITE_RATIO must be 0..1"
        );
        assert!(
            (0.0..=1.0).contains(&p.hot_fraction),
            "GEO_HOT_FRACTION must be 0..1"
        );
        assert!(
            p.hot_keys >= 1 && p.keys >= p.regions as i64,
            "GEO_HOT_KEYS/GEO_KEYS too small"
        );
        assert!(!p.latencies_ms.is_empty(), "GEO_LATENCIES is empty");
        Params { set_vars, ..p }
    }

    fn command(&self) -> String {
        let mut s = String::new();
        for (k, v) in &self.set_vars {
            s.push_str(&format!("{k}={v} "));
        }
        s.push_str("cargo bench --bench geo");
        s
    }

    fn jitter_us(&self, latency_ms: u64) -> u64 {
        (latency_ms as f64 * 1000.0 * self.jitter_pct / 100.0).round() as u64
    }
}

// ---------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------

/// Latency/lag distribution in milliseconds.
#[derive(Clone, Debug, Default)]
struct Dist {
    count: usize,
    p50: f64,
    p95: f64,
    p99: f64,
    max: f64,
    mean: f64,
}

impl Dist {
    fn of(mut v: Vec<f64>) -> Dist {
        if v.is_empty() {
            return Dist::default();
        }
        v.sort_by(f64::total_cmp);
        // Nearest-rank percentiles.
        let pct = |p: f64| v[((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
        Dist {
            count: v.len(),
            p50: pct(0.50),
            p95: pct(0.95),
            p99: pct(0.99),
            max: v[v.len() - 1],
            mean: v.iter().sum::<f64>() / v.len() as f64,
        }
    }
    fn json(&self) -> Value {
        json!({"count": self.count, "p50_ms": r3(self.p50), "p95_ms": r3(self.p95), "p99_ms": r3(self.p99),
               "max_ms": r3(self.max), "mean_ms": r3(self.mean)})
    }
    fn opt(&self, v: f64) -> Option<f64> {
        (self.count > 0).then_some(v)
    }
}

fn r3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

fn f1(v: f64) -> String {
    format!("{v:.1}")
}

fn f2(v: f64) -> String {
    format!("{v:.2}")
}

/// One HTTP/1.1 request to 127.0.0.1:port (no client crate needed); (status, body).
async fn http(method: &str, port: u16, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(
        format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
        .await
        .map_err(|_| std::io::Error::other("HTTP timeout"))??;
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

async fn connect(conninfo: &str) -> Result<Client, tokio_postgres::Error> {
    let (client, conn) = tokio_postgres::connect(conninfo, NoTls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

fn cmd_out(cmd: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(cmd).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// (busy, total, steal) jiffies of all CPUs, from /proc/stat; busy excludes
/// steal (time the hypervisor gave to other guests).
fn cpu_jiffies() -> (u64, u64, u64) {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let nums: Vec<u64> = text
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = nums.iter().take(8).sum();
    let idle = nums.get(3).copied().unwrap_or(0) + nums.get(4).copied().unwrap_or(0);
    let steal = nums.get(7).copied().unwrap_or(0);
    (total - idle - steal, total, steal)
}

/// (busy %, steal %) between two `cpu_jiffies` readings.
fn cpu_pct(a: (u64, u64, u64), b: (u64, u64, u64)) -> (f64, f64) {
    let total = (b.1 - a.1).max(1) as f64;
    (
        100.0 * (b.0 - a.0) as f64 / total,
        100.0 * (b.2 - a.2) as f64 / total,
    )
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

// ---------------------------------------------------------------------------
// The cluster: `meridian demo`
// ---------------------------------------------------------------------------

struct Region {
    name: String,
    /// tokio-postgres conninfo of the region's meridian proxy.
    proxy: String,
    proxy_url: String,
    /// conninfo of the region's PostgreSQL itself (Unix socket), bypassing the proxy.
    pg: String,
}

struct Demo {
    child: Child,
    regions: Vec<Region>,
    control_port: u16,
    _dir: tempfile::TempDir,
}

impl Demo {
    fn start(
        p: &Params,
        latency_ms: u64,
        port: u16,
        schema: &Path,
        rules: &Path,
        log: &Path,
    ) -> Demo {
        let dir = tempfile::Builder::new()
            .prefix("meridian-geo-")
            .tempdir()
            .expect("temporary directory");
        let data = dir.path().join("cluster");
        let log_file = std::fs::File::create(log).expect("demo log file");
        let mut child = Command::new(env!("CARGO_BIN_EXE_meridian"))
            .args([
                "demo",
                "--regions",
                &p.regions.to_string(),
                "--port",
                &port.to_string(),
            ])
            .args(["--latency", &format!("{latency_ms}ms")])
            .args(["--jitter", &format!("{}us", p.jitter_us(latency_ms))])
            .arg("--schema")
            .arg(schema)
            .arg("--rules")
            .arg(rules)
            .arg("--data")
            .arg(&data)
            .env("MERIDIAN_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log_file)
            .spawn()
            .expect("starting `meridian demo`");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut lines = Vec::new();
        loop {
            match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(l) if l == "ready" => break,
                Ok(l) => lines.push(l),
                Err(_) => {
                    if let Ok(Some(status)) = child.try_wait() {
                        panic!(
                            "`meridian demo` exited ({status}) before it was ready; its log ({}):\n{}",
                            log.display(),
                            std::fs::read_to_string(log).unwrap_or_default()
                        );
                    }
                    if Instant::now() > deadline {
                        let _ = child.kill();
                        panic!(
                            "`meridian demo` was not ready within 120 s; see {}",
                            log.display()
                        );
                    }
                }
            }
        }
        let mut regions = Vec::new();
        for l in lines.iter().filter(|l| l.starts_with("region=")) {
            let field = |k: &str| {
                l.split_whitespace()
                    .find_map(|f| f.strip_prefix(k))
                    .unwrap_or_else(|| panic!("no {k} in {l:?}"))
                    .to_string()
            };
            let name = field("region=");
            let url = field("url=");
            // postgres://user@127.0.0.1:PORT/db
            let (user, rest) = url
                .trim_start_matches("postgres://")
                .split_once('@')
                .expect("url user");
            let (hostport, db) = rest.split_once('/').expect("url db");
            let (host, pport) = hostport.rsplit_once(':').expect("url port");
            // The region's config, written by the demo, says where its Postgres is.
            let config: toml::Value = toml::from_str(
                &std::fs::read_to_string(data.join(format!("{name}.toml"))).expect("region config"),
            )
            .expect("region config toml");
            let backend = &config["backend"];
            regions.push(Region {
                proxy: format!("host={host} port={pport} user={user} dbname={db}"),
                proxy_url: url.clone(),
                pg: format!(
                    "host={} port={} user={} dbname={}",
                    backend["host"].as_str().unwrap(),
                    backend["port"].as_integer().unwrap(),
                    backend["user"].as_str().unwrap(),
                    backend["database"].as_str().unwrap()
                ),
                name,
            });
        }
        assert_eq!(regions.len(), p.regions, "demo printed {lines:?}");
        Demo {
            child,
            regions,
            control_port: port + 3000,
            _dir: dir,
        }
    }

    /// SIGTERM (the demo stops its servers and removes their files), then SIGKILL after 30 s.
    fn stop(mut self) {
        // SAFETY: kill(2) with a pid of our own child.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn schema_sql(p: &Params) -> String {
    format!(
        "-- Written by benches/geo.rs; applied to every region before the proxies open.
-- Regular rows: each region updates only its own keys (no conflicts), everybody reads all.
CREATE TABLE items (key bigint PRIMARY KEY, val bigint NOT NULL DEFAULT 0, by_region text);
INSERT INTO items (key) SELECT g FROM generate_series(1, {keys}) g;
-- Shared rows: every region increments the same few keys, so concurrent writes conflict.
-- hits is a counter column (see geo.toml), last_region is per-column last-writer-wins.
CREATE TABLE hot (key int PRIMARY KEY, hits bigint NOT NULL DEFAULT 0, last_region text);
INSERT INTO hot (key) SELECT g FROM generate_series(1, {hot}) g;
-- Lag probes: each region inserts rows stamped with its clock; watchers look for them elsewhere.
CREATE TABLE probe (origin text NOT NULL, seq bigint NOT NULL, phase text NOT NULL,
                    written_at timestamptz NOT NULL DEFAULT clock_timestamp(), PRIMARY KEY (origin, seq));
-- Tells listeners when a probe row commits here, also when meridian applies it (ALWAYS).
CREATE FUNCTION geo_probe_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('geo_probe', NEW.origin || ' ' || NEW.seq || ' ' || NEW.phase || ' ' ||
                      (extract(epoch FROM NEW.written_at) * 1000000)::bigint);
    RETURN NULL;
END $$;
CREATE TRIGGER geo_probe_notify AFTER INSERT ON probe FOR EACH ROW EXECUTE FUNCTION geo_probe_notify();
ALTER TABLE probe ENABLE ALWAYS TRIGGER geo_probe_notify;
",
        keys = p.keys,
        hot = p.hot_keys
    )
}

const RULES: &str = "# Written by benches/geo.rs. The shared rows are decided by the rule engine,
# which logs every conflict in meridian.conflict: concurrent increments add up
# (counter), and last_region keeps the value written last.
[[table]]
name = \"public.hot\"
[table.columns]
hits = \"counter\"
last_region = \"last-writer-wins\"
";

// ---------------------------------------------------------------------------
// Workload
// ---------------------------------------------------------------------------

#[derive(Default)]
struct Ops {
    lat_ms: Vec<f64>,
    errors: u64,
    first_error: Option<String>,
}

#[derive(Default)]
struct ClientOut {
    reads: Ops,
    writes: Ops,
    /// Committed increments of shared rows, including outside the recorded window (for the counter check).
    hot_ok: u64,
    /// Errors after which the connection was gone (a commit may or may not have happened).
    broken: u64,
}

struct Stmts {
    client: Client,
    read: Statement,
    own: Statement,
    hot: Statement,
}

async fn prepare(proxy: &str) -> Result<Stmts, tokio_postgres::Error> {
    let client = connect(proxy).await?;
    let read = client
        .prepare("SELECT key, val, by_region FROM items WHERE key = $1")
        .await?;
    let own = client
        .prepare("UPDATE items SET val = val + 1, by_region = $2 WHERE key = $1")
        .await?;
    let hot = client
        .prepare("UPDATE hot SET hits = hits + 1, last_region = $2 WHERE key = $1")
        .await?;
    Ok(Stmts {
        client,
        read,
        own,
        hot,
    })
}

/// Phase timing: operations that start in [record_from, end) are recorded; the client stops at `end`.
#[derive(Clone, Copy)]
struct Window {
    record_from: Instant,
    end: Instant,
}

#[allow(clippy::too_many_arguments)]
async fn client(
    p: Arc<Params>,
    region: usize,
    name: String,
    proxy: String,
    w: Window,
    seed: u64,
    done: Arc<AtomicU64>,
) -> ClientOut {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = ClientOut::default();
    let mut conn: Option<Stmts> = None;
    let mut pace = (p.rate > 0.0).then(|| {
        let mut i = tokio::time::interval(Duration::from_secs_f64(p.clients as f64 / p.rate));
        i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        i
    });
    let n = p.regions as i64;
    let own_keys = p.keys / n;
    loop {
        if let Some(i) = &mut pace {
            i.tick().await;
        }
        if Instant::now() >= w.end {
            break;
        }
        if conn.is_none() {
            match prepare(&proxy).await {
                Ok(c) => conn = Some(c),
                Err(e) => {
                    out.writes.errors += 1;
                    out.writes
                        .first_error
                        .get_or_insert(format!("connect: {e}"));
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            }
        }
        let c = conn.as_ref().unwrap();
        let write = rng.gen_bool(p.write_ratio);
        let hot = write && rng.gen_bool(p.hot_fraction);
        let t0 = Instant::now();
        let res = if !write {
            let key: i64 = rng.gen_range(1..=p.keys);
            c.client.query_opt(&c.read, &[&key]).await.map(|_| ())
        } else if hot {
            let key: i32 = rng.gen_range(1..=p.hot_keys);
            c.client.execute(&c.hot, &[&key, &name]).await.map(|_| ())
        } else {
            let key: i64 = rng.gen_range(0..own_keys) * n + region as i64 + 1;
            c.client.execute(&c.own, &[&key, &name]).await.map(|_| ())
        };
        let ms = t0.elapsed().as_secs_f64() * 1000.0;
        let ops = if write {
            &mut out.writes
        } else {
            &mut out.reads
        };
        match res {
            Ok(()) => {
                if hot {
                    out.hot_ok += 1;
                }
                if t0 >= w.record_from {
                    ops.lat_ms.push(ms);
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                if t0 >= w.record_from {
                    ops.errors += 1;
                    ops.first_error
                        .get_or_insert_with(|| match e.as_db_error() {
                            Some(db) => format!("{}: {}", db.code().code(), db.message()),
                            None => e.to_string(),
                        });
                }
                if c.client.is_closed() {
                    out.broken += 1;
                    conn = None;
                }
            }
        }
    }
    out
}

/// Inserts one probe row per tick through the region's proxy; returns (next seq, rows committed).
async fn prober(
    proxy: String,
    name: String,
    phase: &'static str,
    mut seq: i64,
    hz: f64,
    end: Instant,
) -> (i64, u64) {
    let mut ok = 0;
    if hz <= 0.0 {
        return (seq, ok);
    }
    let Ok(client) = connect(&proxy).await else {
        return (seq, ok);
    };
    let Ok(insert) = client
        .prepare("INSERT INTO probe (origin, seq, phase) VALUES ($1, $2, $3)")
        .await
    else {
        return (seq, ok);
    };
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / hz));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if Instant::now() >= end {
            break;
        }
        if client
            .execute(&insert, &[&name, &seq, &phase])
            .await
            .is_ok()
        {
            ok += 1;
        }
        seq += 1;
    }
    (seq, ok)
}

/// One lag sample: a probe of `origin` seen in the watcher's region.
struct Sample {
    origin: usize,
    phase: String,
    lag_ms: f64,
}

struct WatchOut {
    /// Probes of other regions, first notification each.
    samples: Vec<Sample>,
    /// The watcher's own region's probes: commit → notification here, the
    /// method's own delay (its floor), measured the same way.
    local_ms: Vec<f64>,
    /// Notifications for a probe already seen (should stay 0).
    duplicates: u64,
}

/// Listens on the region's own PostgreSQL (not through the proxy) for the
/// `geo_probe` notifications that the ALWAYS trigger on `probe` sends when an
/// insert commits there: the origin's own insert, or the apply of a replicated
/// one. Lag = this machine's wall clock when the notification arrives - the
/// probe's written_at (the origin's clock_timestamp() in its insert). Every
/// region shares this machine's clock (both are CLOCK_REALTIME), so the
/// difference needs no correction.
async fn watcher(pg: String, me: usize, names: Vec<String>, stop: CancellationToken) -> WatchOut {
    use futures_util::StreamExt;
    let (client, mut conn) = tokio_postgres::connect(&pg, NoTls)
        .await
        .expect("watcher connects to PostgreSQL");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(std::time::SystemTime, String)>();
    // The connection task stamps each notification the moment it is read.
    let driver = tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(m) = messages.next().await {
            match m {
                Ok(tokio_postgres::AsyncMessage::Notification(n)) => {
                    let _ = tx.send((std::time::SystemTime::now(), n.payload().to_string()));
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
    });
    client
        .batch_execute("LISTEN geo_probe")
        .await
        .expect("LISTEN geo_probe");
    let mut out = WatchOut {
        samples: Vec::new(),
        local_ms: Vec::new(),
        duplicates: 0,
    };
    let mut seen = std::collections::HashSet::new();
    loop {
        let (at, payload) = tokio::select! {
            m = rx.recv() => match m { Some(m) => m, None => break },
            _ = stop.cancelled() => break,
        };
        // payload: origin seq phase written_at_epoch_us
        let f: Vec<&str> = payload.split(' ').collect();
        let (Some(origin), Some(seq), Some(phase), Some(written)) = (
            f.first().and_then(|o| names.iter().position(|n| n == o)),
            f.get(1).and_then(|s| s.parse::<i64>().ok()),
            f.get(2),
            f.get(3).and_then(|s| s.parse::<i64>().ok()),
        ) else {
            continue;
        };
        let now_us = at
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_micros() as i64;
        let lag_ms = (now_us - written) as f64 / 1000.0;
        if !seen.insert((origin, seq)) {
            out.duplicates += 1;
        } else if origin == me {
            if *phase == "steady" {
                out.local_ms.push(lag_ms);
            }
        } else {
            out.samples.push(Sample {
                origin,
                phase: phase.to_string(),
                lag_ms,
            });
        }
    }
    drop(client);
    driver.abort();
    out
}

const HASH_SQL: &str =
    "SELECT md5(coalesce((SELECT string_agg(t::text, ',' ORDER BY key) FROM items t), '') || '|' ||
                coalesce((SELECT string_agg(h::text, ',' ORDER BY key) FROM hot h), '') || '|' ||
                coalesce((SELECT string_agg(p::text, ',' ORDER BY origin, seq) FROM probe p), ''))";

/// How long until every region's tables hash the same.
#[derive(Clone, Debug)]
struct Converge {
    /// All regions were identical in the poll round that ended this long after `since`.
    at_ms: f64,
    /// The last round that still differed ended this long after `since` (0 if none).
    not_yet_ms: f64,
    rounds: u64,
}

async fn converge(
    pgs: &[Client],
    since: Instant,
    timeout: Duration,
    label: &str,
) -> Option<Converge> {
    let mut rounds = 0;
    let mut not_yet_ms = 0.0;
    let mut next_progress = Instant::now() + Duration::from_secs(2);
    loop {
        let hashes =
            futures_util::future::join_all(pgs.iter().map(|c| c.query_one(HASH_SQL, &[]))).await;
        let end_ms = since.elapsed().as_secs_f64() * 1000.0;
        rounds += 1;
        let hashes: Vec<String> = hashes
            .into_iter()
            .map(|r| {
                r.map(|row| row.get::<_, String>(0))
                    .unwrap_or_else(|e| format!("error {e}"))
            })
            .collect();
        if hashes.windows(2).all(|w| w[0] == w[1]) && !hashes[0].starts_with("error") {
            return Some(Converge {
                at_ms: end_ms,
                not_yet_ms,
                rounds,
            });
        }
        not_yet_ms = end_ms;
        if since.elapsed() > timeout {
            eprintln!(
                "  {label}: regions still differ after {} s; giving up",
                timeout.as_secs()
            );
            return None;
        }
        if Instant::now() > next_progress {
            eprintln!(
                "  {label}: not identical yet, {:.1} s since the load stopped",
                end_ms / 1000.0
            );
            next_progress += Duration::from_secs(2);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Ms after `since` until every link to and from `region` has accepted a new
/// connection (the links' `connections` counters, from the demo's `/links`,
/// above the values in `at_heal`, the heal's answer): the shippers' reconnects.
async fn reconnected(
    control: u16,
    region: String,
    at_heal: String,
    since: Instant,
    timeout: Duration,
) -> Option<f64> {
    let counts = |body: &str| -> Vec<(String, u64)> {
        serde_json::from_str::<Value>(body)
            .ok()
            .and_then(|v| v.as_array().cloned())
            .unwrap_or_default()
            .iter()
            .filter(|l| l["from"] == region.as_str() || l["to"] == region.as_str())
            .map(|l| {
                (
                    format!("{}>{}", l["from"], l["to"]),
                    l["connections"].as_u64().unwrap_or(0),
                )
            })
            .collect()
    };
    let base = counts(&at_heal);
    if base.is_empty() {
        return None;
    }
    while since.elapsed() < timeout {
        if let Ok((200, body)) = http("GET", control, "/links").await {
            let now = counts(&body);
            if base
                .iter()
                .all(|(k, c)| now.iter().any(|(k2, c2)| k == k2 && c2 > c))
            {
                return Some(since.elapsed().as_secs_f64() * 1000.0);
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

/// Counters of each region's `/status` `replication` object (Null if unreachable).
async fn repl_snapshot(control_port: u16, regions: usize) -> Vec<Value> {
    let mut v = Vec::new();
    for i in 0..regions {
        let admin = control_port - 3000 + 1000 + i as u16;
        v.push(
            http("GET", admin, "/status")
                .await
                .ok()
                .and_then(|(_, b)| serde_json::from_str::<Value>(&b).ok())
                .map(|s| s["replication"].clone())
                .unwrap_or(Value::Null),
        );
    }
    v
}

/// Replication counters that changed in one phase, per region.
#[derive(Clone, Debug, Default)]
struct ReplDelta {
    batches: u64,
    changes: u64,
    held_for_causality: u64,
    /// Other origins' changes this region relayed to its peers.
    relayed: u64,
    retried: u64,
    changes_held: u64,
}

fn repl_delta(a: &[Value], b: &[Value]) -> Vec<ReplDelta> {
    a.iter()
        .zip(b)
        .map(|(a, b)| {
            let d = |k: &str| {
                b[k].as_u64()
                    .unwrap_or(0)
                    .saturating_sub(a[k].as_u64().unwrap_or(0))
            };
            ReplDelta {
                batches: d("batches_applied"),
                changes: d("changes_applied"),
                held_for_causality: d("batches_held_for_causality"),
                relayed: d("changes_relayed"),
                retried: d("batches_retried"),
                changes_held: d("changes_held"),
            }
        })
        .collect()
}

impl ReplDelta {
    fn json(&self) -> Value {
        json!({"batches_applied": self.batches, "changes_applied": self.changes,
               "batches_held_for_causality": self.held_for_causality,
               "changes_relayed": self.relayed,
               "batches_retried": self.retried, "changes_held": self.changes_held})
    }
}

async fn count_conflicts(pgs: &[Client]) -> Vec<i64> {
    let mut v = Vec::new();
    for c in pgs {
        v.push(
            c.query_one("SELECT count(*) FROM meridian.conflict", &[])
                .await
                .map(|r| r.get(0))
                .unwrap_or(-1),
        );
    }
    v
}

/// Prints committed transactions/s per region on stderr every 2 s until `end`.
async fn progress(label: String, names: Vec<String>, done: Vec<Arc<AtomicU64>>, end: Instant) {
    let mut last: Vec<u64> = done.iter().map(|d| d.load(Ordering::Relaxed)).collect();
    let mut t = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let now = Instant::now();
        if now >= end {
            break;
        }
        let dt = (now - t).as_secs_f64();
        let rates: Vec<String> = done
            .iter()
            .zip(&mut last)
            .zip(&names)
            .map(|((d, l), n)| {
                let v = d.load(Ordering::Relaxed);
                let r = (v - *l) as f64 / dt;
                *l = v;
                format!("{n} {r:.0}")
            })
            .collect();
        t = now;
        eprintln!(
            "  {label}: {:>3} s left | committed tx/s: {}",
            (end - now).as_secs(),
            rates.join(", ")
        );
    }
}

/// Runs clients and probers in every region for one phase; returns per-region client results.
async fn load(
    p: &Arc<Params>,
    demo: &Demo,
    phase: &'static str,
    label: &str,
    w: Window,
    seqs: &mut [i64],
    probes: &mut [Vec<(String, u64)>],
) -> Vec<ClientOut> {
    let done: Vec<Arc<AtomicU64>> = demo
        .regions
        .iter()
        .map(|_| Arc::new(AtomicU64::new(0)))
        .collect();
    let mut handles = Vec::new();
    for (r, region) in demo.regions.iter().enumerate() {
        for c in 0..p.clients {
            handles.push((
                r,
                tokio::spawn(client(
                    p.clone(),
                    r,
                    region.name.clone(),
                    region.proxy.clone(),
                    w,
                    ((r * 1000 + c) as u64) ^ rand::random::<u64>(),
                    done[r].clone(),
                )),
            ));
        }
    }
    let probers: Vec<_> = demo
        .regions
        .iter()
        .enumerate()
        .map(|(r, region)| {
            tokio::spawn(prober(
                region.proxy.clone(),
                region.name.clone(),
                phase,
                seqs[r],
                p.probe_hz,
                w.end,
            ))
        })
        .collect();
    let names: Vec<String> = demo.regions.iter().map(|r| r.name.clone()).collect();
    let prog = tokio::spawn(progress(label.to_string(), names, done, w.end));
    let mut outs: Vec<ClientOut> = demo.regions.iter().map(|_| ClientOut::default()).collect();
    for (r, h) in handles {
        let o = h.await.expect("client task");
        let t = &mut outs[r];
        t.reads.lat_ms.extend(o.reads.lat_ms);
        t.writes.lat_ms.extend(o.writes.lat_ms);
        t.reads.errors += o.reads.errors;
        t.writes.errors += o.writes.errors;
        if t.reads.first_error.is_none() {
            t.reads.first_error = o.reads.first_error;
        }
        if t.writes.first_error.is_none() {
            t.writes.first_error = o.writes.first_error;
        }
        t.hot_ok += o.hot_ok;
        t.broken += o.broken;
    }
    for (r, h) in probers.into_iter().enumerate() {
        let (next, ok) = h.await.expect("prober task");
        seqs[r] = next;
        probes[r].push((phase.to_string(), ok));
    }
    prog.abort();
    outs
}

// ---------------------------------------------------------------------------
// One latency setting
// ---------------------------------------------------------------------------

struct RegionResult {
    name: String,
    proxy_url: String,
    reads: Dist,
    writes: Dist,
    read_errors: u64,
    write_errors: u64,
    first_error: Option<String>,
    tps: f64,
    reads_per_s: f64,
    writes_per_s: f64,
    conflicts_steady: i64,
    conflicts_partition: i64,
    partition_tps: f64,
    partition_errors: u64,
    hits_sum: i64,
    broken: u64,
}

struct LinkResult {
    from: String,
    to: String,
    lag: Dist,
    delivered: usize,
    written: u64,
}

struct RunResult {
    latency_ms: u64,
    jitter_ms: f64,
    steady_s: f64,
    partition_s: f64,
    regions: Vec<RegionResult>,
    links: Vec<LinkResult>,
    cpu_busy_pct: f64,
    load_before: String,
    load_after: String,
    converge_quiet: Option<Converge>,
    converge_heal: Option<Converge>,
    /// Ms after the heal until every link of the partitioned region had reconnected.
    reconnect_ms: Option<f64>,
    partition_region: String,
    hot_committed: u64,
    /// Commit → notification in the same region: the lag method's own delay.
    local_delay: Dist,
    duplicate_notifications: u64,
    idle_cpu_pct: f64,
    idle_steal_pct: f64,
    /// Replication counters of the steady phase, and of the partition phase (partition until identical).
    repl_steady: Vec<ReplDelta>,
    repl_partition: Vec<ReplDelta>,
    /// CPU time taken by the hypervisor for other guests during the steady phase.
    steal_pct: f64,
    /// CPU busy before the cluster started: other work on the machine.
    background_cpu_pct: f64,
    probes_delivered_all: bool,
    status: Vec<Value>,
    wall_s: f64,
}

impl RunResult {
    fn total_tps(&self) -> f64 {
        self.regions.iter().map(|r| r.tps).sum()
    }
    fn conflicts_per_s(&self) -> f64 {
        self.regions.iter().map(|r| r.conflicts_steady).sum::<i64>() as f64 / self.steady_s
    }
    fn counter_ok(&self) -> bool {
        self.regions
            .iter()
            .all(|r| r.hits_sum == self.hot_committed as i64)
    }
}

async fn run_latency(p: &Arc<Params>, latency_ms: u64, index: usize, work: &Path) -> RunResult {
    let wall = Instant::now();
    let jitter_ms = p.jitter_us(latency_ms) as f64 / 1000.0;
    eprintln!(
        "\n== link latency {latency_ms} ms (jitter ±{jitter_ms} ms): starting a {}-region cluster (meridian demo)",
        p.regions
    );
    // Other work on the machine skews every number: measure it before the cluster starts.
    let b0 = cpu_jiffies();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let b1 = cpu_jiffies();
    let background_cpu_pct = cpu_pct(b0, b1).0;
    if background_cpu_pct > 10.0 {
        eprintln!(
            "warning: the machine is already {background_cpu_pct:.0}% busy before the cluster starts; \
             other work will skew the results"
        );
    }
    let log = work.join(format!("demo-{latency_ms}ms.log"));
    let demo = Demo::start(
        p,
        latency_ms,
        p.port + 10 * index as u16,
        &work.join("schema.sql"),
        &work.join("rules"),
        &log,
    );
    let names: Vec<String> = demo.regions.iter().map(|r| r.name.clone()).collect();
    let part_idx = match &p.partition_region {
        Some(n) => names
            .iter()
            .position(|x| x == n)
            .unwrap_or_else(|| panic!("GEO_PARTITION_REGION={n} is not one of {names:?}")),
        None => names.len() - 1,
    };
    let mut pgs = Vec::new();
    for r in &demo.regions {
        pgs.push(
            connect(&r.pg)
                .await
                .expect("direct connection to a region's PostgreSQL"),
        );
    }
    let stop_watch = CancellationToken::new();
    let watchers: Vec<_> = demo
        .regions
        .iter()
        .enumerate()
        .map(|(i, r)| tokio::spawn(watcher(r.pg.clone(), i, names.clone(), stop_watch.clone())))
        .collect();
    let mut seqs = vec![0i64; names.len()];
    let mut probes: Vec<Vec<(String, u64)>> = vec![Vec::new(); names.len()];
    let lat_label = format!("[{latency_ms} ms]");

    // The cluster's own CPU use with no clients (shippers poll, pruning, ...).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let i0 = cpu_jiffies();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let i1 = cpu_jiffies();
    let (idle_cpu_pct, idle_steal_pct) = cpu_pct(i0, i1);
    eprintln!("{lat_label} CPU busy with the cluster idle (no clients): {idle_cpu_pct:.0}%");

    // Phase 1: warm-up, then the measured steady phase (one run of the clients).
    let load_before = loadavg();
    eprintln!(
        "{lat_label} warm-up {} s, then steady load {} s: {} clients per region, {}",
        p.warmup,
        p.seconds,
        p.clients,
        if p.rate > 0.0 {
            format!("{} tx/s offered per region", p.rate)
        } else {
            "as fast as they can".into()
        }
    );
    let start = Instant::now();
    let w = Window {
        record_from: start + Duration::from_secs(p.warmup),
        end: start + Duration::from_secs(p.warmup + p.seconds),
    };
    let n_regions = names.len();
    let control_port = demo.control_port;
    let marks = {
        let pgs_ref = &pgs;
        async move {
            tokio::time::sleep_until(w.record_from.into()).await;
            let c0 = count_conflicts(pgs_ref).await;
            let r0 = repl_snapshot(control_port, n_regions).await;
            let j0 = cpu_jiffies();
            tokio::time::sleep_until(w.end.into()).await;
            let j1 = cpu_jiffies();
            let c1 = count_conflicts(pgs_ref).await;
            let r1 = repl_snapshot(control_port, n_regions).await;
            (c0, c1, j0, j1, repl_delta(&r0, &r1))
        }
    };
    let steady_label = format!("{lat_label} warm-up+steady");
    let (outs, (c0, c1, j0, j1, repl_steady)) = tokio::join!(
        load(p, &demo, "steady", &steady_label, w, &mut seqs, &mut probes),
        marks
    );
    let steady_s = (w.end - w.record_from).as_secs_f64();
    let (cpu_busy_pct, steal_pct) = cpu_pct(j0, j1);
    // Phase 2: the load has stopped: how long until every region is identical?
    let quiet_since = Instant::now();
    eprintln!("{lat_label} load stopped; waiting until all regions' tables are identical");
    let converge_quiet = converge(
        &pgs,
        quiet_since,
        Duration::from_secs(p.converge_timeout),
        &format!("{lat_label} converge"),
    )
    .await;
    if let Some(c) = &converge_quiet {
        eprintln!("{lat_label} identical after {:.0} ms", c.at_ms);
    }
    // Phase 3: partition one region under load, heal, converge.
    let part = &names[part_idx];
    eprintln!(
        "{lat_label} partition: {part} cut off from every other region for {} s under the same load",
        p.partition_seconds
    );
    let cp0 = count_conflicts(&pgs).await;
    let rp0 = repl_snapshot(control_port, n_regions).await;
    let (st, body) = http(
        "POST",
        demo.control_port,
        &format!("/partition?region={part}"),
    )
    .await
    .expect("link control");
    assert_eq!(st, 200, "partition failed: {body}");
    let pstart = Instant::now();
    let pw = Window {
        record_from: pstart,
        end: pstart + Duration::from_secs(p.partition_seconds),
    };
    let pouts = load(
        p,
        &demo,
        "partition",
        &format!("{lat_label} partition"),
        pw,
        &mut seqs,
        &mut probes,
    )
    .await;
    let partition_s = pstart.elapsed().as_secs_f64();
    let (st, body) = http("POST", demo.control_port, &format!("/heal?region={part}"))
        .await
        .expect("link control");
    assert_eq!(st, 200, "heal failed: {body}");
    let healed = Instant::now();
    eprintln!(
        "{lat_label} healed {part} (load stopped); waiting until all regions' tables are identical"
    );
    let reconnect = tokio::spawn(reconnected(
        demo.control_port,
        part.clone(),
        body,
        healed,
        Duration::from_secs(p.converge_timeout),
    ));
    let converge_heal = converge(
        &pgs,
        healed,
        Duration::from_secs(p.converge_timeout),
        &format!("{lat_label} converge after heal"),
    )
    .await;
    let reconnect_ms = reconnect.await.ok().flatten();
    if let Some(c) = &converge_heal {
        eprintln!("{lat_label} identical {:.0} ms after the heal", c.at_ms);
    }
    // Let watchers see the last probes, then stop them.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let cp1 = count_conflicts(&pgs).await;
    let repl_partition = repl_delta(&rp0, &repl_snapshot(control_port, n_regions).await);
    stop_watch.cancel();
    let mut samples: Vec<Vec<Sample>> = Vec::new();
    let mut local = Vec::new();
    let mut duplicates = 0;
    for w in watchers {
        let o = w.await.expect("watcher task");
        samples.push(o.samples);
        local.extend(o.local_ms);
        duplicates += o.duplicates;
    }
    let hot_committed: u64 = outs.iter().chain(&pouts).map(|o| o.hot_ok).sum();
    let mut hits = Vec::new();
    for c in &pgs {
        hits.push(
            c.query_one("SELECT coalesce(sum(hits), 0)::bigint FROM hot", &[])
                .await
                .map(|r| r.get::<_, i64>(0))
                .unwrap_or(-1),
        );
    }
    let mut status = Vec::new();
    for (i, r) in names.iter().enumerate() {
        let admin = demo.control_port - 3000 + 1000 + i as u16;
        let s = http("GET", admin, "/status")
            .await
            .ok()
            .and_then(|(_, b)| serde_json::from_str::<Value>(&b).ok())
            .unwrap_or(Value::Null);
        status.push(json!({"region": r, "status": s}));
    }
    let regions: Vec<RegionResult> = names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let o = &outs[i];
            let po = &pouts[i];
            let committed = (o.reads.lat_ms.len() + o.writes.lat_ms.len()) as f64;
            RegionResult {
                name: n.clone(),
                proxy_url: demo.regions[i].proxy_url.clone(),
                reads: Dist::of(o.reads.lat_ms.clone()),
                writes: Dist::of(o.writes.lat_ms.clone()),
                read_errors: o.reads.errors,
                write_errors: o.writes.errors,
                first_error: o.reads.first_error.clone().or(o.writes.first_error.clone()),
                tps: committed / steady_s,
                reads_per_s: o.reads.lat_ms.len() as f64 / steady_s,
                writes_per_s: o.writes.lat_ms.len() as f64 / steady_s,
                conflicts_steady: c1[i] - c0[i],
                conflicts_partition: cp1[i] - cp0[i],
                partition_tps: (po.reads.lat_ms.len() + po.writes.lat_ms.len()) as f64
                    / partition_s,
                partition_errors: po.reads.errors + po.writes.errors,
                hits_sum: hits[i],
                broken: o.broken + po.broken,
            }
        })
        .collect();
    let mut links = Vec::new();
    let mut all_delivered = true;
    for (from_i, from) in names.iter().enumerate() {
        for (to_i, to) in names.iter().enumerate() {
            if from_i == to_i {
                continue;
            }
            let lags: Vec<f64> = samples[to_i]
                .iter()
                .filter(|s| s.origin == from_i && s.phase == "steady")
                .map(|s| s.lag_ms)
                .collect();
            let delivered = samples[to_i].iter().filter(|s| s.origin == from_i).count();
            let written: u64 = probes[from_i].iter().map(|(_, n)| n).sum();
            all_delivered &= delivered as u64 == written;
            links.push(LinkResult {
                from: from.clone(),
                to: to.clone(),
                lag: Dist::of(lags),
                delivered,
                written,
            });
        }
    }
    drop(pgs);
    eprintln!("{lat_label} stopping the cluster");
    tokio::task::spawn_blocking(move || demo.stop())
        .await
        .unwrap();
    RunResult {
        latency_ms,
        jitter_ms,
        steady_s,
        partition_s,
        regions,
        links,
        cpu_busy_pct,
        load_before,
        load_after: loadavg(),
        converge_quiet,
        converge_heal,
        reconnect_ms,
        partition_region: part.clone(),
        hot_committed,
        local_delay: Dist::of(local),
        duplicate_notifications: duplicates,
        idle_cpu_pct,
        idle_steal_pct,
        steal_pct,
        repl_steady,
        repl_partition,
        background_cpu_pct,
        probes_delivered_all: all_delivered,
        status,
        wall_s: wall.elapsed().as_secs_f64(),
    }
}

// ---------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------

struct Machine {
    date: String,
    nproc: String,
    cpu: String,
    mem: String,
    kernel: String,
    postgres: String,
    commit: String,
    dirty: String,
}

fn machine() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_else(|| "unknown".into());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map(|kb| format!("{:.1} GiB", kb / 1024.0 / 1024.0))
        .unwrap_or_else(|| "unknown".into());
    let postgres = meridian::cluster::postgres::bindir()
        .ok()
        .and_then(|b| cmd_out(b.join("postgres").to_str()?, &["--version"]))
        .unwrap_or_else(|| "unknown".into());
    let dirty = cmd_out(
        "git",
        &[
            "--no-optional-locks",
            "status",
            "--porcelain",
            "--untracked-files=no",
        ],
    )
    .map(|s| {
        let n = s.lines().count();
        if n == 0 {
            "clean".to_string()
        } else {
            format!("uncommitted changes in {n} tracked file(s)")
        }
    })
    .unwrap_or_else(|| "unknown".into());
    Machine {
        date: cmd_out("date", &["-u", "+%Y-%m-%d %H:%M UTC"]).unwrap_or_default(),
        nproc: cmd_out("nproc", &[]).unwrap_or_else(|| "unknown".into()),
        cpu,
        mem,
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_string(),
        postgres,
        commit: cmd_out("git", &["rev-parse", "--short", "HEAD"])
            .unwrap_or_else(|| "unknown".into()),
        dirty,
    }
}

fn conv_ms(c: &Option<Converge>) -> String {
    match c {
        Some(c) => format!("{:.0} ms", c.at_ms),
        None => "did not converge".into(),
    }
}

fn write_charts(runs: &[RunResult], out: &Path, p: &Params) -> Vec<(String, String)> {
    let lat_names: Vec<String> = runs
        .iter()
        .map(|r| format!("{} ms link", r.latency_ms))
        .collect();
    let names: Vec<String> = runs[0].regions.iter().map(|r| r.name.clone()).collect();
    let mut charts = Vec::new();

    // Client latency: groups = region × (reads, writes), bars = link latency.
    let mut groups = Vec::new();
    let mut values = Vec::new();
    let mut ticks = Vec::new();
    for (i, n) in names.iter().enumerate() {
        for kind in ["reads", "writes"] {
            groups.push(format!("{n} {kind}"));
            let d = |r: &RunResult| {
                if kind == "reads" {
                    r.regions[i].reads.clone()
                } else {
                    r.regions[i].writes.clone()
                }
            };
            values.push(runs.iter().map(|r| d(r).opt(d(r).p99)).collect());
            ticks.push(runs.iter().map(|r| d(r).opt(d(r).p50)).collect());
        }
    }
    let c = svg::BarChart {
        title: "Client-visible latency per region vs. one-way link latency".into(),
        subtitle: "bar = p99, black tick = p50, of single-statement transactions through the region's own proxy"
            .into(),
        y_label: "client latency (ms)".into(),
        x_label: "region and operation (bars: one-way latency between regions)".into(),
        groups,
        series: lat_names.clone(),
        values,
        ticks: Some(("p50".into(), ticks)),
        ref_lines: None,
        decimals: 1,
    };
    charts.push(("latency_by_region.svg".to_string(), c.render()));

    // Replication lag: groups = link latency, bars = links.
    let link_names: Vec<String> = runs[0]
        .links
        .iter()
        .map(|l| format!("{} → {}", l.from, l.to))
        .collect();
    let c = svg::BarChart {
        title: "Replication lag per link (origin → destination)".into(),
        subtitle: "bar = p99, black tick = p50; probe rows written in the steady phase, seen via LISTEN/NOTIFY"
            .into(),
        y_label: "lag: commit in origin → visible in destination (ms)".into(),
        x_label: "one-way link latency between regions".into(),
        groups: runs
            .iter()
            .map(|r| format!("{} ms", r.latency_ms))
            .collect(),
        series: link_names,
        values: runs
            .iter()
            .map(|r| r.links.iter().map(|l| l.lag.opt(l.lag.p99)).collect())
            .collect(),
        ticks: Some((
            "p50".into(),
            runs.iter()
                .map(|r| r.links.iter().map(|l| l.lag.opt(l.lag.p50)).collect())
                .collect(),
        )),
        ref_lines: Some((
            "one-way link latency (the floor)".into(),
            runs.iter().map(|r| Some(r.latency_ms as f64)).collect(),
        )),
        decimals: 0,
    };
    charts.push(("lag_by_link.svg".to_string(), c.render()));

    // Convergence.
    let part = &runs[0].partition_region;
    let c = svg::BarChart {
        title: "Time until every region's tables are identical".into(),
        subtitle: "measured from the moment the load stops (md5 of every table, polled in each region's Postgres)"
            .into(),
        y_label: "time to identical tables (ms)".into(),
        x_label: "one-way link latency between regions".into(),
        groups: runs.iter().map(|r| format!("{} ms", r.latency_ms)).collect(),
        series: vec![
            "no partition: load stops".into(),
            format!("{part} partitioned {} s under load, then healed", p.partition_seconds),
        ],
        values: runs
            .iter()
            .map(|r| {
                vec![
                    r.converge_quiet.as_ref().map(|c| c.at_ms),
                    r.converge_heal.as_ref().map(|c| c.at_ms),
                ]
            })
            .collect(),
        ticks: None,
        ref_lines: None,
        decimals: 0,
    };
    charts.push(("converge.svg".to_string(), c.render()));

    // Throughput and conflicts.
    let mut series = names.clone();
    series.push("total".into());
    let c = svg::BarChart {
        title: "Throughput: committed transactions per second".into(),
        subtitle: if p.rate > 0.0 {
            format!(
                "steady phase; each region is offered {} tx/s ({} clients), so this is the offered load unless the machine falls behind",
                p.rate, p.clients
            )
        } else {
            format!("steady phase; {} closed-loop clients per region", p.clients)
        },
        y_label: "committed transactions / s".into(),
        x_label: "one-way link latency between regions".into(),
        groups: runs
            .iter()
            .map(|r| format!("{} ms", r.latency_ms))
            .collect(),
        series,
        values: runs
            .iter()
            .map(|r| {
                let mut v: Vec<Option<f64>> = r.regions.iter().map(|x| Some(x.tps)).collect();
                v.push(Some(r.total_tps()));
                v
            })
            .collect(),
        ticks: None,
        ref_lines: None,
        decimals: 0,
    };
    charts.push(("throughput.svg".to_string(), c.render()));

    let c = svg::BarChart {
        title: "Conflicts logged per second (meridian.conflict)".into(),
        subtitle: "steady phase; rows added to meridian.conflict in each region, divided by the phase's length".into(),
        y_label: "conflicts / s".into(),
        x_label: "one-way link latency between regions".into(),
        groups: runs.iter().map(|r| format!("{} ms", r.latency_ms)).collect(),
        series: {
            let mut s: Vec<String> = names.iter().map(|n| format!("logged in {n}")).collect();
            s.push("all regions".into());
            s
        },
        values: runs
            .iter()
            .map(|r| {
                let mut v: Vec<Option<f64>> = r
                    .regions
                    .iter()
                    .map(|x| Some(x.conflicts_steady as f64 / r.steady_s))
                    .collect();
                v.push(Some(r.conflicts_per_s()));
                v
            })
            .collect(),
        ticks: None,
        ref_lines: None,
        decimals: 1,
    };
    charts.push(("conflicts.svg".to_string(), c.render()));
    for (name, text) in &charts {
        std::fs::write(out.join(name), text).expect("writing a chart");
    }
    charts
}

/// Plain statements computed from the numbers (no judgement beyond simple thresholds).
fn observations(p: &Params, runs: &[RunResult]) -> Vec<String> {
    let mut o = Vec::new();
    let worst = |r: &RunResult, w: bool| {
        r.regions
            .iter()
            .map(|x| if w { x.writes.p99 } else { x.reads.p99 })
            .fold(0.0, f64::max)
    };
    if let (Some(lo), Some(hi)) = (
        runs.iter().min_by_key(|r| r.latency_ms),
        runs.iter().max_by_key(|r| r.latency_ms),
    ) {
        if hi.latency_ms > lo.latency_ms {
            let dl = (hi.latency_ms - lo.latency_ms) as f64;
            let (dr, dw) = (
                worst(hi, false) - worst(lo, false),
                worst(hi, true) - worst(lo, true),
            );
            o.push(format!(
                "**Client latency vs. link latency**: from {} ms to {} ms links (+{dl:.0} ms one way), the worst \
                 region's p99 changed by {dr:+.1} ms for reads and {dw:+.1} ms for writes. {}",
                lo.latency_ms,
                hi.latency_ms,
                if dr.max(dw) < dl / 2.0 {
                    "Client latency does not follow the link latency: statements are answered by the local region."
                } else {
                    "**Client latency grew with the link latency**: something waits on other regions (or the \
                     machine was busier); see the per-region tables."
                }
            ));
        }
    }
    for r in runs {
        let mut over: Vec<f64> = r
            .links
            .iter()
            .filter(|l| l.lag.count > 0)
            .map(|l| l.lag.p50 - r.latency_ms as f64)
            .collect();
        over.sort_by(f64::total_cmp);
        let bad: Vec<&LinkResult> = r
            .links
            .iter()
            .filter(|l| l.lag.p99 > r.latency_ms as f64 + 1000.0)
            .collect();
        let mut line = format!(
            "**Lag at {} ms**: median over links of p50 lag minus the link latency = {:.1} ms",
            r.latency_ms,
            over.get(over.len() / 2).copied().unwrap_or(f64::NAN)
        );
        if bad.is_empty() {
            line.push_str(&format!(
                "; every link's p99 is within {:.0} ms of the link latency.",
                r.links
                    .iter()
                    .map(|l| l.lag.p99 - r.latency_ms as f64)
                    .fold(0.0, f64::max)
            ));
        } else {
            let dests: std::collections::BTreeSet<usize> = bad
                .iter()
                .filter_map(|l| r.regions.iter().position(|x| x.name == l.to))
                .collect();
            let held: u64 = dests
                .iter()
                .map(|&d| r.repl_steady[d].held_for_causality)
                .sum();
            let cpu = r.cpu_busy_pct + r.steal_pct;
            line.push_str(&format!(
                ". **Anomaly**: {} have p99 lag more than 1 s above the link latency (max {:.0} ms). During \
                 the steady phase, in {}, the causal gate held {held} batches \
                 (see Replication counters). {}",
                bad.iter()
                    .map(|l| format!("{} → {}", l.from, l.to))
                    .collect::<Vec<_>>()
                    .join(", "),
                bad.iter().map(|l| l.lag.max).fold(0.0, f64::max),
                dests
                    .iter()
                    .map(|&d| r.regions[d].name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                if cpu < 85.0 {
                    format!(
                        "The CPUs were not saturated ({:.0}% busy + {:.0}% steal), so this is waiting rather than \
                         lack of CPU.",
                        r.cpu_busy_pct, r.steal_pct
                    )
                } else {
                    format!(
                        "The CPUs were saturated ({:.0}% busy + {:.0}% steal by other virtual machines), which \
                         can explain it as well.",
                        r.cpu_busy_pct, r.steal_pct
                    )
                }
            ));
        }
        o.push(line);
    }
    let offered = p.rate * p.regions as f64;
    if p.rate > 0.0 {
        let short: Vec<String> = runs
            .iter()
            .filter(|r| r.total_tps() < 0.95 * offered)
            .map(|r| format!("{:.0} tx/s at {} ms", r.total_tps(), r.latency_ms))
            .collect();
        if short.is_empty() {
            o.push(format!(
                "**Throughput**: every run committed the offered {offered:.0} tx/s (within 5%); it measures the \
                 offered load, not the maximum (set GEO_RATE=0 for as fast as possible)."
            ));
        } else {
            o.push(format!(
                "**Throughput**: below the offered {offered:.0} tx/s in: {} (the clients could not keep up).",
                short.join(", ")
            ));
        }
    }
    o
}

fn report(p: &Params, m: &Machine, runs: &[RunResult], total_s: f64) -> String {
    let mut s = String::new();
    let names: Vec<String> = runs[0].regions.iter().map(|r| r.name.clone()).collect();
    let part = &runs[0].partition_region;
    let push = |s: &mut String, l: &str| {
        s.push_str(l);
        s.push('\n');
    };
    push(&mut s, "# meridian geo benchmark\n");
    push(
        &mut s,
        &format!(
            "A {n}-region meridian cluster on one machine (`meridian demo`: one PostgreSQL 15 and one \
             meridian proxy per region, an emulated WAN link on every path between two regions), \
             with clients sending a mixed read/write workload to **every region's own proxy at the same time**. \
             The run is repeated for each one-way link latency between regions ({lats}), each time on a \
             fresh cluster. Generated {date} by `benches/geo.rs`; the whole run took {total:.0} s.\n",
            n = p.regions,
            lats = runs
                .iter()
                .map(|r| format!("{} ms", r.latency_ms))
                .collect::<Vec<_>>()
                .join(", "),
            date = m.date,
            total = total_s
        ),
    );
    // Summary.
    push(&mut s, "## Summary\n");
    let busy: Vec<String> = runs
        .iter()
        .filter(|r| r.background_cpu_pct > 10.0)
        .map(|r| {
            format!(
                "{:.0}% before the {} ms run",
                r.background_cpu_pct, r.latency_ms
            )
        })
        .collect();
    let steal: Vec<String> = runs
        .iter()
        .filter(|r| r.steal_pct > 5.0)
        .map(|r| format!("{:.0}% at {} ms", r.steal_pct, r.latency_ms))
        .collect();
    if !steal.is_empty() {
        push(
            &mut s,
            &format!(
                "> **Note: this virtual machine lost CPU time to other virtual machines** during the steady phase \
                 (steal: {}). Expect these numbers to vary from run to run.\n",
                steal.join(", ")
            ),
        );
    }
    if !busy.is_empty() {
        push(
            &mut s,
            &format!(
                "> **Warning: the machine was busy with other work during this run** (CPU busy before the cluster \
                 started: {}). Every number below is skewed by it; run again on a quiet machine.\n",
                busy.join(", ")
            ),
        );
    }
    push(
        &mut s,
        "| one-way link latency | client p99 reads (worst region) | client p99 writes (worst region) | replication lag p50 / p99 (worst link) | committed tx/s (all regions) | conflicts/s | identical after load stops | identical after heal |",
    );
    push(&mut s, "|---|---|---|---|---|---|---|---|");
    for r in runs {
        let wr = r.regions.iter().map(|x| x.reads.p99).fold(0.0, f64::max);
        let ww = r.regions.iter().map(|x| x.writes.p99).fold(0.0, f64::max);
        let lp50 = r.links.iter().map(|l| l.lag.p50).fold(0.0, f64::max);
        let lp99 = r.links.iter().map(|l| l.lag.p99).fold(0.0, f64::max);
        push(
            &mut s,
            &format!(
                "| {} ms | {} ms | {} ms | {} / {} ms | {:.0} | {:.1} | {} | {} |",
                r.latency_ms,
                f2(wr),
                f2(ww),
                f1(lp50),
                f1(lp99),
                r.total_tps(),
                r.conflicts_per_s(),
                conv_ms(&r.converge_quiet),
                conv_ms(&r.converge_heal)
            ),
        );
    }
    push(&mut s, "");
    push(
        &mut s,
        "How to read it: *client latency* is what an application connected to its own region waits for one \
         statement; it should not grow with the link latency, because meridian commits locally and replicates \
         afterwards. *Replication lag* is how long after a commit in one region the row can be read in another; \
         it cannot be lower than the one-way link latency. *Identical after ...* is the time from the moment \
         writing stops until all regions hold exactly the same rows (after a partition it includes reconnecting \
         and shipping what piled up).\n",
    );
    push(&mut s, "Observations (computed from the numbers below):\n");
    for line in observations(p, runs) {
        push(&mut s, &format!("- {line}"));
    }
    push(&mut s, "");
    push(&mut s, "Checks:\n");
    for r in runs {
        let errors: u64 = r
            .regions
            .iter()
            .map(|x| x.read_errors + x.write_errors + x.partition_errors)
            .sum();
        push(
            &mut s,
            &format!(
                "- {} ms: counter check {} (every region's `sum(hits)` = {} committed increments of shared rows: {}); \
                 lag probes {}; client errors: {}{}.",
                r.latency_ms,
                if r.counter_ok() { "**ok**" } else { "**FAILED**" },
                r.hot_committed,
                r.regions
                    .iter()
                    .map(|x| format!("{} {}", x.name, x.hits_sum))
                    .collect::<Vec<_>>()
                    .join(", "),
                if r.probes_delivered_all {
                    "all delivered to every other region".to_string()
                } else {
                    "**some not seen by the watchers** (see the lag table)".to_string()
                },
                errors,
                r.regions
                    .iter()
                    .find_map(|x| x.first_error.clone())
                    .map(|e| format!(" (first: `{e}`)"))
                    .unwrap_or_default()
            ),
        );
    }
    push(&mut s, "");
    push(
        &mut s,
        "![client latency per region](latency_by_region.svg)\n",
    );
    push(&mut s, "![replication lag per link](lag_by_link.svg)\n");
    push(&mut s, "![time to identical tables](converge.svg)\n");
    push(&mut s, "![throughput](throughput.svg)\n");
    push(&mut s, "![conflicts per second](conflicts.svg)\n");

    // What was run.
    push(&mut s, "## What was run\n");
    push(&mut s, &format!("```sh\n{}\n```\n", p.command()));
    push(
        &mut s,
        &format!(
            "For each link latency the benchmark starts `meridian demo --regions {n} --latency <L>ms --jitter <J> \
             --schema schema.sql --rules rules/ --data <tmp>` (the real binary, regions {names}), waits for `ready`, \
             and then runs three phases:\n\n\
             1. **Warm-up and steady load** ({warm} s warm-up, not recorded, then {sec} s recorded): {clients} client \
             connections per region (tokio-postgres, prepared statements), each connected to its own region's proxy. \
             {rate} Each transaction is one statement in autocommit: with probability {rr:.2} a read \
             (`SELECT ... FROM items WHERE key = $1`, any of {keys} keys), otherwise a write. Of the writes, {hf:.0}% \
             increment one of {hot} **shared rows** (`UPDATE hot SET hits = hits + 1, last_region = $2 WHERE key = $1`, \
             the same keys in every region, so writes from different regions conflict) and the rest update a row only \
             this region writes (`UPDATE items SET val = val + 1 ... WHERE key = $1`, keys partitioned by region: \
             no conflicts). Each region also inserts {hz} probe rows/s through its proxy to measure lag.\n\
             2. **Load stops**; the benchmark polls until all regions' tables are identical.\n\
             3. **Partition**: {part} is cut off from every other region through the demo's link control \
             (`POST /partition?region={part}`) while the same load runs for {ps} s in every region (including {part}), \
             then the load stops, the link is healed (`POST /heal?region={part}`) and the benchmark polls until all \
             regions' tables are identical again.\n",
            n = p.regions,
            names = names.join(", "),
            warm = p.warmup,
            sec = p.seconds,
            clients = p.clients,
            rate = if p.rate > 0.0 {
                format!(
                    "Together they offer {} transactions/s per region (each client paced at {:.0}/s; a client that falls behind just runs back to back).",
                    p.rate,
                    p.rate / p.clients as f64
                )
            } else {
                "Each runs transactions back to back (closed loop, no pacing).".into()
            },
            rr = 1.0 - p.write_ratio,
            keys = p.keys,
            hf = p.hot_fraction * 100.0,
            hot = p.hot_keys,
            hz = p.probe_hz,
            ps = p.partition_seconds,
        ),
    );
    push(
        &mut s,
        &format!(
            "Link jitter: ±{}% of the latency ({}). The schema and rule files the run used are in `work/` next to \
             this report (`schema.sql`, `rules/geo.toml`), with each cluster's log (`demo-<L>ms.log`).\n",
            p.jitter_pct,
            runs.iter()
                .map(|r| format!("±{} ms at {} ms", r.jitter_ms, r.latency_ms))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    );
    push(
        &mut s,
        "Parameters (environment variables; the values this run used):\n",
    );
    push(&mut s, "| variable | value | meaning |\n|---|---|---|");
    let params: Vec<(&str, String, &str)> = vec![
        (
            "GEO_LATENCIES",
            p.latencies_ms
                .iter()
                .map(|x| x.to_string())
                .collect::<Vec<_>>()
                .join(","),
            "one-way link latencies to run, ms",
        ),
        (
            "GEO_JITTER_PCT",
            p.jitter_pct.to_string(),
            "link jitter, % of the latency (uniform ±)",
        ),
        (
            "GEO_REGIONS",
            p.regions.to_string(),
            "regions in the cluster",
        ),
        (
            "GEO_WARMUP",
            p.warmup.to_string(),
            "seconds of load before recording",
        ),
        (
            "GEO_SECONDS",
            p.seconds.to_string(),
            "seconds of recorded steady load",
        ),
        (
            "GEO_PARTITION_SECONDS",
            p.partition_seconds.to_string(),
            "seconds one region stays partitioned under load",
        ),
        (
            "GEO_PARTITION_REGION",
            part.clone(),
            "the region partitioned (default: the last)",
        ),
        (
            "GEO_CLIENTS",
            p.clients.to_string(),
            "client connections per region",
        ),
        (
            "GEO_RATE",
            p.rate.to_string(),
            "transactions/s offered per region (0 = closed loop, as fast as possible)",
        ),
        (
            "GEO_WRITE_RATIO",
            p.write_ratio.to_string(),
            "fraction of transactions that write",
        ),
        (
            "GEO_HOT_FRACTION",
            p.hot_fraction.to_string(),
            "fraction of writes that hit the shared rows",
        ),
        (
            "GEO_HOT_KEYS",
            p.hot_keys.to_string(),
            "number of shared rows",
        ),
        ("GEO_KEYS", p.keys.to_string(), "rows in `items`"),
        (
            "GEO_PROBE_HZ",
            p.probe_hz.to_string(),
            "lag probe rows inserted per second per region",
        ),
        (
            "GEO_PORT",
            p.port.to_string(),
            "first client port of the first cluster (+10 per latency)",
        ),
        ("GEO_OUT", p.out.display().to_string(), "report directory"),
    ];
    for (k, v, d) in params {
        push(&mut s, &format!("| `{k}` | {v} | {d} |"));
    }
    push(&mut s, "");
    push(&mut s, "Machine:\n");
    push(
        &mut s,
        &format!(
            "| | |\n|---|---|\n| date | {} |\n| `nproc` | {} |\n| CPU | {} |\n| memory | {} |\n| kernel | {} |\n| PostgreSQL | {} (durable: fsync and synchronous_commit on, as `meridian demo` runs it) |\n| meridian | commit {} ({}), release build |\n| load average (1/5/15 min) before each latency | {} |\n",
            m.date,
            m.nproc,
            m.cpu,
            m.mem,
            m.kernel,
            m.postgres,
            m.commit,
            m.dirty,
            runs.iter()
                .map(|r| format!("{} ms: {}", r.latency_ms, r.load_before))
                .collect::<Vec<_>>()
                .join("; ")
        ),
    );
    push(
        &mut s,
        &format!(
            "Everything ({n} PostgreSQL servers, the demo process with {n} proxies and {links} links, and this \
             benchmark's clients and watchers) shares these {np} CPUs. CPU busy (all CPUs, from /proc/stat) with \
             the cluster idle, no clients, measured for 3 s after it started: {idle}; during the steady phase: \
             {busy}. Before each cluster started (2 s, other work on the machine): {bg}. CPU *steal* (time the \
             hypervisor gave to other virtual machines, not counted as busy above), idle cluster / steady phase: \
             {steal}.\n",
            n = p.regions,
            links = p.regions * (p.regions - 1),
            np = m.nproc,
            idle = runs
                .iter()
                .map(|r| format!("{:.0}% at {} ms", r.idle_cpu_pct, r.latency_ms))
                .collect::<Vec<_>>()
                .join(", "),
            busy = runs
                .iter()
                .map(|r| format!("{:.0}% at {} ms", r.cpu_busy_pct, r.latency_ms))
                .collect::<Vec<_>>()
                .join(", "),
            bg = runs
                .iter()
                .map(|r| format!("{:.0}% at {} ms", r.background_cpu_pct, r.latency_ms))
                .collect::<Vec<_>>()
                .join(", "),
            steal = runs
                .iter()
                .map(|r| format!("{:.0}% / {:.0}% at {} ms", r.idle_steal_pct, r.steal_pct, r.latency_ms))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    );

    // How each number is measured.
    push(&mut s, "## How each number is measured\n");
    push(
        &mut s,
        "- **Client latency** (reads, writes; p50/p95/p99/max): wall time in the client, from sending the \
         statement to its result, for every statement that started in the steady phase. A write includes the \
         durable commit in the region's own PostgreSQL (fsync) and meridian's stamping; it does not wait for any \
         other region. Percentiles are nearest-rank over all samples of the region.",
    );
    push(
        &mut s,
        "- **Throughput**: statements (= transactions) that committed during the steady phase, divided by its \
         length; per region and summed. Failed statements are counted separately as errors.",
    );
    push(
        &mut s,
        &format!(
            "- **Replication lag per link** (origin → destination): each region inserts {hz} rows/s into `probe` \
             through its proxy, with `written_at = clock_timestamp()` taken by the origin's PostgreSQL during the \
             insert (just before its commit). An `AFTER INSERT` trigger on `probe`, enabled `ALWAYS` so that it also \
             fires when meridian applies a replicated row, sends `NOTIFY geo_probe` with the probe's origin, number \
             and `written_at`; PostgreSQL delivers it when the inserting transaction commits, i.e. when the row \
             becomes visible in that region. In every region a watcher connected directly to its PostgreSQL (not \
             through the proxy) `LISTEN`s and records, for each probe of another region, this machine's wall clock \
             when the notification arrives minus `written_at`. All regions run on this machine and share its clock \
             (both sides read `CLOCK_REALTIME`), so the difference needs no correction. **Resolution**: the method \
             adds the origin's commit (an fsync) and the delivery of the notification; the watcher measures that \
             floor too, on its own region's probes (commit → notification in the same region): p50 {lp50} ms, p99 \
             {lp99} ms at worst over the runs; differences smaller than that are noise. Only probes written \
             during the steady phase count.",
            hz = p.probe_hz,
            lp50 = f1(runs.iter().map(|r| r.local_delay.p50).fold(0.0, f64::max)),
            lp99 = f1(runs.iter().map(|r| r.local_delay.p99).fold(0.0, f64::max)),
        ),
    );
    push(
        &mut s,
        "- **Conflicts per second**: rows added to `meridian.conflict` in each region during the steady phase \
         (`SELECT count(*)` directly in each region's PostgreSQL at its start and end), divided by its length. \
         Only the rule engine logs conflicts, which is why the shared table `hot` has a rule (`hits` a counter, \
         `last_region` per-column last-writer-wins); each region logs the conflicts it detects when applying \
         other regions' changes, so one pair of concurrent writes is usually logged in both regions.",
    );
    push(
        &mut s,
        "- **Time to identical tables**: after the load stops (and, in the partition phase, right after the heal), \
         the benchmark computes `md5` of every table (`items`, `hot`, `probe`; rows as text, ordered by key) in \
         every region's PostgreSQL at once, every 20 ms, and reports when all regions first return the same hash \
         (the end of that polling round; the round before still differed, so the resolution is one round, \
         roughly 20-60 ms).",
    );
    push(
        &mut s,
        "- **Counter check**: after convergence, `sum(hits)` over the shared rows must equal, in every region, the \
         number of increments the clients saw commit (all phases): no increment lost or counted twice.\n",
    );

    // Detailed tables.
    push(
        &mut s,
        "## Client latency and throughput per region (steady phase)\n",
    );
    for r in runs {
        push(
            &mut s,
            &format!(
                "### {} ms link latency (jitter ±{} ms)\n\n| region | reads/s | writes/s | tx/s | reads p50 / p95 / p99 / max (ms) | writes p50 / p95 / p99 / max (ms) | errors |\n|---|---|---|---|---|---|---|",
                r.latency_ms, r.jitter_ms
            ),
        );
        for x in &r.regions {
            push(
                &mut s,
                &format!(
                    "| {} | {:.0} | {:.0} | {:.0} | {} / {} / {} / {} | {} / {} / {} / {} | {} |",
                    x.name,
                    x.reads_per_s,
                    x.writes_per_s,
                    x.tps,
                    f2(x.reads.p50),
                    f2(x.reads.p95),
                    f2(x.reads.p99),
                    f1(x.reads.max),
                    f2(x.writes.p50),
                    f2(x.writes.p95),
                    f2(x.writes.p99),
                    f1(x.writes.max),
                    x.read_errors + x.write_errors
                ),
            );
        }
        push(
            &mut s,
            &format!(
                "| **total** | {:.0} | {:.0} | **{:.0}** | | | |\n",
                r.regions.iter().map(|x| x.reads_per_s).sum::<f64>(),
                r.regions.iter().map(|x| x.writes_per_s).sum::<f64>(),
                r.total_tps()
            ),
        );
    }
    push(&mut s, "## Replication lag per link (steady phase)\n");
    push(
        &mut s,
        "Lag from a commit in the origin until the row is visible in the destination (see above for \
         the method; its own floor, commit → notification in the same region, is in the last line of each \
         table).\n",
    );
    for r in runs {
        push(
            &mut s,
            &format!(
                "### {} ms link latency\n\n| link | probes | p50 (ms) | p95 (ms) | p99 (ms) | max (ms) | p50 minus link latency (ms) |\n|---|---|---|---|---|---|---|",
                r.latency_ms
            ),
        );
        for l in &r.links {
            push(
                &mut s,
                &format!(
                    "| {} → {} | {} | {} | {} | {} | {} | {} |",
                    l.from,
                    l.to,
                    l.lag.count,
                    f1(l.lag.p50),
                    f1(l.lag.p95),
                    f1(l.lag.p99),
                    f1(l.lag.max),
                    f1(l.lag.p50 - r.latency_ms as f64)
                ),
            );
        }
        let d = &r.local_delay;
        push(
            &mut s,
            &format!(
                "| *method floor: commit → notification in the same region* | {} | {} | {} | {} | {} | |",
                d.count,
                f1(d.p50),
                f1(d.p95),
                f1(d.p99),
                f1(d.max)
            ),
        );
        push(&mut s, "");
    }
    push(&mut s, "## Conflicts\n");
    push(
        &mut s,
        &format!(
            "Rows added to `meridian.conflict` per region. Steady phase: {} s. Partition phase: from the partition \
             until the regions were identical again (conflicts between {part}'s writes and the others' are found \
             only after the heal).\n",
            runs[0].steady_s
        ),
    );
    push(
        &mut s,
        &format!(
            "| link latency | {} | total/s (steady) | {} |\n|---|{}---|{}",
            names
                .iter()
                .map(|n| format!("{n} steady"))
                .collect::<Vec<_>>()
                .join(" | "),
            names
                .iter()
                .map(|n| format!("{n} partition"))
                .collect::<Vec<_>>()
                .join(" | "),
            "---|".repeat(names.len()),
            "---|".repeat(names.len())
        ),
    );
    for r in runs {
        push(
            &mut s,
            &format!(
                "| {} ms | {} | {:.1} | {} |",
                r.latency_ms,
                r.regions
                    .iter()
                    .map(|x| x.conflicts_steady.to_string())
                    .collect::<Vec<_>>()
                    .join(" | "),
                r.conflicts_per_s(),
                r.regions
                    .iter()
                    .map(|x| x.conflicts_partition.to_string())
                    .collect::<Vec<_>>()
                    .join(" | ")
            ),
        );
    }
    push(&mut s, "");
    push(&mut s, "## Partition and convergence\n");
    push(
        &mut s,
        &format!(
            "{part} was partitioned from every other region for {} s while every region (including {part}) kept \
             serving the load; committed tx/s per region during the partition shows that each side stays writable. \
             Then the load stopped and the link was healed. *Links reconnected* is when every link to and from \
             {part} had carried a new connection (the demo's `/links` counters): a shipper that lost its peer \
             retries with a doubling back-off (100 ms up to 500 ms), so after a partition of a few seconds the first \
             retry after the heal can come up to 500 ms later. *Identical after heal* includes that, plus shipping and \
             applying what piled up on both sides.\n",
            p.partition_seconds
        ),
    );
    push(
        &mut s,
        &format!(
            "| link latency | {} | errors during partition | identical after load stops (no partition) | links reconnected after heal | identical after heal |\n|---|{}---|---|---|---|",
            names.iter().map(|n| format!("{n} tx/s during partition")).collect::<Vec<_>>().join(" | "),
            "---|".repeat(names.len())
        ),
    );
    for r in runs {
        let cv = |c: &Option<Converge>| match c {
            Some(c) => format!("{:.0} ms (not yet at {:.0} ms)", c.at_ms, c.not_yet_ms),
            None => format!("**not within {} s**", p.converge_timeout),
        };
        push(
            &mut s,
            &format!(
                "| {} ms | {} | {} | {} | {} | {} |",
                r.latency_ms,
                r.regions
                    .iter()
                    .map(|x| format!("{:.0}", x.partition_tps))
                    .collect::<Vec<_>>()
                    .join(" | "),
                r.regions.iter().map(|x| x.partition_errors).sum::<u64>(),
                cv(&r.converge_quiet),
                r.reconnect_ms
                    .map(|m| format!("{m:.0} ms"))
                    .unwrap_or_else(|| "not seen".into()),
                cv(&r.converge_heal)
            ),
        );
    }
    push(&mut s, "");
    push(&mut s, "## Replication counters\n");
    push(
        &mut s,
        "From each region's `/status` (`replication`), read at the start and end of the steady phase, and \
         before the partition and after the regions were identical again. *Held for causality*: batches that \
         waited for the causal gate (a change from A waits until this region has applied what A had applied of \
         every third region when it recorded the change; there is no time bound); *relayed*: other origins' \
         changes the region shipped on to a peer whose own link to their origin was down.\n",
    );
    push(
        &mut s,
        "| link latency | region | steady: batches applied | steady: changes per batch | steady: held for causality | steady: changes relayed | partition phase: held for causality | partition phase: changes relayed | retried (deadlock), both phases | changes held, both phases |\n|---|---|---|---|---|---|---|---|---|---|",
    );
    for r in runs {
        for (i, x) in r.regions.iter().enumerate() {
            let (st, pa) = (&r.repl_steady[i], &r.repl_partition[i]);
            push(
                &mut s,
                &format!(
                    "| {} ms | {} | {} | {:.1} | {} | {} | {} | {} | {} | {} |",
                    r.latency_ms,
                    x.name,
                    st.batches,
                    st.changes as f64 / st.batches.max(1) as f64,
                    st.held_for_causality,
                    st.relayed,
                    pa.held_for_causality,
                    pa.relayed,
                    st.retried + pa.retried,
                    st.changes_held + pa.changes_held,
                ),
            );
        }
    }
    push(&mut s, "");
    push(&mut s, "## Files\n");
    push(
        &mut s,
        "- `results.json`: every number above, plus each region's `/status` at the end of each latency's run.\n\
         - `latency_by_region.svg`, `lag_by_link.svg`, `converge.svg`, `throughput.svg`, `conflicts.svg`: the charts.\n\
         - `work/`: the schema, the rule file and each cluster's log (warnings and errors of `meridian demo`).\n",
    );
    s
}

fn results_json(p: &Params, m: &Machine, runs: &[RunResult], total_s: f64) -> Value {
    json!({
        "benchmark": "geo",
        "command": p.command(),
        "date": m.date,
        "total_seconds": r3(total_s),
        "machine": {"nproc": m.nproc, "cpu": m.cpu, "memory": m.mem, "kernel": m.kernel,
                    "postgres": m.postgres, "commit": m.commit, "worktree": m.dirty},
        "params": {"regions": p.regions, "latencies_ms": p.latencies_ms, "jitter_pct": p.jitter_pct,
                   "warmup_s": p.warmup, "steady_s": p.seconds, "partition_s": p.partition_seconds,
                   "clients_per_region": p.clients, "rate_per_region": p.rate, "write_ratio": p.write_ratio,
                   "hot_fraction": p.hot_fraction, "hot_keys": p.hot_keys, "keys": p.keys,
                   "probe_hz": p.probe_hz},
        "runs": runs.iter().map(|r| json!({
            "latency_ms": r.latency_ms,
            "jitter_ms": r.jitter_ms,
            "steady_seconds": r3(r.steady_s),
            "partition_seconds": r3(r.partition_s),
            "wall_seconds": r3(r.wall_s),
            "cpu_busy_pct_steady": r3(r.cpu_busy_pct),
            "loadavg_before": r.load_before,
            "loadavg_after": r.load_after,
            "total_tps": r3(r.total_tps()),
            "conflicts_per_s": r3(r.conflicts_per_s()),
            "regions": r.regions.iter().map(|x| json!({
                "name": x.name, "url": x.proxy_url,
                "reads": x.reads.json(), "writes": x.writes.json(),
                "read_errors": x.read_errors, "write_errors": x.write_errors, "first_error": x.first_error,
                "connections_lost": x.broken,
                "tps": r3(x.tps), "reads_per_s": r3(x.reads_per_s), "writes_per_s": r3(x.writes_per_s),
                "conflicts_steady": x.conflicts_steady, "conflicts_partition": x.conflicts_partition,
                "partition_tps": r3(x.partition_tps), "partition_errors": x.partition_errors,
                "hot_hits_sum": x.hits_sum,
            })).collect::<Vec<_>>(),
            "links": r.links.iter().map(|l| json!({
                "from": l.from, "to": l.to, "lag_steady": l.lag.json(),
                "probes_seen_all_phases": l.delivered, "probes_written_all_phases": l.written,
            })).collect::<Vec<_>>(),
            "lag_method_local_delay": r.local_delay.json(),
            "duplicate_notifications": r.duplicate_notifications,
            "cpu_busy_pct_idle_cluster": r3(r.idle_cpu_pct),
            "cpu_steal_pct_idle_cluster": r3(r.idle_steal_pct),
            "cpu_steal_pct_steady": r3(r.steal_pct),
            "cpu_busy_pct_before_cluster": r3(r.background_cpu_pct),
            "converge_after_load_stops_ms": r.converge_quiet.as_ref().map(|c| json!({"at_ms": r3(c.at_ms), "not_yet_ms": r3(c.not_yet_ms), "rounds": c.rounds})),
            "links_reconnected_after_heal_ms": r.reconnect_ms.map(r3),
            "converge_after_heal_ms": r.converge_heal.as_ref().map(|c| json!({"at_ms": r3(c.at_ms), "not_yet_ms": r3(c.not_yet_ms), "rounds": c.rounds})),
            "partition_region": r.partition_region,
            "hot_increments_committed": r.hot_committed,
            "counter_check_ok": r.counter_ok(),
            "replication_steady": r.repl_steady.iter().map(|d| d.json()).collect::<Vec<_>>(),
            "replication_partition_phase": r.repl_partition.iter().map(|d| d.json()).collect::<Vec<_>>(),
            "status_at_end": r.status,
        })).collect::<Vec<_>>(),
    })
}

// ---------------------------------------------------------------------------

fn main() {
    let p = Arc::new(Params::from_env());
    let total = Instant::now();
    let out = p.out.clone();
    let work = out.join("work");
    std::fs::create_dir_all(work.join("rules")).expect("report directory");
    std::fs::write(work.join("schema.sql"), schema_sql(&p)).unwrap();
    std::fs::write(work.join("rules").join("geo.toml"), RULES).unwrap();
    let work = work.canonicalize().unwrap();
    let per_latency = p.warmup + p.seconds + p.partition_seconds + 16;
    eprintln!(
        "geo benchmark: {} regions, link latencies {:?} ms, about {} s per latency (about {} s in all); report in {}",
        p.regions,
        p.latencies_ms,
        per_latency,
        per_latency * p.latencies_ms.len() as u64,
        out.display()
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut runs = Vec::new();
    for (i, &lat) in p.latencies_ms.iter().enumerate() {
        let r = rt.block_on(run_latency(&p, lat, i, &work));
        eprintln!(
            "[{lat} ms] done in {:.0} s: {:.0} tx/s, worst client p99 read {:.2} ms / write {:.2} ms, worst link lag p99 {:.1} ms",
            r.wall_s,
            r.total_tps(),
            r.regions.iter().map(|x| x.reads.p99).fold(0.0, f64::max),
            r.regions.iter().map(|x| x.writes.p99).fold(0.0, f64::max),
            r.links.iter().map(|l| l.lag.p99).fold(0.0, f64::max)
        );
        runs.push(r);
    }
    let total_s = total.elapsed().as_secs_f64();
    let m = machine();
    write_charts(&runs, &out, &p);
    let md = report(&p, &m, &runs, total_s);
    std::fs::write(out.join("report.md"), &md).unwrap();
    std::fs::write(
        out.join("results.json"),
        serde_json::to_string_pretty(&results_json(&p, &m, &runs, total_s)).unwrap(),
    )
    .unwrap();
    // The summary on stdout too.
    let summary: String = md
        .split("## Summary")
        .nth(1)
        .and_then(|s| s.split("![").next())
        .unwrap_or("")
        .to_string();
    println!("## Geo benchmark summary{summary}");
    println!("Report: {}", out.join("report.md").display());
}
