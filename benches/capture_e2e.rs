//! Write-path benchmark: pgbench's TPC-B-like script (`-M prepared -c 8 -j 2`)
//! against one PostgreSQL, in one run, alternating targets each round:
//!
//! 1. direct, no capture (the baseline every ratio is taken against);
//! 2. through meridian, no capture: the relay alone;
//! 3. direct, with capture: meridian's capture task reading the WAL of the
//!    captured database while pgbench writes to Postgres directly;
//! 4. through meridian, with capture: what an application sees;
//! 5. and 6. through PgBouncer in session mode (what a user would put in
//!    meridian's place as a relay), without and with meridian's capture.
//!
//! Two databases of the same scale: `plain` without meridian's schema,
//! `captured` after `meridian migrate` (pgbench_history is insert-only by
//! rule, having no primary key). Every target gets a 5 s warm-up; before each
//! run capture is waited for (a sync point), the change log is truncated
//! (standing in for shipping, which prunes it) and a CHECKPOINT is taken.
//! After each run: how long capture took to record what was committed, and
//! the WAL written per transaction (capture's own writes included).
//! Not a test: it asserts nothing about speed.
//!
//! cargo bench --bench capture_e2e            (defaults: -T 20, 3 rounds, scale 10, durable)
//! CAPTURE_BENCH_SECONDS=5 CAPTURE_BENCH_ROUNDS=1 cargo bench --bench capture_e2e

mod common;

use std::time::{Duration, Instant};

use common::{env_or, migrate, paired_ratios, pgbench, psql, start_pgbouncer, start_proxy, Result};
use meridian::cluster::postgres::{PgOptions, PgServer};

/// A name, a URL, and whether its database is captured.
type Target<'a> = (&'a str, String, bool);

/// Waits until capture has recorded everything committed in `captured`.
fn wait_for_capture(pg: &PgServer) -> Duration {
    let start = Instant::now();
    let lsn = psql(pg, "captured", meridian::capture::wal::Barrier::EMIT);
    let passed = format!("SELECT lsn >= '{lsn}'::pg_lsn FROM meridian.capture_progress");
    while psql(pg, "captured", &passed) != "t" {
        assert!(
            start.elapsed() < Duration::from_secs(600),
            "capture stalled"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    start.elapsed()
}

fn main() {
    let seconds = env_or("CAPTURE_BENCH_SECONDS", 20).to_string();
    let rounds = env_or("CAPTURE_BENCH_ROUNDS", 3);
    let scale = env_or("CAPTURE_BENCH_SCALE", 10).to_string();
    let dir = tempfile::Builder::new()
        .prefix("meridian-bench-")
        .tempdir()
        .unwrap();
    // Durable (fsync, synchronous commit) as in production and `meridian demo`;
    // CAPTURE_BENCH_DURABLE=0 measures with commits made cheap instead.
    let durable = env_or("CAPTURE_BENCH_DURABLE", 1) == 1;
    let pg = PgServer::start(
        &dir.path().join("pg"),
        &PgOptions {
            durable,
            ..PgOptions::default()
        },
    )
    .expect("PostgreSQL");
    println!("durable: {durable}, scale {scale}, {seconds} s per run, {rounds} round(s)\n");
    let work = dir.path().join("work");
    std::fs::create_dir_all(work.join("rules")).unwrap();
    std::fs::write(
        work.join("rules/pgbench.toml"),
        "[[table]]\nname = \"public.pgbench_history\"\ninsert_only = true\n",
    )
    .unwrap();
    for db in ["plain", "captured"] {
        psql(&pg, "postgres", &format!("CREATE DATABASE {db}"));
        pgbench(&pg.url(db), &["-i", "-q", "-s", &scale]);
    }
    let backend = format!(
        "[backend]\nhost = \"{}\"\nport = {}\nuser = \"{}\"\ndatabase = \"captured\"\n[replication]\nrules = \"{}\"",
        pg.socket_dir().display(),
        pg.port,
        pg.superuser(),
        work.join("rules").display()
    );
    let (_proxy, port) = start_proxy(&work, &backend, "worker_threads = 1");
    let config = std::fs::read_dir(&work)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "toml"))
        .unwrap();
    migrate(&config);
    let via = |db: &str| format!("postgres://{}@127.0.0.1:{port}/{db}", pg.superuser());
    let (_bouncer, bouncer_port) = start_pgbouncer(&pg, &["plain", "captured"]);
    let bouncer = |db: &str| {
        format!(
            "postgres://{}@127.0.0.1:{bouncer_port}/{db}",
            pg.superuser()
        )
    };
    let targets: [Target; 6] = [
        ("direct, no capture", pg.url("plain"), false),
        ("meridian, no capture", via("plain"), false),
        (
            "PgBouncer 1.18 (session), no capture",
            bouncer("plain"),
            false,
        ),
        ("direct, capture", pg.url("captured"), true),
        ("meridian, capture", via("captured"), true),
        (
            "PgBouncer 1.18 (session), capture by meridian",
            bouncer("captured"),
            true,
        ),
    ];
    let args = ["-M", "prepared", "-c", "8", "-j", "2", "-n", "-T", &seconds];
    // Warm both databases' caches so the first round is not the odd one out.
    let warm = ["-M", "prepared", "-c", "8", "-j", "2", "-n", "-T", "5"];
    for (_, url, _) in &targets {
        pgbench(url, &warm);
    }
    println!("| target | round | tps | avg latency (ms) | WAL bytes per transaction | capture caught up after the run (s) |");
    println!("|---|---|---|---|---|---|");
    let mut results: Vec<Vec<Result>> = Vec::new();
    for round in 1..=rounds {
        let mut this_round = Vec::new();
        for (name, url, captured) in &targets {
            // Shipping prunes shipped changes; stand in for it so the log does
            // not grow across runs. Row versions stay (one per row, as in production).
            wait_for_capture(&pg);
            psql(&pg, "captured", "TRUNCATE meridian.change");
            psql(&pg, "postgres", "CHECKPOINT");
            let lsn = psql(&pg, "postgres", "SELECT pg_current_wal_lsn()");
            let r = pgbench(url, &args);
            let lag = if *captured {
                wait_for_capture(&pg).as_secs_f64()
            } else {
                0.0
            };
            let wal: f64 = psql(
                &pg,
                "postgres",
                &format!("SELECT pg_current_wal_lsn() - '{lsn}'::pg_lsn"),
            )
            .parse()
            .unwrap();
            let per_tx = wal / (r.tps * seconds.parse::<f64>().unwrap());
            println!(
                "| {name} | {round} | {:.0} | {:.3} | {per_tx:.0} | {lag:.1} |",
                r.tps, r.latency_ms
            );
            this_round.push(r);
        }
        results.push(this_round);
    }
    println!("\n| `-M prepared -c 8 -j 2` (TPC-B-like) | median ratio to direct without capture | range over rounds |");
    println!("|---|---|---|");
    for (i, (name, _, _)) in targets.iter().enumerate().skip(1) {
        let (median, low, high) = paired_ratios(&results, i);
        println!("| {name} | **{median:.2}** | {low:.2}-{high:.2} |");
    }
    let captured = psql(&pg, "captured", "SELECT count(*) FROM meridian.change");
    println!("\ncaptured changes in the last run: {captured}");
}
