//! End-to-end relay benchmark: pgbench straight at PostgreSQL, through
//! PgBouncer in session mode (what a user would put there instead) and
//! through `meridian run` processes, against the same server, in one run,
//! alternating so all see the same machine noise. Not a test: it asserts
//! nothing.
//!
//! cargo bench --bench relay_e2e            (defaults: -T 20, 3 rounds)
//! RELAY_BENCH_SECONDS=5 RELAY_BENCH_ROUNDS=1 cargo bench --bench relay_e2e

mod common;

use common::{env_or, paired_ratios, pgbench, start_pgbouncer, start_proxy, Result};
use meridian::cluster::postgres::{PgOptions, PgServer};

fn main() {
    // `cargo bench` passes --bench; ignore arguments.
    let seconds = env_or("RELAY_BENCH_SECONDS", 20).to_string();
    let rounds = env_or("RELAY_BENCH_ROUNDS", 3);
    let dir = tempfile::Builder::new()
        .prefix("meridian-bench-")
        .tempdir()
        .unwrap();
    let pg = PgServer::start(&dir.path().join("pg"), &PgOptions::default()).expect("PostgreSQL");
    let direct = pg.url("postgres");
    let work = dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let unix = format!(
        "[backend]\nhost = \"{}\"\nport = {}",
        pg.socket_dir().display(),
        pg.port
    );
    let proxies = [
        (
            "PgBouncer 1.18, session mode",
            start_pgbouncer(&pg, &["postgres"]),
        ),
        (
            "meridian, default threads (2)",
            start_proxy(&work, &unix, ""),
        ),
        (
            "meridian, 1 worker thread",
            start_proxy(&work, &unix, "worker_threads = 1"),
        ),
    ];
    pgbench(&direct, &["-i", "-q", "-s", "10"]);
    let urls: Vec<(&str, String)> = std::iter::once(("direct", direct.clone()))
        .chain(proxies.iter().map(|(name, (_, port))| {
            (
                *name,
                format!("postgres://postgres@127.0.0.1:{port}/postgres"),
            )
        }))
        .collect();
    let targets: Vec<(&str, &String)> = urls.iter().map(|(n, u)| (*n, u)).collect();
    let workloads: [(&str, Vec<&str>); 4] = [
        (
            "-S -M prepared -c 8 -j 2",
            vec![
                "-S", "-M", "prepared", "-c", "8", "-j", "2", "-n", "-T", &seconds,
            ],
        ),
        (
            "-S -M prepared -c 1",
            vec!["-S", "-M", "prepared", "-c", "1", "-n", "-T", &seconds],
        ),
        (
            "-S -M simple -c 8 -j 2",
            vec![
                "-S", "-M", "simple", "-c", "8", "-j", "2", "-n", "-T", &seconds,
            ],
        ),
        (
            "TPC-B-like -M prepared -c 8 -j 2",
            vec!["-M", "prepared", "-c", "8", "-j", "2", "-n", "-T", &seconds],
        ),
    ];
    println!("| workload | target | round | tps | avg latency (ms) |");
    println!("|---|---|---|---|---|");
    let mut summary = Vec::new();
    for (name, args) in &workloads {
        // results[round][target]
        let mut results: Vec<Vec<Result>> = Vec::new();
        for round in 1..=rounds {
            let mut this_round = Vec::new();
            for (target, url) in &targets {
                let r = pgbench(url, args);
                println!(
                    "| `{name}` | {target} | {round} | {:.0} | {:.3} |",
                    r.tps, r.latency_ms
                );
                this_round.push(r);
            }
            results.push(this_round);
        }
        // Each round pairs the direct run with proxied runs made right after it;
        // the median over rounds of those paired ratios resists the machine's noise.
        for (i, (target, _)) in targets.iter().enumerate().skip(1) {
            let (median, low, high) = paired_ratios(&results, i);
            let mut added: Vec<f64> = results
                .iter()
                .map(|r| (r[i].latency_ms - r[0].latency_ms) * 1000.0)
                .collect();
            added.sort_by(f64::total_cmp);
            summary.push(format!(
                "| `{name}` | {target} | **{median:.2}** | {low:.2}-{high:.2} | {:+.1} us |",
                added[added.len() / 2]
            ));
        }
    }
    println!("\n| workload | target | median ratio to direct | range over rounds | median added avg latency |");
    println!("|---|---|---|---|---|");
    for line in summary {
        println!("{line}");
    }
    drop(pg);
}
