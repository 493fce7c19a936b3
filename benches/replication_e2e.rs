//! Replication benchmark: two regions (two databases of one PostgreSQL, so
//! both clocks are the same and lag is measured exactly), each with its
//! `meridian run`, replicating over `meridian::link` links.
//!
//! 1. Lag: one client writes single-row transactions into region A at a fixed
//!    rate through its proxy; an ALWAYS trigger in region B stamps each row's
//!    arrival; lag = arrival - commit-time stamp taken in A. For link latencies
//!    0, 30 and 100 ms (one way), p50 and p99.
//! 2. Catch-up: the link A->B is partitioned while N single-row transactions
//!    commit in A (pgbench, 4 clients), then healed; rows/s until B has them all.
//!
//! cargo bench --bench replication_e2e
//! REPL_BENCH_SECONDS=10 REPL_BENCH_RATE=500 REPL_BENCH_BACKLOG=50000 (defaults)

mod common;

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{env_or, migrate, pgbench, psql, ProxyProcess};
use meridian::cluster::postgres::{free_port, PgOptions, PgServer};
use meridian::link::{self, LinkSettings, LinkState};

fn main() {
    let seconds = env_or("REPL_BENCH_SECONDS", 10);
    let rate = env_or("REPL_BENCH_RATE", 500);
    let backlog = env_or("REPL_BENCH_BACKLOG", 50_000);
    let dir = tempfile::Builder::new()
        .prefix("meridian-bench-")
        .tempdir()
        .unwrap();
    let pg = PgServer::start(
        &dir.path().join("pg"),
        &PgOptions {
            durable: true,
            ..PgOptions::default()
        },
    )
    .expect("PostgreSQL");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let (rep_a, rep_b) = (free_port().unwrap(), free_port().unwrap());
    let link_to = |target: u16| -> Arc<LinkState> {
        let (listener, state) = rt
            .block_on(link::bind(
                "127.0.0.1:0".parse().unwrap(),
                format!("127.0.0.1:{target}"),
                LinkSettings::default(),
            ))
            .unwrap();
        rt.spawn(link::run(listener, state.clone(), stop.clone()));
        state
    };
    let (a_to_b, b_to_a) = (link_to(rep_b), link_to(rep_a));
    let schema = "CREATE TABLE lag (id bigint PRIMARY KEY, written_at timestamptz NOT NULL DEFAULT clock_timestamp(), arrived_at timestamptz)";
    let mut procs = Vec::new();
    let mut proxy_port = 0;
    for (db, id, listen, peer_id, peer) in
        [("a", 1, rep_a, 2, &a_to_b), ("b", 2, rep_b, 1, &b_to_a)]
    {
        psql(&pg, "postgres", &format!("CREATE DATABASE {db}"));
        psql(&pg, db, schema);
        let port = free_port().unwrap();
        if db == "a" {
            proxy_port = port;
        }
        let config = dir.path().join(format!("{db}.toml"));
        std::fs::write(
            &config,
            format!(
                "[region]\nname = \"{db}\"\nid = {id}\n[proxy]\nlisten = \"127.0.0.1:{port}\"\nworker_threads = 1\n\
                 [backend]\nhost = \"{}\"\nport = {}\nuser = \"{}\"\ndatabase = \"{db}\"\n[auth]\nmethod = \"trust\"\n\
                 [replication]\nlisten = \"127.0.0.1:{listen}\"\nsecret = \"benchmark secret 0123456789\"\n\
                 [[replication.peers]]\nname = \"peer\"\nid = {peer_id}\naddress = \"{}\"\n",
                pg.socket_dir().display(),
                pg.port,
                pg.superuser(),
                peer.listen
            ),
        )
        .unwrap();
        migrate(&config);
        procs.push(ProxyProcess::from(
            Command::new(env!("CARGO_BIN_EXE_meridian"))
                .args(["run", "--config"])
                .arg(&config)
                .env(
                    "MERIDIAN_LOG",
                    std::env::var("E2E_LOG").unwrap_or_else(|_| "warn".into()),
                )
                .spawn()
                .unwrap(),
        ));
    }
    // Region B stamps arrivals, also for replicated rows (ALWAYS fires in replica mode).
    psql(&pg, "b", "CREATE FUNCTION arrived() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN NEW.arrived_at := clock_timestamp(); RETURN NEW; END $$;
                    CREATE TRIGGER arrived BEFORE INSERT ON lag FOR EACH ROW EXECUTE FUNCTION arrived();
                    ALTER TABLE lag ENABLE ALWAYS TRIGGER arrived;");
    std::thread::sleep(Duration::from_secs(2));
    let url = format!(
        "host=127.0.0.1 port={proxy_port} user={} dbname=a",
        pg.superuser()
    );
    println!("## Lag: {rate} single-row transactions/s into region A for {seconds} s, measured in region B\n");
    println!("| one-way link latency | writes | p50 lag (ms) | p99 lag (ms) | max (ms) |");
    println!("|---|---|---|---|---|");
    let mut next_id: i64 = 0;
    for latency_ms in [0u64, 30, 100] {
        for l in [&a_to_b, &b_to_a] {
            l.set_settings(LinkSettings {
                latency: Duration::from_millis(latency_ms),
                ..LinkSettings::default()
            });
        }
        let first = next_id;
        let total = (rate * seconds) as i64;
        next_id = rt.block_on(async {
            let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .unwrap();
            tokio::spawn(conn);
            let insert = client
                .prepare("INSERT INTO lag (id) VALUES ($1)")
                .await
                .unwrap();
            let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
            let mut id = first;
            for _ in 0..total {
                tick.tick().await;
                client.execute(&insert, &[&id]).await.unwrap();
                id += 1;
            }
            id
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        while psql(
            &pg,
            "b",
            &format!("SELECT count(*) FROM lag WHERE id >= {first} AND id < {next_id}"),
        ) != total.to_string()
        {
            assert!(Instant::now() < deadline, "rows did not arrive");
            std::thread::sleep(Duration::from_millis(100));
        }
        let stats = psql(&pg, "b", &format!(
            "SELECT format('%s | %s | %s', round(percentile_cont(0.5) WITHIN GROUP (ORDER BY ms)::numeric, 1),
                    round(percentile_cont(0.99) WITHIN GROUP (ORDER BY ms)::numeric, 1), round(max(ms)::numeric, 1))
             FROM (SELECT extract(epoch FROM arrived_at - written_at) * 1000 AS ms FROM lag WHERE id >= {first} AND id < {next_id}) x"
        ));
        println!("| {latency_ms} ms | {total} | {stats} |");
    }
    for l in [&a_to_b, &b_to_a] {
        l.set_settings(LinkSettings::default());
    }
    // Catch-up after a partition.
    a_to_b.partition();
    let script = dir.path().join("insert.sql");
    std::fs::write(&script, "\\set n random(1, 1000000000000)\nINSERT INTO lag (id) VALUES (2000000000::bigint + :n) ON CONFLICT DO NOTHING;\n").unwrap();
    let a_direct = pg.url("a");
    let per_client = backlog / 4;
    pgbench(
        &a_direct,
        &[
            "-n",
            "-f",
            script.to_str().unwrap(),
            "-c",
            "4",
            "-j",
            "2",
            "-t",
            &per_client.to_string(),
        ],
    );
    let waiting: u64 = psql(&pg, "a", "SELECT count(*) FROM lag WHERE id >= 2000000000")
        .parse()
        .unwrap();
    let start = Instant::now();
    a_to_b.heal();
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let got: u64 = psql(&pg, "b", "SELECT count(*) FROM lag WHERE id >= 2000000000")
            .parse()
            .unwrap();
        if got == waiting {
            break;
        }
        assert!(Instant::now() < deadline, "catch-up did not finish");
        std::thread::sleep(Duration::from_millis(50));
    }
    let took = start.elapsed();
    println!("\n## Catch-up after a partition\n");
    println!("| backlog (single-row transactions) | time to apply | rows/s |");
    println!("|---|---|---|");
    println!(
        "| {waiting} | {:.1} s | {:.0} |",
        took.as_secs_f64(),
        waiting as f64 / took.as_secs_f64()
    );
    stop.cancel();
    drop(procs);
}
