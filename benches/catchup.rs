//! Catch-up benchmark (issue 16): how fast a region absorbs a backlog after
//! a partition, against PostgreSQL's own logical replication on the same
//! backlog, in the same run, alternating rounds.
//!
//! One durable PostgreSQL holds four databases: `a` and `b` are two meridian
//! regions (a `meridian run` each, replicating over a `meridian::link` in
//! this process), `la` and `lb` a publication and a subscription (the
//! subscription's slot made by hand, since both are in one cluster).
//!
//! Per round, for each system in turn: the way to the receiver is cut (the
//! link A->B partitioned; the subscription disabled), pgbench commits the
//! backlog directly in the origin, then a marker row; once the origin has
//! captured the marker (meridian) the way is opened again (link healed;
//! subscription enabled), and the time until the marker is in the receiver
//! is the catch-up time. Both systems apply in the origin's order and
//! commit the marker last, so the marker's arrival means every change
//! before it is there.
//!
//! Backlogs: `mixed` (CATCHUP_BACKLOG single-row transactions: 90% an
//! insert-or-update of one of CATCHUP_KEYS keys of a 10-column table, 10% a
//! counter increment on a rule-engine table of 1,000 rows) and `engine`
//! (CATCHUP_ENGINE_BACKLOG increments of the rule-engine table alone).
//!
//! cargo bench --bench catchup
//! CATCHUP_BACKLOG=300000 CATCHUP_KEYS=100000 CATCHUP_ENGINE_BACKLOG=30000 CATCHUP_ROUNDS=2 (defaults)
//! CATCHUP_WORKER_THREADS=1 (each meridian's runtime threads; 0: one per CPU)
//! CATCHUP_PROFILE=1: time per SQL function; CATCHUP_LOG=meridian::replication::apply=debug: each apply's phases

mod common;

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{env_or, migrate, pgbench_env, psql, ProxyProcess};
use meridian::cluster::postgres::{free_port, PgOptions, PgServer};
use meridian::link::{self, LinkSettings, LinkState};

/// (CPU seconds, minor page faults) of a process so far.
fn usage_of(p: &ProxyProcess) -> (f64, u64) {
    (p.cpu_seconds(), p.page_faults())
}

/// CPU seconds of every Postgres server process now, by pid, with what it
/// serves (database, backend type, application name: `meridian capture` is
/// a region's walsender, `meridian` its other sessions).
fn postgres_cpu(pg: &PgServer) -> std::collections::HashMap<i32, (String, f64)> {
    // SAFETY: sysconf has no preconditions.
    let tick = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let listing = psql(
        pg,
        "postgres",
        "SELECT string_agg(format('%s|%s %s %s', pid, coalesce(datname, '-'), backend_type,
                                  coalesce(nullif(application_name, ''), '-')), E'\n')
           FROM pg_stat_activity",
    );
    listing
        .lines()
        .filter_map(|line| {
            let (pid, what) = line.split_once('|')?;
            let pid: i32 = pid.parse().ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
            let ticks: f64 =
                fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
            Some((pid, (what.to_string(), ticks / tick)))
        })
        .collect()
}

/// Postgres CPU between two snapshots, by what the processes serve, busiest
/// first (processes that ended in between are missing).
fn postgres_cpu_between(
    before: &std::collections::HashMap<i32, (String, f64)>,
    after: &std::collections::HashMap<i32, (String, f64)>,
) -> String {
    let mut by: std::collections::BTreeMap<&str, f64> = Default::default();
    for (pid, (what, cpu)) in after {
        let earlier = before.get(pid).map_or(0.0, |b| b.1);
        *by.entry(what.as_str()).or_default() += cpu - earlier;
    }
    let mut rows: Vec<_> = by.into_iter().filter(|(_, c)| *c >= 0.05).collect();
    rows.sort_by(|a, b| b.1.total_cmp(&a.1));
    rows.iter()
        .map(|(w, c)| format!("    {c:6.2} s  {w}\n"))
        .collect()
}

/// Tables of one round: fresh, so every round starts with the same share
/// of inserts among its transactions.
fn tables(round: u64) -> String {
    format!(
        "CREATE TABLE wide_{round} (id bigint PRIMARY KEY, c1 int NOT NULL, c2 int, c3 bigint, c4 text,
                                    c5 text, c6 numeric, c7 timestamptz, c8 bool, c9 double precision);
         CREATE TABLE tally_{round} (id int PRIMARY KEY, hits bigint NOT NULL DEFAULT 0, last_region text);
         INSERT INTO tally_{round} (id) SELECT g FROM generate_series(1, 1000) g;
         CREATE TABLE engine_{round} (id int PRIMARY KEY, hits bigint NOT NULL DEFAULT 0, last_region text);
         INSERT INTO engine_{round} (id) SELECT g FROM generate_series(1, 1000) g;"
    )
}

fn rules(rounds: u64) -> String {
    let mut text =
        String::from("# Written by benches/catchup.rs: counters decided by the rule engine.\n");
    for r in 1..=rounds {
        for t in ["tally", "engine"] {
            text.push_str(&format!(
                "[[table]]\nname = \"public.{t}_{r}\"\n[table.columns]\nhits = \"counter\"\nlast_region = \"last-writer-wins\"\n"
            ));
        }
    }
    text
}

/// The pgbench scripts of a backlog: (file, weight).
fn scripts(dir: &std::path::Path, round: u64, keys: u64, kind: &str) -> Vec<String> {
    let wide = dir.join(format!("wide_{round}.sql"));
    std::fs::write(
        &wide,
        format!(
            "\\set k random(1, {keys})
INSERT INTO wide_{round} (id, c1, c2, c3, c4, c5, c6, c7, c8, c9)
VALUES (:k, 1, :k % 1000, :k * 7, 'name ' || :k, md5(:k::text), :k / 3.0, now(), true, random())
ON CONFLICT (id) DO UPDATE SET c1 = wide_{round}.c1 + 1, c5 = md5(excluded.c5), c7 = now(), c9 = random();
"
        ),
    )
    .unwrap();
    let counter = |table: &str| {
        let path = dir.join(format!("{table}_{round}.sql"));
        std::fs::write(
            &path,
            format!(
                "\\set k random(1, 1000)\nUPDATE {table}_{round} SET hits = hits + 1, last_region = 'a' WHERE id = :k;\n"
            ),
        )
        .unwrap();
        path
    };
    match kind {
        "mixed" => vec![
            format!("{}@9", wide.display()),
            format!("{}@1", counter("tally").display()),
        ],
        _ => vec![format!("{}", counter("engine").display())],
    }
}

/// Commits `transactions` single-row transactions into `db` (4 clients).
fn backlog(pg: &PgServer, db: &str, files: &[String], transactions: u64) -> f64 {
    let mut args: Vec<String> = vec!["-n".into()];
    for f in files {
        args.push("-f".into());
        args.push(f.clone());
    }
    let per_client = transactions / 4;
    args.extend(["-c", "4", "-j", "2", "-t"].map(String::from));
    args.push(per_client.to_string());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    // The backlog is not what is measured: commit it fast.
    pgbench_env(
        &pg.url(db),
        &args,
        &[("PGOPTIONS", "-c synchronous_commit=off")],
    )
    .tps
}

/// Polls `sql` (a boolean) in `db` until it is true, over one connection
/// (a psql process per poll cost a fifth of the machine's CPU).
fn wait_for(pg: &PgServer, db: &str, sql: &str, what: &str, limit: Duration) -> Duration {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let client = rt.block_on(async {
        let (client, conn) =
            tokio_postgres::connect(&pg.socket_conninfo(db), tokio_postgres::NoTls)
                .await
                .unwrap();
        tokio::spawn(conn);
        client
    });
    let start = Instant::now();
    loop {
        if rt
            .block_on(client.query_one(sql, &[]))
            .unwrap()
            .get::<_, bool>(0)
        {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < limit,
            "{what} did not happen within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

struct Run {
    system: &'static str,
    kind: &'static str,
    round: u64,
    changes: u64,
    seconds: f64,
    write_tps: f64,
}

fn main() {
    let transactions = env_or("CATCHUP_BACKLOG", 300_000);
    let keys = env_or("CATCHUP_KEYS", 100_000);
    let engine_transactions = env_or("CATCHUP_ENGINE_BACKLOG", 30_000);
    let rounds = env_or("CATCHUP_ROUNDS", 2);
    let dir = tempfile::Builder::new()
        .prefix("meridian-catchup-")
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
    let schema: String = (1..=rounds).map(tables).collect::<String>()
        + "CREATE TABLE done (round int PRIMARY KEY, kind text NOT NULL);";
    std::fs::write(dir.path().join("rules.toml"), rules(rounds)).unwrap();
    std::fs::create_dir_all(dir.path().join("rules")).unwrap();
    std::fs::rename(
        dir.path().join("rules.toml"),
        dir.path().join("rules").join("catchup.toml"),
    )
    .unwrap();
    // Each meridian's threads (CATCHUP_WORKER_THREADS; 0: one per CPU, the default).
    let workers = match env_or("CATCHUP_WORKER_THREADS", 1) {
        0 => String::new(),
        n => format!("worker_threads = {n}\n"),
    };
    let mut procs = Vec::new();
    for (db, id, listen, peer_id, peer) in
        [("a", 1, rep_a, 2, &a_to_b), ("b", 2, rep_b, 1, &b_to_a)]
    {
        psql(&pg, "postgres", &format!("CREATE DATABASE {db}"));
        psql(&pg, db, &schema);
        let port = free_port().unwrap();
        let config = dir.path().join(format!("{db}.toml"));
        std::fs::write(
            &config,
            format!(
                "[region]\nname = \"{db}\"\nid = {id}\n[proxy]\nlisten = \"127.0.0.1:{port}\"\n{workers}\
                 [backend]\nhost = \"{}\"\nport = {}\nuser = \"{}\"\ndatabase = \"{db}\"\n[auth]\nmethod = \"trust\"\n\
                 [replication]\nlisten = \"127.0.0.1:{listen}\"\nsecret = \"benchmark secret 0123456789\"\nrules = \"rules\"\n\
                 [[replication.peers]]\nname = \"peer\"\nid = {peer_id}\naddress = \"{}\"\n",
                pg.socket_dir().display(),
                pg.port,
                pg.superuser(),
                peer.listen,
                workers = workers,
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
                    std::env::var("CATCHUP_LOG").unwrap_or_else(|_| "warn".into()),
                )
                .spawn()
                .unwrap(),
        ));
    }
    // The anchor: a publication in la, a subscription in lb.
    for db in ["la", "lb"] {
        psql(&pg, "postgres", &format!("CREATE DATABASE {db}"));
        psql(&pg, db, &schema);
    }
    psql(&pg, "la", "CREATE PUBLICATION anchor FOR ALL TABLES");
    psql(
        &pg,
        "la",
        "SELECT pg_create_logical_replication_slot('anchor', 'pgoutput')",
    );
    psql(
        &pg,
        "lb",
        &format!(
            "CREATE SUBSCRIPTION anchor CONNECTION '{}' PUBLICATION anchor
             WITH (connect = false, create_slot = false, slot_name = 'anchor', enabled = false, copy_data = false)",
            pg.socket_conninfo("la")
        ),
    );
    psql(&pg, "lb", "ALTER SUBSCRIPTION anchor ENABLE");
    psql(
        &pg,
        "lb",
        "ALTER SUBSCRIPTION anchor REFRESH PUBLICATION WITH (copy_data = false)",
    );
    wait_for(
        &pg,
        "lb",
        "SELECT count(*) > 0 AND bool_and(srsubstate = 'r') FROM pg_subscription_rel",
        "the subscription's tables ready",
        Duration::from_secs(60),
    );
    let disable = || {
        psql(&pg, "lb", "ALTER SUBSCRIPTION anchor DISABLE");
        wait_for(
            &pg,
            "la",
            "SELECT NOT active FROM pg_replication_slots WHERE slot_name = 'anchor'",
            "the anchor's walsender stopping",
            Duration::from_secs(60),
        );
    };
    disable();
    if std::env::var_os("CATCHUP_PROFILE").is_some() {
        psql(&pg, "postgres", "ALTER SYSTEM SET track_functions = 'all'");
        psql(&pg, "postgres", "SELECT pg_reload_conf()");
    }
    // The shippers connect before the first cut.
    std::thread::sleep(Duration::from_secs(2));

    let mut runs: Vec<Run> = Vec::new();
    let mut marker = 0;
    let mut usage: Vec<(f64, u64)> = Vec::new();
    for round in 1..=rounds {
        for kind in ["mixed", "engine"] {
            let n = if kind == "mixed" {
                transactions
            } else {
                engine_transactions
            };
            for system in ["meridian", "postgres"] {
                marker += 1;
                let files = scripts(dir.path(), round, keys, kind);
                let (origin, receiver) = if system == "meridian" {
                    ("a", "b")
                } else {
                    ("la", "lb")
                };
                if system == "meridian" {
                    a_to_b.partition();
                }
                let write_tps = backlog(&pg, origin, &files, n);
                psql(
                    &pg,
                    origin,
                    &format!("INSERT INTO done VALUES ({marker}, '{kind}')"),
                );
                let changes = (n / 4) * 4 + 1;
                let pg_before;
                if system == "meridian" {
                    wait_for(
                        &pg,
                        "a",
                        &format!(
                            "SELECT EXISTS (SELECT 1 FROM meridian.change
                              WHERE tbl = 'public.done' AND pk ->> 'round' = '{marker}')"
                        ),
                        "capture of the backlog",
                        Duration::from_secs(600),
                    );
                    eprintln!("healed: {kind} round {round}");
                    usage = procs.iter().map(usage_of).collect();
                    pg_before = postgres_cpu(&pg);
                    a_to_b.heal();
                } else {
                    pg_before = postgres_cpu(&pg);
                    psql(&pg, "lb", "ALTER SUBSCRIPTION anchor ENABLE");
                }
                let took = wait_for(
                    &pg,
                    receiver,
                    &format!("SELECT EXISTS (SELECT 1 FROM done WHERE round = {marker})"),
                    "catch-up",
                    Duration::from_secs(900),
                );
                eprintln!(
                    "  Postgres CPU during the catch-up ({system}):\n{}",
                    postgres_cpu_between(&pg_before, &postgres_cpu(&pg))
                );
                if system == "postgres" {
                    disable();
                } else {
                    let after: Vec<(f64, u64)> = procs.iter().map(usage_of).collect();
                    eprintln!(
                        "  meridian a: {:.2} CPU s, {} page faults; meridian b: {:.2} CPU s, {} page faults (during the catch-up)",
                        after[0].0 - usage[0].0, after[0].1 - usage[0].1, after[1].0 - usage[1].0, after[1].1 - usage[1].1
                    );
                }
                if std::env::var_os("CATCHUP_PROFILE").is_some() && system == "meridian" {
                    // Where the time went, per SQL function (track_functions = all).
                    for db in ["a", "b"] {
                        eprintln!("functions in {db} (calls, self ms, total ms):\n{}", psql(&pg, db,
                            "SELECT string_agg(format('%s %s %s %s', funcname, calls, round(self_time), round(total_time)), E'\n' ORDER BY self_time DESC)
                               FROM (SELECT * FROM pg_stat_user_functions ORDER BY self_time DESC LIMIT 15) f"));
                        psql(&pg, db, "SELECT pg_stat_reset()");
                    }
                }
                let run = Run {
                    system,
                    kind,
                    round,
                    changes,
                    seconds: took.as_secs_f64(),
                    write_tps,
                };
                eprintln!(
                    "round {round} {kind} {system}: {} changes in {:.2} s = {:.0} rows/s (backlog written at {:.0} tps)",
                    run.changes,
                    run.seconds,
                    run.changes as f64 / run.seconds,
                    run.write_tps
                );
                runs.push(run);
            }
        }
    }
    // Both receivers hold what their origins hold.
    for (o, r) in [("a", "b"), ("la", "lb")] {
        for round in 1..=rounds {
            for t in ["wide", "tally", "engine"] {
                let sql = format!("SELECT x::text FROM {t}_{round} x ORDER BY id");
                let (mine, theirs) = (psql(&pg, o, &sql), psql(&pg, r, &sql));
                if mine != theirs {
                    let (m, th): (Vec<&str>, Vec<&str>) =
                        (mine.lines().collect(), theirs.lines().collect());
                    let only_m: Vec<_> = m.iter().filter(|l| !th.contains(l)).take(5).collect();
                    let only_t: Vec<_> = th.iter().filter(|l| !m.contains(l)).take(5).collect();
                    panic!("{t}_{round} differs between {o} ({} rows) and {r} ({} rows): only in {o}: {only_m:?}; only in {r}: {only_t:?}", m.len(), th.len());
                }
            }
        }
    }
    println!("\n## Catch-up: time from heal to the marker applied\n");
    println!("| round | backlog | changes | meridian (s) | meridian rows/s | Postgres logical replication (s) | Postgres rows/s | meridian / Postgres |");
    println!("|---|---|---|---|---|---|---|---|");
    for round in 1..=rounds {
        for kind in ["mixed", "engine"] {
            let find = |s: &str| {
                runs.iter()
                    .find(|r| r.round == round && r.kind == kind && r.system == s)
                    .unwrap()
            };
            let (m, p) = (find("meridian"), find("postgres"));
            let rate = |r: &Run| r.changes as f64 / r.seconds;
            println!(
                "| {round} | {kind} | {} | {:.2} | {:.0} | {:.2} | {:.0} | {:.2} |",
                m.changes,
                m.seconds,
                rate(m),
                p.seconds,
                rate(p),
                rate(m) / rate(p)
            );
        }
    }
    stop.cancel();
    drop(procs);
}
