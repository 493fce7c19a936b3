//! Protocol tests of the io_uring transport over real Unix socket pairs,
//! through the relay's entry point as a session calls it.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use crate::shutdown::Shutdown;
use crate::sql::{StatementCounts, StatementTracker};
use crate::wire::frame::{self, Direction, FrameError, FrameScanner};
use crate::wire::relay::{self, RelayEnd, RelayParts, Ring, SessionState, TxStatus};

fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
    frame::encode(tag, body).to_vec()
}

fn msgs(list: &[(u8, &[u8])]) -> Vec<u8> {
    list.iter()
        .flat_map(|(tag, body)| msg(*tag, body))
        .collect()
}

struct Setup {
    client: UnixStream,
    backend: UnixStream,
    state: Arc<SessionState>,
    relayed: tokio::task::JoinHandle<RelayEnd>,
}

/// A session relayed by `ring`: the test holds the client's and the backend's ends.
fn session(ring: &Arc<Ring>, status: u8, shutdown: &Shutdown) -> Setup {
    let (client, proxy_client) = UnixStream::pair().unwrap();
    let (proxy_backend, backend) = UnixStream::pair().unwrap();
    let state = Arc::new(SessionState::new(status));
    let parts = RelayParts {
        state: state.clone(),
        statements: StatementTracker::new(Arc::new(StatementCounts::default())),
        max_message: 1 << 20,
    };
    let (ring, shutdown) = (ring.clone(), shutdown.clone());
    let relayed = tokio::spawn(async move {
        relay::relay(proxy_client, proxy_backend, parts, &shutdown, Some(&ring)).await
    });
    Setup {
        client,
        backend,
        state,
        relayed,
    }
}

fn ring() -> Arc<Ring> {
    Arc::new(Ring::start().expect("io_uring on this kernel"))
}

fn count_messages(bytes: &[u8], direction: Direction) -> usize {
    let mut s = FrameScanner::new(direction, u32::MAX, frame::capture_none);
    let mut n = 0;
    s.scan(bytes, |_| n += 1).unwrap();
    n
}

/// Writes `bytes` in pieces of 1, 2, 3, ... bytes so the relay sees every cut.
async fn write_in_pieces(to: &mut UnixStream, bytes: &[u8]) {
    let (mut at, mut size) = (0, 1);
    while at < bytes.len() {
        let end = (at + size).min(bytes.len());
        to.write_all(&bytes[at..end]).await.unwrap();
        at = end;
        size += 1;
        tokio::task::yield_now().await;
    }
}

async fn read_exactly<R: AsyncRead + Unpin>(mut from: R, n: usize) -> Vec<u8> {
    let mut got = vec![0u8; n];
    from.read_exact(&mut got).await.unwrap();
    got
}

#[tokio::test]
async fn bytes_pass_unchanged_in_pieces_and_the_status_follows() {
    let ring = ring();
    let shutdown = Shutdown::default();
    let mut s = session(&ring, b'I', &shutdown);
    let request = msgs(&[
        (b'P', b"s1\0INSERT INTO t VALUES (1)\0\0\0"),
        (b'B', b"\0s1\0\0\0\0\0\0\0"),
        (b'E', b"\0\0\0\0\0"),
        (b'S', b""),
    ]);
    write_in_pieces(&mut s.client, &request).await;
    assert_eq!(read_exactly(&mut s.backend, request.len()).await, request);
    let reply = msgs(&[
        (b'1', b""),
        (b'2', b""),
        (b'C', b"INSERT 0 1\0"),
        (b'Z', b"T"),
    ]);
    write_in_pieces(&mut s.backend, &reply).await;
    assert_eq!(read_exactly(&mut s.client, reply.len()).await, reply);
    assert_eq!(count_messages(&reply, Direction::Backend), 4);
    // The state is updated once the reply has been sent on: poll for it.
    while s.state.tx_status() != Some(TxStatus::InTransaction) {
        tokio::task::yield_now().await;
    }
    assert!(!s.state.is_idle(), "in a transaction");
    let terminate = msg(b'X', b"");
    s.client.write_all(&terminate).await.unwrap();
    let mut rest = Vec::new();
    s.backend.read_to_end(&mut rest).await.unwrap();
    assert!(rest.starts_with(&terminate), "Terminate forwarded first");
    assert!(matches!(s.relayed.await.unwrap(), RelayEnd::ClientClosed));
}

/// Both sides write half a megabyte before reading anything: each direction
/// must move on its own, and buffers grow past their first size.
#[tokio::test]
async fn large_transfers_both_ways_at_once_pass_unchanged() {
    let ring = ring();
    let shutdown = Shutdown::default();
    let s = session(&ring, b'I', &shutdown);
    let big = |tag: u8, seed: u8| {
        let body: Vec<u8> = (0..1 << 19).map(|i: u32| (i as u8) ^ seed).collect();
        msg(tag, &body)
    };
    let (up, down) = (big(b'd', 7), big(b'D', 11));
    let (mut client, mut backend) = (s.client, s.backend);
    let (cr, mut cw) = client.split();
    let (br, mut bw) = backend.split();
    let (_, _, at_backend, at_client) = tokio::join!(
        cw.write_all(&up),
        bw.write_all(&down),
        read_exactly(br, up.len()),
        read_exactly(cr, down.len())
    );
    assert!(at_backend == up, "client to backend unchanged");
    assert!(at_client == down, "backend to client unchanged");
    drop(client);
    assert!(matches!(s.relayed.await.unwrap(), RelayEnd::ClientClosed));
}

#[tokio::test]
async fn garbage_from_the_client_gets_fatal_08p01() {
    let ring = ring();
    let mut s = session(&ring, b'I', &Shutdown::default());
    s.client
        .write_all(b"\xde\xad\xbe\xef garbage")
        .await
        .unwrap();
    let mut reply = Vec::new();
    s.client.read_to_end(&mut reply).await.unwrap();
    assert_eq!(reply[0], b'E');
    assert!(reply.windows(6).any(|w| w == b"08P01\0"));
    let end = s.relayed.await.unwrap();
    assert!(
        matches!(
            end,
            RelayEnd::ClientProtocolError(FrameError::UnknownTag(0xde))
        ),
        "{end:?}"
    );
}

#[tokio::test]
async fn drain_waits_for_the_open_transaction_then_says_reconnect() {
    let ring = ring();
    let shutdown = Shutdown::default();
    let mut s = session(&ring, b'T', &shutdown);
    shutdown.drain.cancel();
    let commit = msg(b'Q', b"COMMIT\0");
    s.client.write_all(&commit).await.unwrap();
    assert_eq!(read_exactly(&mut s.backend, commit.len()).await, commit);
    let mut reply = msg(b'C', b"COMMIT\0");
    reply.extend(msg(b'Z', b"I"));
    s.backend.write_all(&reply).await.unwrap();
    let mut out = Vec::new();
    s.client.read_to_end(&mut out).await.unwrap();
    assert!(
        out.starts_with(&reply),
        "the COMMIT's reply reaches the client first"
    );
    assert!(out.windows(6).any(|w| w == b"57P01\0"));
    assert!(matches!(s.relayed.await.unwrap(), RelayEnd::Drained));
    let mut rest = Vec::new();
    s.backend.read_to_end(&mut rest).await.unwrap();
    assert_eq!(rest, frame::TERMINATE, "the backend is told to terminate");
}

#[tokio::test]
async fn abort_closes_a_busy_session_at_once() {
    let ring = ring();
    let shutdown = Shutdown::default();
    let mut s = session(&ring, b'I', &shutdown);
    let query = msg(b'Q', b"SELECT pg_sleep(60)\0");
    s.client.write_all(&query).await.unwrap();
    assert_eq!(read_exactly(&mut s.backend, query.len()).await, query);
    shutdown.abort.cancel();
    let mut out = Vec::new();
    s.client.read_to_end(&mut out).await.unwrap();
    assert!(out.windows(6).any(|w| w == b"57P01\0"));
    assert!(matches!(s.relayed.await.unwrap(), RelayEnd::Aborted));
}

#[tokio::test]
async fn the_backends_last_words_reach_the_client_when_it_closes() {
    let ring = ring();
    let mut s = session(&ring, b'I', &Shutdown::default());
    let fatal = frame::error_response(frame::Severity::Fatal, "57P01", "admin shutdown").to_vec();
    s.backend.write_all(&fatal).await.unwrap();
    drop(s.backend);
    let mut out = Vec::new();
    s.client.read_to_end(&mut out).await.unwrap();
    assert_eq!(out, fatal);
    assert!(matches!(s.relayed.await.unwrap(), RelayEnd::BackendClosed));
}
