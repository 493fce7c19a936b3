//! Micro-benchmark of the rule engine: the cost of resolving one conflicting
//! change against the local row, per policy and per column merge (the issue's
//! target: at most 1 us per change in process). The rows are moved into the
//! engine (as the receiver does); making the copies is not timed. Rows have eight columns, as
//! a typical OLTP row; the change conflicts (its base is not the local
//! version), so the full decision runs.

// The allocator the meridian binary uses (src/main.rs): freeing the
// losing row's allocations is most of a resolution's cost.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use criterion::{black_box, criterion_group, criterion_main, BatchSize, Criterion};
use meridian::clock::Version;
use meridian::rules::merge::{cols_from_json, Engine, Incoming, Row, Stored};
use meridian::rules::{ColumnRule, Deletes, Policy};
use serde_json::json;

fn row(v: serde_json::Value) -> Row {
    v.as_object().expect("object").clone()
}

fn resolution(c: &mut Criterion) {
    let local = Stored {
        version: Version {
            hlc: 2000,
            region: 1,
        },
        winner: Version {
            hlc: 2000,
            region: 1,
        },
        gen: 0,
        tag: Version {
            hlc: 500,
            region: 3,
        },
        epoch: 4,
        deleted: false,
        row: row(
            json!({"id": 42, "owner": "ann", "email": "ann@example.com", "balance": 130,
                        "high": 17, "tags": ["a", "b"], "status": "paid", "note": "local"}),
        ),
        cols: cols_from_json(Some(&json!({
            "balance": {"0": [0, 100], "1": [2000, 30]},
            "note": [2000, 1], "email": [1500, 3]}))),
    };
    let remote = Incoming {
        version: Version {
            hlc: 2100,
            region: 2,
        },
        base: Some(Version {
            hlc: 1000,
            region: 3,
        }),
        gen: 0,
        tag: Version {
            hlc: 500,
            region: 3,
        },
        epoch: 3,
        deleted: false,
        row: row(
            json!({"id": 42, "owner": "ann", "email": "ann@example.org", "balance": 95,
                        "high": 21, "tags": ["b", "c"], "status": "shipped", "note": "remote"}),
        ),
        cols: cols_from_json(Some(&json!({
            "balance": {"0": [0, 100], "2": [2100, -5]},
            "note": [2100, 2], "email": [2100, 2]}))),
    };
    let delete = Incoming {
        deleted: true,
        row: Row::new(),
        cols: Default::default(),
        ..remote.clone()
    };
    let table = |policy, deletes, columns: Vec<(&str, ColumnRule)>| Engine {
        policy,
        function: None,
        priority: vec![3, 2, 1],
        deletes,
        columns: columns
            .into_iter()
            .map(|(c, r)| (c.to_string(), r))
            .collect(),
    };
    let states = ColumnRule::States(vec!["created".into(), "paid".into(), "shipped".into()]);
    let cases: Vec<(&str, Engine, &Incoming)> = vec![
        (
            "last_writer_wins",
            table(Policy::LastWriterWins, None, vec![]),
            &remote,
        ),
        (
            "first_writer_wins",
            table(Policy::FirstWriterWins, None, vec![]),
            &remote,
        ),
        (
            "region_priority",
            table(Policy::RegionPriority, None, vec![]),
            &remote,
        ),
        (
            "keep_local",
            table(Policy::KeepLocal, None, vec![]),
            &remote,
        ),
        (
            "delete_wins",
            table(Policy::LastWriterWins, Some(Deletes::DeleteWins), vec![]),
            &delete,
        ),
        (
            "update_wins",
            table(Policy::LastWriterWins, Some(Deletes::UpdateWins), vec![]),
            &delete,
        ),
        (
            "counter",
            table(
                Policy::LastWriterWins,
                None,
                vec![("balance", ColumnRule::Counter)],
            ),
            &remote,
        ),
        (
            "max",
            table(
                Policy::LastWriterWins,
                None,
                vec![("high", ColumnRule::Max)],
            ),
            &remote,
        ),
        (
            "union",
            table(
                Policy::LastWriterWins,
                None,
                vec![("tags", ColumnRule::Union)],
            ),
            &remote,
        ),
        (
            "states",
            table(
                Policy::LastWriterWins,
                None,
                vec![("status", states.clone())],
            ),
            &remote,
        ),
        (
            "column_lww",
            table(
                Policy::LastWriterWins,
                None,
                vec![("note", ColumnRule::LastWriterWins)],
            ),
            &remote,
        ),
        (
            "all_merges",
            table(
                Policy::RegionPriority,
                Some(Deletes::DeleteWins),
                vec![
                    ("balance", ColumnRule::Counter),
                    ("high", ColumnRule::Max),
                    ("tags", ColumnRule::Union),
                    ("status", states),
                    ("note", ColumnRule::LastWriterWins),
                ],
            ),
            &remote,
        ),
    ];
    let mut group = c.benchmark_group("resolve");
    for (name, engine, change) in &cases {
        // Inputs are moved into resolve; their copies are made outside the timing.
        group.bench_function(*name, |b| {
            b.iter_batched(
                || (local.clone(), (*change).clone()),
                |(l, r)| black_box(engine.resolve(Some(l), r)),
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

criterion_group!(benches, resolution);
criterion_main!(benches);
