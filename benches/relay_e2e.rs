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
            "meridian, default (io_uring relay)",
            start_proxy(&work, &unix, ""),
        ),
        (
            "meridian, relay = \"epoll\"",
            start_proxy(&work, &unix, "relay = \"epoll\""),
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
    // The proxy's own CPU time per transaction (all its threads, user and
    // kernel): steadier than tps on a noisy machine, and what a proxy costs
    // the Postgres it shares a host with.
    let proxy_cpu = |target: usize| match target {
        0 => 0.0,
        t => proxies[t - 1].1 .0.cpu_seconds(),
    };
    println!("| workload | target | round | tps | avg latency (ms) | proxy CPU per tx (us) |");
    println!("|---|---|---|---|---|---|");
    let mut summary = Vec::new();
    for (name, args) in &workloads {
        // results[round][target], cpu[target][round]
        let mut results: Vec<Vec<Result>> = Vec::new();
        let mut cpu = vec![Vec::new(); targets.len()];
        for round in 1..=rounds {
            let mut this_round = Vec::new();
            for (t, (target, url)) in targets.iter().enumerate() {
                let before = proxy_cpu(t);
                let r = pgbench(url, args);
                let us = (proxy_cpu(t) - before) * 1e6 / r.transactions;
                println!(
                    "| `{name}` | {target} | {round} | {:.0} | {:.3} | {us:.1} |",
                    r.tps, r.latency_ms
                );
                cpu[t].push(us);
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
            cpu[i].sort_by(f64::total_cmp);
            summary.push(format!(
                "| `{name}` | {target} | **{median:.2}** | {low:.2}-{high:.2} | {:+.1} us | {:.1} us ({:.1}-{:.1}) |",
                added[added.len() / 2],
                cpu[i][cpu[i].len() / 2],
                cpu[i][0],
                cpu[i][cpu[i].len() - 1]
            ));
        }
    }
    println!("\n| workload | target | median ratio to direct | range over rounds | median added avg latency | proxy CPU per tx, median (range) |");
    println!("|---|---|---|---|---|---|");
    for line in summary {
        println!("{line}");
    }
    drop(pg);
}
