//! Micro-benchmark of the rule engine: the cost of resolving one conflicting
//! change against the local row, per policy and per column merge (the issue's
//! target: at most 1 us per change in process). The rows are moved into the
//! engine (as the receiver does); making the copies is not timed. Rows have eight columns, as
//! a typical OLTP row; the change conflicts (its base is not the local
//! version), so the full decision runs.

use criterion::{black_box, criterion_group, criterion_main, BatchSize, Criterion};
use meridian::clock::Version;
use meridian::rules::merge::{Engine, Incoming, Row, Stored};
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
        deleted: false,
        row: row(
            json!({"id": 42, "owner": "ann", "email": "ann@example.com", "balance": 130,
                        "high": 17, "tags": ["a", "b"], "status": "paid", "note": "local"}),
        ),
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
        deleted: false,
        row: row(
            json!({"id": 42, "owner": "ann", "email": "ann@example.org", "balance": 95,
                        "high": 21, "tags": ["b", "c"], "status": "shipped", "note": "remote"}),
        ),
        old: Some(row(json!({"balance": 100}))),
    };
    let delete = Incoming {
        deleted: true,
        row: Row::new(),
        old: None,
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
            "all_merges",
            table(
                Policy::RegionPriority,
                Some(Deletes::DeleteWins),
                vec![
                    ("balance", ColumnRule::Counter),
                    ("high", ColumnRule::Max),
                    ("tags", ColumnRule::Union),
                    ("status", states),
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
