//! The relay's tokio transport: one task per session drives both
//! directions as futures over any `AsyncRead + AsyncWrite` (TLS clients,
//! in-memory test streams, and plain sockets where io_uring is not used).

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::FIRST_READ;
use super::{
    farewell, resize_read, BackendSide, ClientError, ClientSide, RelayEnd, RelayParts, SessionState,
};
use crate::shutdown::Shutdown;
use crate::sql::StatementTracker;

/// Holds the last read: its length is how much that read got.
struct ReadBuf {
    buf: Vec<u8>,
}

impl ReadBuf {
    fn new() -> ReadBuf {
        ReadBuf {
            buf: Vec::with_capacity(FIRST_READ),
        }
    }

    /// Reads what the socket has, up to the buffer's size; empty at the end.
    async fn fill<R: AsyncRead + Unpin>(&mut self, rx: &mut R) -> std::io::Result<&[u8]> {
        if let Some(size) = resize_read(self.buf.len(), self.buf.capacity()) {
            self.buf = Vec::with_capacity(size);
        }
        self.buf.clear();
        rx.read_buf(&mut self.buf).await?;
        Ok(&self.buf)
    }
}

enum Pumped {
    Closed,
    Io,
    Client(ClientError),
}

/// Relays until either side closes, the client errs, or shutdown says stop.
pub async fn relay<C, B>(client: C, backend: B, parts: RelayParts, shutdown: &Shutdown) -> RelayEnd
where
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let RelayParts {
        state,
        mut statements,
        max_message,
    } = parts;
    let (mut client_rx, mut client_tx) = tokio::io::split(client);
    let (mut backend_rx, mut backend_tx) = tokio::io::split(backend);
    let end = tokio::select! {
        up = client_to_backend(&mut client_rx, &mut backend_tx, &state, &mut statements, max_message) => match up {
            Pumped::Client(e) => e.into(),
            Pumped::Closed | Pumped::Io => RelayEnd::ClientClosed,
        },
        _ = backend_to_client(&mut backend_rx, &mut client_tx, &state) => RelayEnd::BackendClosed,
        _ = async { shutdown.drain.cancelled().await; state.wait_idle().await } => RelayEnd::Drained,
        _ = shutdown.abort.cancelled() => RelayEnd::Aborted,
    };
    farewell(&end, &mut client_tx, &mut backend_tx).await;
    end
}

async fn client_to_backend<R, W>(
    rx: &mut R,
    tx: &mut W,
    state: &SessionState,
    statements: &mut StatementTracker,
    max_message: u32,
) -> Pumped
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut side = ClientSide::new(max_message);
    let mut buf = ReadBuf::new();
    loop {
        let chunk = match buf.fill(rx).await {
            Ok([]) | Err(_) => return Pumped::Closed,
            Ok(chunk) => chunk,
        };
        let terminate = match side.scan(chunk, state, statements) {
            Ok(t) => t,
            Err(e) => return Pumped::Client(e),
        };
        if tx.write_all(chunk).await.is_err() {
            return Pumped::Io;
        }
        if terminate {
            return Pumped::Closed;
        }
    }
}

async fn backend_to_client<R, W>(rx: &mut R, tx: &mut W, state: &SessionState) -> Pumped
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut side = BackendSide::new();
    let mut buf = ReadBuf::new();
    loop {
        let chunk = match buf.fill(rx).await {
            Ok([]) | Err(_) => return Pumped::Closed,
            Ok(chunk) => chunk,
        };
        let replies = match side.scan(chunk) {
            Ok(r) => r,
            Err(e) => return Pumped::Client(e.into()),
        };
        if tx.write_all(chunk).await.is_err() {
            return Pumped::Io;
        }
        state.delivered(replies);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tokio::io::{duplex, DuplexStream};

    use crate::sql::StatementCounts;
    use crate::wire::frame::{self, Direction, FrameError, FrameScanner};
    use crate::wire::relay::TxStatus;

    /// The relay under test with a fresh statement tracker and a 1 MiB message limit.
    async fn run(
        client: DuplexStream,
        backend: DuplexStream,
        state: &Arc<SessionState>,
        shutdown: &Shutdown,
    ) -> RelayEnd {
        let parts = RelayParts {
            state: state.clone(),
            statements: StatementTracker::new(Arc::new(StatementCounts::default())),
            max_message: 1 << 20,
        };
        relay(client, backend, parts, shutdown).await
    }

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        frame::encode(tag, body).to_vec()
    }

    #[tokio::test]
    async fn read_buffers_grow_while_reads_fill_them_and_shrink_after() {
        let (mut tx, mut rx) = duplex(256 * 1024);
        tx.write_all(&vec![7u8; 100 * 1024]).await.unwrap();
        let mut buf = ReadBuf::new();
        let mut sizes = Vec::new();
        let mut total = 0;
        while total < 100 * 1024 {
            let n = buf.fill(&mut rx).await.unwrap().len();
            sizes.push(n);
            total += n;
        }
        assert_eq!(&sizes[..5], [4096, 8192, 16384, 32768, 32768]);
        tx.write_all(b"small").await.unwrap();
        assert_eq!(buf.fill(&mut rx).await.unwrap(), b"small");
        tx.write_all(b"again").await.unwrap();
        assert_eq!(buf.fill(&mut rx).await.unwrap(), b"again");
        assert_eq!(buf.buf.capacity(), FIRST_READ, "back to its first size");
    }

    /// Protocol test over in-memory pipes: bytes pass unchanged, status is tracked.
    #[tokio::test]
    async fn relays_unchanged_and_tracks_transaction_status() {
        let (client_end, proxy_client) = duplex(1024);
        let (proxy_backend, backend_end) = duplex(1024);
        let state = Arc::new(SessionState::new(b'I'));
        let shutdown = Shutdown::default();
        let (mut client_end, mut backend_end) = (client_end, backend_end);
        let script = async {
            let query = msg(b'Q', b"BEGIN\0");
            client_end.write_all(&query).await.unwrap();
            let mut got = vec![0u8; query.len()];
            backend_end.read_exact(&mut got).await.unwrap();
            assert_eq!(got, query);
            let mut reply = msg(b'C', b"BEGIN\0");
            reply.extend(msg(b'Z', b"T"));
            backend_end.write_all(&reply).await.unwrap();
            let mut got = vec![0u8; reply.len()];
            client_end.read_exact(&mut got).await.unwrap();
            assert_eq!(got, reply);
            // The backend's write completes before the state update; poll briefly for it.
            for _ in 0..100 {
                if state.tx_status() == Some(TxStatus::InTransaction) {
                    break;
                }
                tokio::task::yield_now().await;
            }
            assert_eq!(state.tx_status(), Some(TxStatus::InTransaction));
            assert!(!state.is_idle());
            client_end.write_all(&msg(b'X', b"")).await.unwrap();
        };
        let (end, ()) = tokio::join!(run(proxy_client, proxy_backend, &state, &shutdown), script);
        assert!(matches!(end, RelayEnd::ClientClosed), "{end:?}");
    }

    #[tokio::test]
    async fn garbage_from_client_gets_fatal_08p01() {
        let (mut client_end, proxy_client) = duplex(1024);
        let (proxy_backend, _backend_end) = duplex(1024);
        let state = Arc::new(SessionState::new(b'I'));
        client_end
            .write_all(b"\xde\xad\xbe\xef garbage")
            .await
            .unwrap();
        let end = run(proxy_client, proxy_backend, &state, &Shutdown::default()).await;
        assert!(matches!(
            end,
            RelayEnd::ClientProtocolError(FrameError::UnknownTag(0xde))
        ));
        let mut reply = Vec::new();
        client_end.read_to_end(&mut reply).await.unwrap();
        assert_eq!(reply[0], b'E');
        assert!(reply.windows(6).any(|w| w == b"08P01\0"));
    }

    /// A refused statement split over two writes: its first part may reach
    /// the backend, its end never does, and the client is told why.
    #[tokio::test]
    async fn a_meridian_setting_is_refused_with_42501_before_the_backend_has_it_whole() {
        let (mut client_end, proxy_client) = duplex(1024);
        let (proxy_backend, mut backend_end) = duplex(1024);
        let state = Arc::new(SessionState::new(b'I'));
        let query = msg(b'Q', b"SELECT 1; SET meridian.applying = on\0");
        let (head, tail) = query.split_at(12);
        let script = async {
            client_end.write_all(head).await.unwrap();
            let mut got = vec![0u8; head.len()];
            backend_end.read_exact(&mut got).await.unwrap();
            client_end.write_all(tail).await.unwrap();
        };
        let shutdown = Shutdown::default();
        let (end, ()) = tokio::join!(run(proxy_client, proxy_backend, &state, &shutdown), script);
        assert!(matches!(end, RelayEnd::Refused(_)), "{end:?}");
        let mut reply = Vec::new();
        client_end.read_to_end(&mut reply).await.unwrap();
        assert!(reply.windows(6).any(|w| w == b"42501\0"));
        let text = String::from_utf8_lossy(&reply);
        assert!(text.contains("meridian.applying"), "{text}");
        let mut rest = Vec::new();
        backend_end.read_to_end(&mut rest).await.unwrap();
        assert_eq!(
            rest,
            frame::TERMINATE,
            "the backend got Terminate, not the query's end"
        );
    }

    #[tokio::test]
    async fn drain_waits_for_the_open_transaction() {
        let (mut client_end, proxy_client) = duplex(1024);
        let (proxy_backend, mut backend_end) = duplex(1024);
        let state = Arc::new(SessionState::new(b'T'));
        let shutdown = Shutdown::default();
        shutdown.drain.cancel();
        let script = async {
            // In a transaction: the session must stay up for the COMMIT.
            client_end.write_all(&msg(b'Q', b"COMMIT\0")).await.unwrap();
            let mut got = vec![0u8; 12];
            backend_end.read_exact(&mut got).await.unwrap();
            let mut reply = msg(b'C', b"COMMIT\0");
            reply.extend(msg(b'Z', b"I"));
            backend_end.write_all(&reply).await.unwrap();
            let mut out = Vec::new();
            client_end.read_to_end(&mut out).await.unwrap();
            out
        };
        let (end, out) = tokio::join!(run(proxy_client, proxy_backend, &state, &shutdown), script);
        assert!(matches!(end, RelayEnd::Drained), "{end:?}");
        assert!(
            out.starts_with(&msg(b'C', b"COMMIT\0")),
            "COMMIT reply must reach the client first"
        );
        assert!(out.windows(6).any(|w| w == b"57P01\0"));
    }

    fn scan_tags(bytes: &[u8], direction: Direction) -> Vec<u8> {
        let mut s = FrameScanner::new(direction, u32::MAX, frame::capture_none);
        let mut tags = Vec::new();
        s.scan(bytes, |m| tags.push(m.tag)).unwrap();
        tags
    }

    async fn read_messages(from: &mut DuplexStream, count: usize, direction: Direction) -> Vec<u8> {
        let mut got = Vec::new();
        let mut byte = [0u8; 1];
        while scan_tags(&got, direction).len() < count {
            from.read_exact(&mut byte).await.unwrap();
            got.push(byte[0]);
        }
        got
    }

    /// Protocol test: a prepared write and its replies pass byte for byte,
    /// however the streams are cut (one byte at a time up to whole
    /// messages), and the status follows the last ReadyForQuery.
    #[tokio::test]
    async fn bytes_pass_unchanged_however_the_stream_is_cut() {
        for capacity in [1, 2, 3, 5, 8, 13, 21, 64, 4096] {
            bytes_pass_unchanged(capacity).await;
        }
    }

    async fn bytes_pass_unchanged(capacity: usize) {
        let (mut client_end, proxy_client) = duplex(capacity);
        let (proxy_backend, mut backend_end) = duplex(capacity);
        let state = Arc::new(SessionState::new(b'I'));
        let shutdown = Shutdown::default();
        let script = async {
            let mut request = msg(b'P', b"s1\0INSERT INTO t VALUES (1)\0\0\0");
            request.extend(msg(b'B', b"\0s1\0\0\0\0\0\0\0"));
            request.extend(msg(b'E', b"\0\0\0\0\0"));
            request.extend(msg(b'S', b""));
            let (w, got) = tokio::join!(
                client_end.write_all(&request),
                read_messages(&mut backend_end, 4, Direction::Frontend)
            );
            w.unwrap();
            assert_eq!(got, request);
            let mut reply = Vec::new();
            for (tag, body) in [
                (b'1', &b""[..]),
                (b'2', b""),
                (b'C', b"INSERT 0 1\0"),
                (b'Z', b"T"),
            ] {
                reply.extend(msg(tag, body));
            }
            let (w, got) = tokio::join!(
                backend_end.write_all(&reply),
                read_messages(&mut client_end, 4, Direction::Backend)
            );
            w.unwrap();
            assert_eq!(got, reply);
            let (mut rest, terminate) = (Vec::new(), msg(b'X', b""));
            let (w, _) = tokio::join!(
                client_end.write_all(&terminate),
                backend_end.read_to_end(&mut rest)
            );
            w.unwrap();
            assert!(rest.starts_with(&terminate));
        };
        let (end, ()) = tokio::join!(run(proxy_client, proxy_backend, &state, &shutdown), script);
        assert!(matches!(end, RelayEnd::ClientClosed), "{end:?}");
        assert_eq!(state.tx_status(), Some(TxStatus::InTransaction));
    }
}
