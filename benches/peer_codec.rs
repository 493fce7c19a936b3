//! Micro-benchmarks for the peer protocol's batches, the bytes a catch-up
//! moves between regions: encoding and decoding a batch of 5,000 changes of
//! the catch-up benchmark's 10-column table in the binary form, beside
//! decoding the same changes from JSON into `serde_json::Value` trees (what
//! protocol version 3 did on arrival).

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use meridian::capture::image::Image;
use meridian::replication::protocol::{Change, Message, Operation};
use serde_json::{json, Value};

const N: usize = 5_000;

fn changes() -> Vec<Change> {
    (0..N as i64)
        .map(|i| Change {
            xid: 1_000 + i as u64,
            seq: i,
            origin: 0,
            hlc: 1 << 40 | i,
            tx_hlc: 1 << 40 | i,
            via_proxy: false,
            tbl: "public.bench_mixed".into(),
            op: Operation::Update,
            pk: Image::from_value(&json!({ "id": i })),
            row: Image::from_value(&json!({
                "id": i, "a": i * 3, "b": format!("text value {i}"), "c": 12.5,
                "d": "2026-12-02 10:00:00+00", "e": true, "f": null, "g": i * 7,
                "h": "abcdefghij", "k": "x"
            })),
            old: None,
            base_hlc: Some(i),
            base_origin: (i % 2 == 0).then_some(1),
            epoch: None,
            gen: None,
            tag_hlc: None,
            tag_origin: None,
            cols: None,
        })
        .collect()
}

fn batches(c: &mut Criterion) {
    let changes = changes();
    let message = Message::Batch {
        after: Default::default(),
        changes: changes.clone(),
        deps: Vec::new(),
        floor: None,
        caught_up: None,
    };
    let binary = message.encode();
    let as_json = serde_json::to_vec(&changes).unwrap();
    let mut group = c.benchmark_group("peer_batch_5000");
    group.throughput(Throughput::Elements(N as u64));
    group.sample_size(20);
    group.bench_function("encode_binary", |b| b.iter(|| black_box(&message).encode()));
    group.bench_function("decode_binary", |b| {
        b.iter(|| Message::decode(black_box(&binary)).unwrap())
    });
    group.bench_function("decode_json_value_trees", |b| {
        b.iter(|| serde_json::from_slice::<Vec<Value>>(black_box(&as_json)).unwrap())
    });
    group.finish();
    println!(
        "peer_batch_5000: binary {} bytes, JSON {} bytes",
        binary.len(),
        as_json.len()
    );
}

criterion_group!(benches, batches);
criterion_main!(benches);
