//! The relay: bytes flow both ways as soon as they are read, never decoded,
//! re-encoded or held back. A frame scanner per direction follows message
//! boundaries so the proxy knows what the session is doing: how many
//! requests (Query, Sync, FunctionCall) await their ReadyForQuery, the
//! transaction status the last ReadyForQuery reported (drain closes a
//! session only between transactions), and which statements the client
//! runs (counted by class).
//!
//! What a chunk means is decided here, with no I/O ([`ClientSide`],
//! [`BackendSide`], [`SessionState`]); moving the bytes is a transport's
//! job. There are two, because the cheapest one cannot carry everything:
//! - [`pumps`]: tokio tasks over any `AsyncRead + AsyncWrite`, for TLS
//!   clients, in-memory test streams, and kernels without io_uring;
//! - [`ring`]: one io_uring per relay thread for plain sockets, which cuts
//!   the proxy's CPU per query below PgBouncer's on a small machine
//!   (BENCHMARKS.md, issue 14).
//!
//! Either way both directions run independently: a client that pipelines
//! without reading must not deadlock against a backend that is writing
//! results, which is what a single read-then-write loop would do.

pub mod pumps;
pub mod ring;

use std::sync::atomic::{AtomicI64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;

use crate::shutdown::Shutdown;
use crate::sql::guard::{self, Refusal};
use crate::sql::StatementTracker;
use crate::wire::frame::{self, views, Direction, FrameError, FrameScanner, Severity};
use crate::wire::stream::IntoSocket;

pub use ring::{Ring, RingError, Rings};

/// A direction's read buffer starts at FIRST_READ and doubles up to
/// READ_CHUNK while reads fill it (large results, COPY), back to FIRST_READ
/// once they are small again: a fixed 32 KiB per direction was resident in
/// every session, 72 kB per idle session against PgBouncer's 8 kB
/// (benches/scripts/idle_sessions.sh).
pub(crate) const FIRST_READ: usize = 4 * 1024;
pub(crate) const READ_CHUNK: usize = 32 * 1024;

/// The size of the next read's buffer, given the last read's length and the
/// buffer's size; `None` keeps the buffer as it is.
pub(crate) fn resize_read(last: usize, size: usize) -> Option<usize> {
    if last == size && size < READ_CHUNK {
        Some(size * 2)
    } else if last <= FIRST_READ / 2 && size > FIRST_READ {
        Some(FIRST_READ)
    } else {
        None
    }
}

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

/// What both directions of one session share, and the session's task reads.
#[derive(Debug)]
pub struct SessionState {
    tx_status: AtomicU8,
    /// Requests sent to the backend whose ReadyForQuery has not reached the client.
    outstanding: AtomicI64,
    /// Signalled after every ReadyForQuery reaches the client.
    ready: Notify,
}

impl SessionState {
    pub fn new(initial_status: u8) -> SessionState {
        SessionState {
            tx_status: AtomicU8::new(initial_status),
            outstanding: AtomicI64::new(0),
            ready: Notify::new(),
        }
    }

    pub fn tx_status(&self) -> Option<TxStatus> {
        TxStatus::from_byte(self.tx_status.load(Ordering::Acquire))
    }

    /// Requests whose ReadyForQuery has not reached the client yet.
    pub fn outstanding(&self) -> i64 {
        self.outstanding.load(Ordering::Acquire)
    }

    /// No transaction open and nothing in flight: safe to close on drain.
    pub fn is_idle(&self) -> bool {
        self.outstanding() == 0 && self.tx_status() == Some(TxStatus::Idle)
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

    /// Replies scanned by [`BackendSide`] have reached the client.
    fn delivered(&self, replies: Replies) {
        if replies.ready > 0 {
            if let Some(s) = replies.status {
                self.tx_status.store(s, Ordering::Release);
            }
            self.outstanding.fetch_sub(replies.ready, Ordering::AcqRel);
            self.ready.notify_waiters();
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
    /// The client sent what the proxy refuses to relay (`sql::guard`); it
    /// was sent a FATAL 42501, and the backend never got the whole message.
    Refused(Refusal),
    /// Drain reached this session while idle; it was told to reconnect.
    Drained,
    /// Shutdown without waiting.
    Aborted,
}

/// Why the relay stops reading a client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Protocol(#[from] FrameError),
    #[error("{0}")]
    Refused(Refusal),
}

impl From<ClientError> for RelayEnd {
    fn from(e: ClientError) -> RelayEnd {
        match e {
            ClientError::Protocol(e) => RelayEnd::ClientProtocolError(e),
            ClientError::Refused(r) => RelayEnd::Refused(r),
        }
    }
}

/// What the proxy follows in the client's stream.
pub struct ClientSide {
    scanner: FrameScanner,
}

impl ClientSide {
    pub fn new(max_message: u32) -> ClientSide {
        ClientSide {
            scanner: FrameScanner::new(Direction::Frontend, max_message, frame::capture_statements),
        }
    }

    /// Scans a chunk the client sent, before it is forwarded: the requests
    /// in it are counted in `state` first, so their replies cannot overtake
    /// the count. True when the chunk holds Terminate. A refused statement
    /// (`sql::guard`) is an error before any of the chunk is forwarded: a
    /// message is only complete in the chunk holding its last byte, so the
    /// backend never runs it.
    pub fn scan(
        &mut self,
        chunk: &[u8],
        state: &SessionState,
        statements: &mut StatementTracker,
    ) -> Result<bool, ClientError> {
        let (mut requests, mut terminate, mut refused) = (0, false, None);
        self.scanner.scan(chunk, |m| {
            let body = m.body.unwrap_or_default();
            match m.tag {
                b'Q' => {
                    let text = views::query(body);
                    if refused.is_none() {
                        refused = guard::refusal(text);
                    }
                    statements.on_query(text);
                    requests += 1;
                }
                b'S' | b'F' => requests += 1,
                b'P' => {
                    if let Some((name, text)) = views::parse(body) {
                        if refused.is_none() {
                            refused = guard::refusal(text);
                        }
                        statements.on_parse(name, text);
                    }
                }
                b'B' => statements.on_bind(views::bind_statement(body)),
                b'C' => {
                    if let Some(name) = views::closed_statement(body) {
                        statements.on_close_statement(name);
                    }
                }
                b'X' => terminate = true,
                _ => {}
            }
        })?;
        if let Some(r) = refused {
            return Err(ClientError::Refused(r));
        }
        if requests > 0 {
            state.outstanding.fetch_add(requests, Ordering::AcqRel);
        }
        Ok(terminate)
    }
}

/// ReadyForQuery messages in one chunk from the backend.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Replies {
    ready: i64,
    status: Option<u8>,
}

/// What the proxy follows in the backend's stream.
pub struct BackendSide {
    scanner: FrameScanner,
}

impl Replies {
    /// ReadyForQuery messages, and the status the last of them reported.
    pub fn parts(self) -> (i64, Option<u8>) {
        (self.ready, self.status)
    }
}

impl Default for BackendSide {
    fn default() -> Self {
        BackendSide::new()
    }
}

impl BackendSide {
    pub fn new() -> BackendSide {
        // The backend is trusted; the limit only guards against a corrupt stream.
        BackendSide {
            scanner: FrameScanner::new(Direction::Backend, u32::MAX, frame::capture_ready),
        }
    }

    /// Scans a chunk the backend sent; hand the result to the session's
    /// state once the chunk has reached the client.
    pub fn scan(&mut self, chunk: &[u8]) -> Result<Replies, FrameError> {
        let mut replies = Replies::default();
        self.scanner.scan(chunk, |m| {
            if m.tag == b'Z' {
                replies.ready += 1;
                replies.status = m.body.and_then(|b| b.first().copied());
            }
        })?;
        Ok(replies)
    }
}

/// What the client is told as its session ends, if anything.
fn farewell_message(end: &RelayEnd) -> Option<bytes::Bytes> {
    match end {
        RelayEnd::ClientProtocolError(e) => Some(frame::error_response(
            Severity::Fatal,
            "08P01",
            &e.to_string(),
        )),
        RelayEnd::Refused(r) => Some(frame::error_response(
            Severity::Fatal,
            Refusal::SQLSTATE,
            &format!("{r}; the session is closed"),
        )),
        RelayEnd::Drained | RelayEnd::Aborted => Some(frame::error_response(
            Severity::Fatal,
            "57P01",
            "terminating connection because meridian is shutting down; reconnect",
        )),
        RelayEnd::ClientClosed | RelayEnd::BackendClosed => None,
    }
}

/// Ends both connections: the client's farewell (if any), Terminate to the
/// backend, then shutdown of both; at most a second in all.
async fn farewell<C, B>(end: &RelayEnd, client: &mut C, backend: &mut B)
where
    C: AsyncWrite + Unpin,
    B: AsyncWrite + Unpin,
{
    let message = farewell_message(end);
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        if let Some(msg) = message {
            let _ = client.write_all(&msg).await;
        }
        let _ = client.shutdown().await;
        let _ = backend.write_all(&frame::TERMINATE).await;
        let _ = backend.shutdown().await;
    })
    .await;
}

/// Everything one relayed session needs besides its two streams.
pub struct RelayParts {
    pub state: Arc<SessionState>,
    pub statements: StatementTracker,
    pub max_message: u32,
}

/// Relays until either side closes, the client errs, or shutdown says stop.
/// Plain sockets go to `ring` when there is one; anything else (TLS, test
/// streams) is pumped by tokio tasks.
pub async fn relay<C, B>(
    client: C,
    backend: B,
    parts: RelayParts,
    shutdown: &Shutdown,
    ring: Option<&Ring>,
) -> RelayEnd
where
    C: AsyncRead + AsyncWrite + IntoSocket + Unpin,
    B: AsyncRead + AsyncWrite + IntoSocket + Unpin,
{
    match ring_for(ring, &client, &backend) {
        Some(ring) => ring::relay(ring, client, backend, parts, shutdown).await,
        None => pumps::relay(client, backend, parts, shutdown).await,
    }
}

/// The ring that [`relay`] hands these streams to, if any: plain sockets
/// on both sides and a ring to take them.
pub fn ring_for<'a, C: IntoSocket, B: IntoSocket>(
    ring: Option<&'a Ring>,
    client: &C,
    backend: &B,
) -> Option<&'a Ring> {
    ring.filter(|_| client.is_socket() && backend.is_socket())
}
