//! The relay: bytes flow both ways as soon as they are read, never decoded and
//! re-encoded. A [`FrameScanner`] per direction follows message boundaries so
//! the proxy knows what the session is doing: how many requests (Query, Sync,
//! FunctionCall) await their ReadyForQuery, and the transaction status that
//! the last ReadyForQuery reported. The write path hooks in at exactly those
//! points.
//!
//! The two directions run concurrently and independently: a client that
//! pipelines without reading must not deadlock against a backend that is
//! writing results, which is what a single read-then-write loop would do.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::sql::StatementTracker;
use crate::wire::frame::{self, Direction, FrameError, FrameScanner, Severity};
use crate::wire::stamp::{Injector, ReadyLog, ReplyEvent, ReplyTracker, Unit, Verdict};

const READ_CHUNK: usize = 32 * 1024;

/// Transaction status from ReadyForQuery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxStatus {
    Idle,
    InTransaction,
    Failed,
}

impl TxStatus {
    pub fn from_byte(b: u8) -> Option<TxStatus> {
        match b {
            b'I' => Some(TxStatus::Idle),
            b'T' => Some(TxStatus::InTransaction),
            b'E' => Some(TxStatus::Failed),
            _ => None,
        }
    }
}

/// Shutdown signals shared by a proxy and its sessions.
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    /// Stop accepting; close each session once it is idle between transactions.
    pub drain: CancellationToken,
    /// Close every session now.
    pub abort: CancellationToken,
}

/// What both directions of one session share.
#[derive(Debug)]
pub struct SessionState {
    tx_status: AtomicU8,
    /// Requests sent to the backend whose ReadyForQuery has not reached the client.
    outstanding: AtomicI64,
    /// Signalled after every ReadyForQuery reaches the client.
    ready: Notify,
    /// Messages awaiting an answer, client's and injected, in stream order.
    units: Mutex<VecDeque<Unit>>,
    /// ReadyForQuery answers to client messages so far.
    ready_count: AtomicU64,
    /// Number of the last of those whose status was not 'T'.
    last_closed: AtomicU64,
    /// 1 + the newest confirmed generation of the injected statement (0: none).
    statement_ready: AtomicU64,
}

impl SessionState {
    pub fn new(initial_status: u8) -> SessionState {
        SessionState {
            tx_status: AtomicU8::new(initial_status),
            outstanding: AtomicI64::new(0),
            ready: Notify::new(),
            units: Mutex::new(VecDeque::new()),
            ready_count: AtomicU64::new(0),
            last_closed: AtomicU64::new(0),
            statement_ready: AtomicU64::new(0),
        }
    }

    pub fn tx_status(&self) -> Option<TxStatus> {
        TxStatus::from_byte(self.tx_status.load(Ordering::Acquire))
    }

    /// No transaction open and nothing in flight: safe to close on drain.
    pub fn is_idle(&self) -> bool {
        self.outstanding.load(Ordering::Acquire) == 0 && self.tx_status() == Some(TxStatus::Idle)
    }

    async fn wait_idle(&self) {
        loop {
            let notified = self.ready.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.is_idle() {
                return;
            }
            notified.await;
        }
    }

    fn units(&self) -> MutexGuard<'_, VecDeque<Unit>> {
        self.units.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl ReadyLog for SessionState {
    fn ready_count(&self) -> u64 {
        self.ready_count.load(Ordering::Acquire)
    }

    fn last_closed(&self) -> u64 {
        self.last_closed.load(Ordering::Acquire)
    }

    fn last_status(&self) -> u8 {
        self.tx_status.load(Ordering::Acquire)
    }

    fn statement_ready(&self) -> Option<u32> {
        match self.statement_ready.load(Ordering::Acquire) {
            0 => None,
            g => Some((g - 1) as u32),
        }
    }
}

/// How a relayed session ended.
#[derive(Debug)]
pub enum RelayEnd {
    /// The client sent Terminate (forwarded) or closed its connection.
    ClientClosed,
    /// The backend closed; whatever it said last was forwarded.
    BackendClosed,
    /// The client broke the protocol; it was sent a FATAL 08P01.
    ClientProtocolError(FrameError),
    /// Drain reached this session while idle; it was told to reconnect.
    Drained,
    /// Shutdown without waiting.
    Aborted,
    /// The transaction stamp could not be set; the client was told why and
    /// the backend session (with its open transaction) was ended.
    StampFailed { code: String, message: String },
}

enum Pumped {
    Closed,
    Io,
    Protocol(FrameError),
    StampFailed { code: String, message: String },
}

/// Stamping for a relayed session: the region's clock and where to count stamps.
pub struct Stamping<'a> {
    pub clock: Arc<Clock>,
    pub injected: &'a AtomicU64,
}

/// Relays until either side closes, the client errs, or shutdown says stop.
/// With `stamping`, writing transactions are stamped (see `wire::stamp`).
pub async fn relay<C, B>(
    client: C,
    backend: B,
    state: &SessionState,
    statements: &mut StatementTracker,
    stamping: Option<Stamping<'_>>,
    max_message: u32,
    shutdown: &Shutdown,
) -> RelayEnd
where
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (mut client_rx, mut client_tx) = tokio::io::split(client);
    let (mut backend_rx, mut backend_tx) = tokio::io::split(backend);
    let counter = stamping.as_ref().map(|s| s.injected);
    let mut injector = Injector::new(stamping.as_ref().map(|s| s.clock.clone()));
    let end = tokio::select! {
        up = client_to_backend(&mut client_rx, &mut backend_tx, state, statements, &mut injector, counter, max_message) => match up {
            Pumped::Protocol(e) => RelayEnd::ClientProtocolError(e),
            Pumped::StampFailed { code, message } => RelayEnd::StampFailed { code, message },
            Pumped::Closed | Pumped::Io => RelayEnd::ClientClosed,
        },
        down = backend_to_client(&mut backend_rx, &mut client_tx, state) => match down {
            Pumped::StampFailed { code, message } => RelayEnd::StampFailed { code, message },
            _ => RelayEnd::BackendClosed,
        },
        _ = async { shutdown.drain.cancelled().await; state.wait_idle().await } => RelayEnd::Drained,
        _ = shutdown.abort.cancelled() => RelayEnd::Aborted,
    };
    let farewell = match &end {
        RelayEnd::ClientProtocolError(e) => Some(frame::error_response(
            Severity::Fatal,
            "08P01",
            &e.to_string(),
        )),
        RelayEnd::Drained | RelayEnd::Aborted => Some(frame::error_response(
            Severity::Fatal,
            "57P01",
            "terminating connection because meridian is shutting down; reconnect",
        )),
        RelayEnd::StampFailed { code, message } => Some(frame::error_response(
            Severity::Fatal,
            if code.len() == 5 { code } else { "XX000" },
            &format!(
                "meridian could not stamp the transaction for replication ({message}); \
                 the session is closed and its open transaction rolled back"
            ),
        )),
        RelayEnd::ClientClosed | RelayEnd::BackendClosed => None,
    };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), async {
        if let Some(msg) = farewell {
            let _ = client_tx.write_all(&msg).await;
        }
        let _ = client_tx.shutdown().await;
        let _ = backend_tx.write_all(&frame::TERMINATE).await;
        let _ = backend_tx.shutdown().await;
    })
    .await;
    end
}

/// Output assembly for one chunk: bytes are written straight from the read
/// buffer unless something is injected, dropped or held back, in which case
/// they are gathered in `out`.
struct Assembly<'a> {
    chunk: &'a [u8],
    out: &'a mut BytesMut,
    /// Chunk bytes before this offset are in `out` or dropped.
    flushed: usize,
    /// Start of the next message in the chunk.
    next_start: usize,
    /// The first message to complete began in an earlier chunk.
    continued: bool,
}

impl<'a> Assembly<'a> {
    fn new(chunk: &'a [u8], out: &'a mut BytesMut, continued: bool) -> Self {
        out.clear();
        Assembly {
            chunk,
            out,
            flushed: 0,
            next_start: 0,
            continued,
        }
    }

    /// Start offset in this chunk of the message that just completed, or None
    /// if it began in an earlier chunk.
    fn start(&self) -> Option<usize> {
        (!(self.continued && self.next_start == 0)).then_some(self.next_start)
    }

    /// Moves chunk bytes up to `at` into `out`.
    fn take_until(&mut self, at: usize) {
        if at > self.flushed {
            self.out.extend_from_slice(&self.chunk[self.flushed..at]);
            self.flushed = at;
        }
    }

    fn completed(&mut self, end: usize) {
        self.next_start = end;
        self.continued = false;
    }

    /// Offset where the unfinished message at the chunk's end starts (the
    /// chunk's end when none is unfinished).
    fn tail_start(&self, at_boundary: bool) -> usize {
        if at_boundary {
            self.chunk.len()
        } else {
            self.next_start
        }
    }

    /// The bytes to write: `chunk[..upto]` with everything gathered.
    fn finish(mut self, upto: usize) -> &'a [u8] {
        if self.out.is_empty() && self.flushed == 0 {
            return &self.chunk[..upto];
        }
        self.take_until(upto);
        &self.out[..]
    }
}

/// Whether a client message is held back until complete: the proxy may have
/// to inject before it.
fn held_client_tag(tag: u8) -> bool {
    matches!(tag, b'Q' | b'E')
}

async fn client_to_backend<R, W>(
    rx: &mut R,
    tx: &mut W,
    state: &SessionState,
    statements: &mut StatementTracker,
    injector: &mut Injector,
    counter: Option<&AtomicU64>,
    max_message: u32,
) -> Pumped
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut scanner =
        FrameScanner::new(Direction::Frontend, max_message, frame::capture_statements);
    let mut buf = vec![0u8; READ_CHUNK];
    let mut out = BytesMut::with_capacity(READ_CHUNK + 512);
    let mut inject = BytesMut::with_capacity(512);
    // The beginning of a Query or Execute not yet complete.
    let mut held: Vec<u8> = Vec::new();
    loop {
        let n = match rx.read(&mut buf).await {
            Ok(0) | Err(_) => return Pumped::Closed,
            Ok(n) => n,
        };
        let chunk = &buf[..n];
        let continued_held = !scanner.at_boundary() && !held.is_empty();
        let (mut requests, mut terminate) = (0, false);
        let injected_before = injector.injected;
        let mut asm = Assembly::new(chunk, &mut out, !scanner.at_boundary());
        let scanned = {
            let mut units = state.units();
            scanner.scan(chunk, |m| {
                let body = m.body.unwrap_or_default();
                let start = asm.start();
                inject.clear();
                match m.tag {
                    b'Q' | b'S' | b'F' => requests += 1,
                    b'X' => terminate = true,
                    _ => {}
                }
                injector.on_message(m.tag, body, statements, state, &mut inject, &mut units);
                match start {
                    Some(s) if !inject.is_empty() => {
                        asm.take_until(s);
                        asm.out.extend_from_slice(&inject);
                    }
                    Some(_) => {}
                    None if continued_held => {
                        // Injection (if any) goes before the held beginning.
                        asm.out.extend_from_slice(&inject);
                        asm.out.extend_from_slice(&held);
                        held.clear();
                    }
                    None => {}
                }
                asm.completed(m.end);
            })
        };
        if let Err(e) = scanned {
            return Pumped::Protocol(e);
        }
        let upto = match scanner.pending_tag() {
            Some(tag) if held_client_tag(tag) => {
                let tail = asm.tail_start(false);
                if asm.start().is_none() {
                    // Still inside the message that began earlier.
                    held.extend_from_slice(chunk);
                    0
                } else {
                    held.extend_from_slice(&chunk[tail..]);
                    tail
                }
            }
            _ => n,
        };
        if let Some(c) = counter {
            c.fetch_add(injector.injected - injected_before, Ordering::Relaxed);
        }
        if requests > 0 {
            // Counted before forwarding, so the reply cannot overtake the count.
            state.outstanding.fetch_add(requests, Ordering::AcqRel);
        }
        let bytes = asm.finish(upto);
        if !bytes.is_empty() && tx.write_all(bytes).await.is_err() {
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
    // The backend is trusted; the limit only guards against a corrupt stream.
    let mut scanner = FrameScanner::new(
        Direction::Backend,
        u32::MAX,
        frame::capture_ready_and_errors,
    );
    let mut tracker = ReplyTracker::default();
    let mut buf = vec![0u8; READ_CHUNK];
    let mut out = BytesMut::with_capacity(READ_CHUNK);
    // The beginning of a reply that may be swallowed, not yet complete.
    let mut held: Vec<u8> = Vec::new();
    loop {
        let n = match rx.read(&mut buf).await {
            Ok(0) | Err(_) => return Pumped::Closed,
            Ok(n) => n,
        };
        let chunk = &buf[..n];
        let continued_held = !scanner.at_boundary() && !held.is_empty();
        let mut asm = Assembly::new(chunk, &mut out, !scanner.at_boundary());
        let (mut ready, mut status, mut failed) = (0, None, None);
        let (scanned, hold_tail) = {
            let mut units = state.units();
            let scanned = scanner.scan(chunk, |m| {
                let start = asm.start();
                let (verdict, event) = tracker.on_reply(&mut units, m.tag, m.body);
                match (verdict, start) {
                    (Verdict::Forward, None) if continued_held => {
                        asm.out.extend_from_slice(&held);
                        held.clear();
                    }
                    (Verdict::Forward, _) => {}
                    (Verdict::Swallow, Some(s)) => {
                        asm.take_until(s);
                        asm.flushed = m.end;
                    }
                    (Verdict::Swallow, None) => {
                        held.clear();
                        asm.flushed = m.end;
                    }
                }
                match event {
                    Some(ReplyEvent::ClientReady(s)) => {
                        ready += 1;
                        status = Some(s);
                        if s != b'T' {
                            let number = state.ready_count.load(Ordering::Acquire) + ready;
                            state.last_closed.store(number, Ordering::Release);
                        }
                    }
                    Some(ReplyEvent::StatementReady(generation)) => {
                        state
                            .statement_ready
                            .fetch_max(u64::from(generation) + 1, Ordering::AcqRel);
                    }
                    Some(ReplyEvent::StampFailed { code, message }) if failed.is_none() => {
                        failed = Some((code, message));
                    }
                    Some(ReplyEvent::StampFailed { .. }) => {}
                    None => {}
                }
                asm.completed(m.end);
            });
            let hold_tail = !scanner.at_boundary() && tracker.front_is_ours(&mut units);
            (scanned, hold_tail)
        };
        if let Err(e) = scanned {
            return Pumped::Protocol(e);
        }
        let upto = if hold_tail || (continued_held && asm.start().is_none()) {
            if asm.start().is_none() {
                held.extend_from_slice(chunk);
                0
            } else {
                let tail = asm.tail_start(false);
                held.extend_from_slice(&chunk[tail..]);
                tail
            }
        } else {
            n
        };
        let bytes = asm.finish(upto);
        if !bytes.is_empty() && tx.write_all(bytes).await.is_err() {
            return Pumped::Io;
        }
        if let Some(s) = status {
            state.tx_status.store(s, Ordering::Release);
            state.ready_count.fetch_add(ready, Ordering::AcqRel);
            state.outstanding.fetch_sub(ready as i64, Ordering::AcqRel);
            state.ready.notify_waiters();
        }
        if let Some((code, message)) = failed {
            tracing::error!(%code, %message, "injected transaction stamp failed; closing the session");
            return Pumped::StampFailed { code, message };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tokio::io::{duplex, DuplexStream};

    use crate::sql::{ClassifierCache, StatementCounts};

    fn tracker() -> StatementTracker {
        StatementTracker::new(
            Arc::new(ClassifierCache::new(16)),
            Arc::new(StatementCounts::default()),
        )
    }

    /// The relay under test with a fresh statement tracker and a 1 MiB message limit.
    async fn run(
        client: DuplexStream,
        backend: DuplexStream,
        state: &SessionState,
        shutdown: &Shutdown,
    ) -> RelayEnd {
        relay(
            client,
            backend,
            state,
            &mut tracker(),
            None,
            1 << 20,
            shutdown,
        )
        .await
    }

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        frame::encode(tag, body).to_vec()
    }

    /// Protocol test over in-memory pipes: bytes pass unchanged, status is tracked.
    #[tokio::test]
    async fn relays_unchanged_and_tracks_transaction_status() {
        let (client_end, proxy_client) = duplex(1024);
        let (proxy_backend, backend_end) = duplex(1024);
        let state = SessionState::new(b'I');
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
        let state = SessionState::new(b'I');
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

    #[tokio::test]
    async fn drain_waits_for_the_open_transaction() {
        let (mut client_end, proxy_client) = duplex(1024);
        let (proxy_backend, mut backend_end) = duplex(1024);
        let state = SessionState::new(b'T');
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

    /// Protocol test: a prepared write is stamped between the client's Bind and
    /// Execute, every reply to the injection is swallowed, and this holds
    /// however the streams are cut (one byte at a time up to whole messages).
    #[tokio::test]
    async fn injection_is_invisible_to_the_client_however_the_stream_is_cut() {
        for capacity in [1, 2, 3, 5, 8, 13, 21, 64, 4096] {
            injection_is_invisible(capacity).await;
        }
    }

    async fn injection_is_invisible(capacity: usize) {
        let (mut client_end, proxy_client) = duplex(capacity);
        let (proxy_backend, mut backend_end) = duplex(capacity);
        let state = SessionState::new(b'I');
        let shutdown = Shutdown::default();
        let clock = Arc::new(Clock::start(0, crate::clock::DEFAULT_MAX_DRIFT));
        let injected = AtomicU64::new(0);
        let script = async {
            let mut parse = msg(b'P', b"s1\0INSERT INTO t VALUES (1)\0\0\0");
            parse.extend(msg(b'S', b""));
            let (w, got) = tokio::join!(
                client_end.write_all(&parse),
                read_messages(&mut backend_end, 2, Direction::Frontend)
            );
            w.unwrap();
            assert_eq!(got, parse);
            let mut reply = msg(b'1', b"");
            reply.extend(msg(b'Z', b"I"));
            let (w, got) = tokio::join!(
                backend_end.write_all(&reply),
                read_messages(&mut client_end, 2, Direction::Backend)
            );
            w.unwrap();
            assert_eq!(got, reply);

            let mut exec = msg(b'B', b"\0s1\0\0\0\0\0\0\0");
            exec.extend(msg(b'E', b"\0\0\0\0\0"));
            exec.extend(msg(b'S', b""));
            let (w, sent) = tokio::join!(
                client_end.write_all(&exec),
                read_messages(&mut backend_end, 7, Direction::Frontend)
            );
            w.unwrap();
            assert_eq!(scan_tags(&sent, Direction::Frontend), b"BPBECES");
            let mut replies = Vec::new();
            for (tag, body) in [
                (b'2', &b""[..]),
                (b'1', b""),
                (b'2', b""),
                (b'D', b"\0\x01\0\0\0\x011"),
                (b'C', b"SELECT 1\0"),
                (b'3', b""),
                (b'C', b"INSERT 0 1\0"),
                (b'Z', b"I"),
            ] {
                replies.extend(msg(tag, body));
            }
            let (w, got) = tokio::join!(
                backend_end.write_all(&replies),
                read_messages(&mut client_end, 3, Direction::Backend)
            );
            w.unwrap();
            let mut expected = msg(b'2', b"");
            expected.extend(msg(b'C', b"INSERT 0 1\0"));
            expected.extend(msg(b'Z', b"I"));
            assert_eq!(got, expected);
            let (mut rest, terminate) = (Vec::new(), msg(b'X', b""));
            let (w, _) = tokio::join!(
                client_end.write_all(&terminate),
                backend_end.read_to_end(&mut rest)
            );
            w.unwrap();
        };
        let mut statements = tracker();
        let relayed = async {
            let end = relay(
                proxy_client,
                proxy_backend,
                &state,
                &mut statements,
                Some(Stamping {
                    clock,
                    injected: &injected,
                }),
                1 << 20,
                &shutdown,
            )
            .await;
            end
        };
        let (end, ()) = tokio::join!(relayed, script);
        assert!(matches!(end, RelayEnd::ClientClosed), "{end:?}");
        assert_eq!(injected.load(Ordering::Relaxed), 1);
    }

    /// Protocol test: an injected stamp that fails for a reason other than an
    /// aborted transaction ends the session with FATAL and the original
    /// SQLSTATE; the client never sees the answer to its own write.
    #[tokio::test]
    async fn a_failed_stamp_ends_the_session_with_a_clear_fatal_error() {
        let (mut client_end, proxy_client) = duplex(4096);
        let (proxy_backend, mut backend_end) = duplex(4096);
        let state = SessionState::new(b'I');
        let clock = Arc::new(Clock::start(0, crate::clock::DEFAULT_MAX_DRIFT));
        let injected = AtomicU64::new(0);
        let script = async {
            client_end
                .write_all(&msg(b'Q', b"INSERT INTO t VALUES (1)\0"))
                .await
                .unwrap();
            // Parse, Bind, Execute, Close, Sync of the stamp, then the Query.
            let sent = read_messages(&mut backend_end, 6, Direction::Frontend).await;
            assert_eq!(scan_tags(&sent, Direction::Frontend), b"PBECSQ");
            let mut error = Vec::new();
            for (f, v) in [
                (b'S', "ERROR"),
                (b'C', "57014"),
                (b'M', "canceling statement due to statement timeout"),
            ] {
                error.push(f);
                error.extend_from_slice(v.as_bytes());
                error.push(0);
            }
            error.push(0);
            let mut replies = msg(b'1', b"");
            replies.extend(msg(b'2', b""));
            replies.extend(msg(b'E', &error));
            backend_end.write_all(&replies).await.unwrap();
            let mut out = Vec::new();
            client_end.read_to_end(&mut out).await.unwrap();
            out
        };
        let mut statements = tracker();
        let stamping = Some(Stamping {
            clock,
            injected: &injected,
        });
        let shutdown = Shutdown::default();
        let (end, out) = tokio::join!(
            relay(
                proxy_client,
                proxy_backend,
                &state,
                &mut statements,
                stamping,
                1 << 20,
                &shutdown
            ),
            script
        );
        assert!(
            matches!(&end, RelayEnd::StampFailed { code, .. } if code == "57014"),
            "{end:?}"
        );
        assert_eq!(
            scan_tags(&out, Direction::Backend),
            b"E",
            "only the FATAL reaches the client"
        );
        let text = String::from_utf8_lossy(&out);
        assert!(text.contains("FATAL") && text.contains("57014"), "{text}");
        assert!(text.contains("could not stamp the transaction"), "{text}");
    }
}
