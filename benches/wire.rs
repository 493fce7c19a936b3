//! Micro-benchmarks for the relay's per-chunk work: scanning message
//! boundaries in a backend result stream and in a client pipeline, and the
//! SCRAM verification a session pays once at connect.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use meridian::wire::frame::{self, Direction, FrameScanner};
use meridian::wire::scram::{ServerFirst, Verifier};

fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
    frame::encode(tag, body).to_vec()
}

fn scanner(c: &mut Criterion) {
    // A SELECT reply: RowDescription, 100 DataRows of ~60 bytes, CommandComplete, ReadyForQuery.
    let mut reply = msg(b'T', &[0u8; 40]);
    for _ in 0..100 {
        reply.extend(msg(b'D', &[7u8; 60]));
    }
    reply.extend(msg(b'C', b"SELECT 100\0"));
    reply.extend(msg(b'Z', b"I"));
    let mut group = c.benchmark_group("frame_scanner");
    group.throughput(Throughput::Bytes(reply.len() as u64));
    group.bench_function("backend_result_100_rows", |b| {
        let mut s = FrameScanner::new(Direction::Backend, u32::MAX, frame::capture_ready_for_query);
        b.iter(|| {
            let mut seen = 0;
            s.scan(black_box(&reply), |_| seen += 1).unwrap();
            seen
        })
    });
    // pgbench -S -M prepared: Bind, Execute, Sync per transaction.
    let mut request = msg(b'B', &[0u8; 30]);
    request.extend(msg(b'E', b"\0\0\0\0\0"));
    request.extend(msg(b'S', b""));
    group.throughput(Throughput::Elements(1));
    group.bench_function("client_bind_execute_sync", |b| {
        let mut s = FrameScanner::new(Direction::Frontend, 64 << 20, frame::capture_statements);
        b.iter(|| {
            let mut syncs = 0;
            s.scan(black_box(&request), |m| syncs += usize::from(m.tag == b'S'))
                .unwrap();
            syncs
        })
    });
    group.finish();
}

fn scram(c: &mut Criterion) {
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
    let verifier = Verifier::generate("benchmark");
    c.bench_function(
        "scram_server_exchange_4096_iterations_client_included",
        |b| {
            b.iter(|| {
                let mut client = ScramSha256::new(b"benchmark", ChannelBinding::unrequested());
                let server =
                    ServerFirst::new(verifier.clone(), b"SCRAM-SHA-256", client.message(), None)
                        .unwrap();
                client.update(server.server_first_message()).unwrap();
                server.finish(client.message()).unwrap()
            })
        },
    );
}

criterion_group!(benches, scanner, scram);
criterion_main!(benches);
