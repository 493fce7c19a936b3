//! Micro-benchmarks for the per-statement work around a write: stamping a
//! transaction with the HLC, and classing statement text and checking it
//! for what the relay refuses (`sql::guard`), both of which the relay does
//! to every Query and Parse it forwards.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use meridian::clock::{Clock, DEFAULT_MAX_DRIFT};
use meridian::sql::{guard, statements};

/// Typical statements: pgbench's TPC-B-like script and a few common shapes.
const STATEMENTS: &[(&str, &str)] = &[
    ("pgbench_update", "UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = $2"),
    ("pgbench_select", "SELECT abalance FROM pgbench_accounts WHERE aid = $1"),
    ("pgbench_insert", "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES ($1, $2, $3, $4, CURRENT_TIMESTAMP)"),
    ("begin", "BEGIN"),
    ("upsert", "INSERT INTO accounts (id, owner, balance) VALUES ($1, $2, $3) ON CONFLICT (id) DO UPDATE SET balance = accounts.balance + excluded.balance"),
    ("cte_delete", "WITH gone AS (DELETE FROM sessions WHERE expires < now() RETURNING id) SELECT count(*) FROM gone"),
    ("join_select", "SELECT o.id, c.name, sum(l.qty * l.price) FROM orders o JOIN customers c ON c.id = o.customer_id JOIN lines l ON l.order_id = o.id WHERE o.created > $1 GROUP BY o.id, c.name ORDER BY 3 DESC LIMIT 20"),
];

fn stamping(c: &mut Criterion) {
    let clock = Clock::start(0, DEFAULT_MAX_DRIFT);
    c.bench_function("hlc_stamp", |b| b.iter(|| black_box(clock.stamp())));
    let remote = Clock::start(0, DEFAULT_MAX_DRIFT);
    c.bench_function("hlc_observe_then_stamp", |b| {
        b.iter(|| {
            clock.observe(remote.stamp()).unwrap();
            black_box(clock.stamp())
        })
    });
}

fn classification(c: &mut Criterion) {
    let mut group = c.benchmark_group("classify");
    for (name, sql) in STATEMENTS {
        group.bench_function(*name, |b| {
            b.iter(|| statements(black_box(sql.as_bytes())).count())
        });
    }
    group.finish();
    let mut group = c.benchmark_group("guard");
    for (name, sql) in STATEMENTS {
        group.bench_function(*name, |b| {
            b.iter(|| guard::refusal(black_box(sql.as_bytes())))
        });
    }
    group.bench_function("set_meridian_refused", |b| {
        b.iter(|| guard::refusal(black_box(b"SET meridian.applying = on")))
    });
    group.finish();
}

criterion_group!(benches, stamping, classification);
criterion_main!(benches);
