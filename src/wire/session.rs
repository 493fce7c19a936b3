//! One client session, from the first byte to the last: TLS negotiation,
//! startup, client authentication, the backend session, then the relay.
//!
//! Every client gets its own backend session (no transaction pooling), so
//! prepared statements, SET, LISTEN, cursors and advisory locks behave exactly
//! as they do against Postgres. Failures are reported to this client only,
//! with a SQLSTATE, and never affect other sessions.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::{timeout_at, Instant};
use tracing::Instrument;

use crate::config::{AuthMethod, BackendConfig, Config, RelayIo};
use crate::shutdown::Shutdown;
use crate::sql::{guard, StatementCounts, StatementTracker};
use crate::wire::backend::{self, BackendAddr, BackendError};
use crate::wire::cancel::CancelRegistry;
use crate::wire::frame::{self, Severity};
use crate::wire::relay::{self, RelayEnd, RelayParts, RingError, Rings, SessionState};
use crate::wire::scram::{self, ScramError, ServerFirst, Verifier};
use crate::wire::startup::{read_first_packet, FirstPacket, StartupError, StartupMessage};
use crate::wire::stream::{ClientStream, IntoSocket};

/// Counters shared by all sessions of one proxy.
#[derive(Debug, Default)]
pub struct SessionStats {
    pub active: AtomicU64,
    pub total: AtomicU64,
    pub refused_full: AtomicU64,
    pub auth_failures: AtomicU64,
    pub protocol_errors: AtomicU64,
    /// Sessions closed for what `sql::guard` refuses (SQLSTATE 42501).
    pub refused: AtomicU64,
    pub handshake_timeouts: AtomicU64,
    /// Sessions relayed by the io_uring thread, and by tokio's tasks on epoll.
    pub relayed_io_uring: AtomicU64,
    pub relayed_epoll: AtomicU64,
}

/// Everything a session needs from its proxy; built once per proxy.
pub struct SessionContext {
    pub backend: BackendConfig,
    pub auth_method: AuthMethod,
    pub users: Vec<(String, Verifier)>,
    pub tls: Option<crate::wire::tls::ClientTls>,
    /// `backend.tls`: how sessions reach Postgres.
    pub backend_tls: Option<crate::wire::tls::BackendTls>,
    pub cancels: Arc<CancelRegistry>,
    pub max_message_bytes: u32,
    pub handshake_timeout: Duration,
    pub stats: SessionStats,
    pub statements: Arc<StatementCounts>,
    /// The io_uring relay threads for plain sessions, if there are any.
    pub rings: Option<Rings>,
}

/// Why a proxy's session context could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ContextError {
    #[error(transparent)]
    Tls(#[from] crate::wire::tls::TlsError),
    #[error("proxy.relay = \"io_uring\": {0}")]
    Ring(RingError),
}

impl SessionContext {
    pub fn from_config(config: &Config) -> Result<SessionContext, ContextError> {
        let tls = config
            .tls
            .as_ref()
            .map(crate::wire::tls::load_acceptor)
            .transpose()?;
        let users = config
            .auth
            .users
            .iter()
            .filter_map(|u| {
                Verifier::parse(&u.verifier)
                    .ok()
                    .map(|v| (u.name.clone(), v))
            })
            .collect();
        Ok(SessionContext {
            backend: config.backend.clone(),
            auth_method: config.auth.method,
            users,
            tls,
            backend_tls: crate::wire::tls::BackendTls::from_config(&config.backend)?,
            cancels: CancelRegistry::new(BackendAddr::from_config(&config.backend)),
            max_message_bytes: config.proxy.max_message_bytes,
            handshake_timeout: config.proxy.handshake_timeout,
            stats: SessionStats::default(),
            statements: Arc::new(StatementCounts::default()),
            rings: start_rings(config.proxy.relay, config.proxy.relay_threads())?,
        })
    }
}

fn start_rings(choice: RelayIo, threads: usize) -> Result<Option<Rings>, ContextError> {
    match choice {
        RelayIo::Epoll => Ok(None),
        RelayIo::IoUring => Rings::start(threads).map(Some).map_err(ContextError::Ring),
        RelayIo::Auto => match Rings::start(threads) {
            Ok(rings) => Ok(Some(rings)),
            Err(e) => {
                tracing::info!(reason = %e, "relaying plain sessions with epoll");
                Ok(None)
            }
        },
    }
}

/// Why the handshake ended without a session. The client has been told.
#[derive(Debug, thiserror::Error)]
enum HandshakeError {
    #[error("client went away")]
    Gone,
    #[error("timeout during connection startup")]
    Timeout,
    #[error("{message}")]
    Refused { code: &'static str, message: String },
    #[error("backend refused the session")]
    BackendRefused(Bytes),
}

impl HandshakeError {
    fn refused(code: &'static str, message: impl Into<String>) -> Self {
        HandshakeError::Refused {
            code,
            message: message.into(),
        }
    }
}

impl From<std::io::Error> for HandshakeError {
    fn from(_: std::io::Error) -> Self {
        HandshakeError::Gone
    }
}

static SESSION_IDS: AtomicU64 = AtomicU64::new(1);

/// Serves one client connection to completion.
pub async fn serve_client<S>(stream: S, peer: String, ctx: Arc<SessionContext>, shutdown: Shutdown)
where
    S: AsyncRead + AsyncWrite + IntoSocket + Unpin + Send + 'static,
{
    let id = SESSION_IDS.fetch_add(1, Ordering::Relaxed);
    let span = tracing::info_span!("session", id, %peer, user = tracing::field::Empty, db = tracing::field::Empty);
    async move {
        ctx.stats.active.fetch_add(1, Ordering::Relaxed);
        ctx.stats.total.fetch_add(1, Ordering::Relaxed);
        let mut client = ClientStream::Plain(stream);
        tokio::select! {
            r = establish(&mut client, &ctx, &shutdown) => match r {
                Ok(Some(session)) => run_relay(client, session, &ctx, shutdown).await,
                Ok(None) => {}
                Err(e) => report_handshake_error(&mut client, &ctx, e).await,
            },
            _ = shutdown.abort.cancelled() => {}
        }
        ctx.stats.active.fetch_sub(1, Ordering::Relaxed);
    }
    .instrument(span)
    .await
}

async fn report_handshake_error<S: AsyncRead + AsyncWrite + Unpin>(
    client: &mut ClientStream<S>,
    ctx: &SessionContext,
    e: HandshakeError,
) {
    let reply = match &e {
        HandshakeError::Gone => return,
        HandshakeError::Timeout => {
            ctx.stats.handshake_timeouts.fetch_add(1, Ordering::Relaxed);
            tracing::info!("handshake timed out");
            frame::error_response(Severity::Fatal, "08P01", &e.to_string())
        }
        HandshakeError::Refused { code, message } => {
            match *code {
                "08P01" => ctx.stats.protocol_errors.fetch_add(1, Ordering::Relaxed),
                guard::Refusal::SQLSTATE => ctx.stats.refused.fetch_add(1, Ordering::Relaxed),
                _ => 0,
            };
            tracing::info!(sqlstate = code, "session refused: {message}");
            frame::error_response(Severity::Fatal, code, message)
        }
        HandshakeError::BackendRefused(raw) => {
            tracing::info!("backend refused the session");
            raw.clone()
        }
    };
    // Best effort: the client may already be gone.
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        client.write_all(&reply).await?;
        client.shutdown().await
    })
    .await;
}

/// A session whose startup finished on both sides.
struct Established {
    backend: backend::BackendSession,
    cancel_key: crate::wire::cancel::CancelKey,
}

/// Runs the startup phase; `Ok(None)` when it ended quietly (a cancel request).
async fn establish<S>(
    client: &mut ClientStream<S>,
    ctx: &SessionContext,
    shutdown: &Shutdown,
) -> Result<Option<Established>, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let deadline = Instant::now() + ctx.handshake_timeout;
    let timed_out = || HandshakeError::Timeout;
    let startup = loop {
        let packet = match timeout_at(deadline, read_first_packet(client)).await {
            Err(_) => return Err(timed_out()),
            Ok(Err(StartupError::Closed)) => return Err(HandshakeError::Gone),
            Ok(Err(e)) => return Err(HandshakeError::refused("08P01", e.to_string())),
            Ok(Ok(p)) => p,
        };
        match packet {
            FirstPacket::SslRequest if client.is_tls() => {
                return Err(HandshakeError::refused(
                    "08P01",
                    "SSLRequest received twice",
                ))
            }
            FirstPacket::SslRequest => match &ctx.tls {
                Some(tls) => {
                    client.write_all(b"S").await?;
                    timeout_at(deadline, client.upgrade(&tls.acceptor))
                        .await
                        .map_err(|_| timed_out())??;
                }
                None => client.write_all(b"N").await?,
            },
            FirstPacket::GssEncRequest => client.write_all(b"N").await?,
            FirstPacket::Cancel { pid, secret } => {
                if !ctx.cancels.cancel(pid, secret).await {
                    tracing::info!(pid, "cancel request with an unknown key ignored");
                }
                return Ok(None);
            }
            FirstPacket::Startup(m) => break m,
        }
    };
    let user = startup
        .user()
        .ok_or_else(|| {
            HandshakeError::refused(
                "28000",
                "no PostgreSQL user name specified in startup packet",
            )
        })?
        .to_owned();
    let span = tracing::Span::current();
    span.record("user", user.as_str());
    span.record("db", startup.database().unwrap_or_default());
    if let Some(r) =
        guard::startup_refusal(startup.params.iter().map(|(k, v)| (k.as_str(), v.as_str())))
    {
        return Err(HandshakeError::refused(
            guard::Refusal::SQLSTATE,
            r.to_string(),
        ));
    }
    if startup.minor_version > 0 || !startup.protocol_options.is_empty() {
        client
            .write_all(&frame::negotiate_protocol_version(
                0,
                &startup.protocol_options,
            ))
            .await?;
    }
    if ctx.auth_method == AuthMethod::ScramSha256 {
        let verifier = ctx
            .users
            .iter()
            .find(|(n, _)| *n == user)
            .map(|(_, v)| v.clone());
        // Channel binding is offered over TLS: the client saw this certificate.
        let binding = match (&ctx.tls, client.is_tls()) {
            (Some(tls), true) => Some(tls.end_point.as_slice()),
            _ => None,
        };
        match timeout_at(deadline, authenticate(client, &user, verifier, binding)).await {
            Err(_) => return Err(timed_out()),
            Ok(Err(e)) => {
                ctx.stats.auth_failures.fetch_add(1, Ordering::Relaxed);
                return Err(e);
            }
            Ok(Ok(())) => {}
        }
    }
    if shutdown.drain.is_cancelled() {
        return Err(HandshakeError::refused(
            "57P03",
            "meridian is shutting down; connect to another region",
        ));
    }
    connect_backend(client, ctx, &startup).await.map(Some)
}

/// Opens the backend session and sends the client everything up to its first ReadyForQuery.
async fn connect_backend<S: AsyncWrite + Unpin>(
    client: &mut S,
    ctx: &SessionContext,
    startup: &StartupMessage,
) -> Result<Established, HandshakeError> {
    let backend = backend::connect(&ctx.backend, ctx.backend_tls.as_ref(), &startup.params)
        .await
        .map_err(|e| match e {
            BackendError::Rejected { raw } => HandshakeError::BackendRefused(raw),
            other => {
                tracing::warn!(error = %other, "backend session failed");
                HandshakeError::refused(other.sqlstate(), other.to_string())
            }
        })?;
    let cancel_key = ctx.cancels.register(backend.pid, backend.secret);
    let mut hello = BytesMut::with_capacity(512);
    hello.extend_from_slice(&frame::authentication(0, &[]));
    for m in &backend.startup_messages {
        hello.extend_from_slice(m);
    }
    hello.extend_from_slice(&frame::backend_key_data(cancel_key.pid, cancel_key.secret));
    hello.extend_from_slice(&backend.ready);
    client.write_all(&hello).await?;
    Ok(Established {
        backend,
        cancel_key,
    })
}

/// Reads one password-phase message ('p') from the client; returns its body.
async fn read_password_message<S: AsyncRead + Unpin>(
    client: &mut S,
) -> Result<Vec<u8>, HandshakeError> {
    let mut header = [0u8; 5];
    client.read_exact(&mut header).await?;
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]);
    if header[0] != b'p' {
        return Err(HandshakeError::refused(
            "08P01",
            format!(
                "expected a password message, got message type {:?}",
                char::from(header[0])
            ),
        ));
    }
    if !(4..=8192).contains(&len) {
        return Err(HandshakeError::refused(
            "08P01",
            format!("invalid password message length {len}"),
        ));
    }
    let mut body = vec![0u8; len as usize - 4];
    client.read_exact(&mut body).await?;
    Ok(body)
}

/// SCRAM-SHA-256 exchange with the client, with SCRAM-SHA-256-PLUS offered
/// first when the session can bind (`binding`). An unknown user runs the
/// exchange against a decoy verifier and fails like a wrong password.
async fn authenticate<S>(
    client: &mut S,
    user: &str,
    verifier: Option<Verifier>,
    binding: scram::Binding<'_>,
) -> Result<(), HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let failed = || {
        HandshakeError::refused(
            "28P01",
            format!("password authentication failed for user \"{user}\""),
        )
    };
    let mechanisms = match binding {
        Some(_) => format!("{}\0{}\0\0", scram::MECHANISM_PLUS, scram::MECHANISM),
        None => format!("{}\0\0", scram::MECHANISM),
    };
    client
        .write_all(&frame::authentication(10, mechanisms.as_bytes()))
        .await?;
    let initial = read_password_message(client).await?;
    let (mechanism, data) = parse_sasl_initial(&initial)
        .ok_or_else(|| HandshakeError::refused("08P01", "malformed SASLInitialResponse"))?;
    let offered = mechanism == scram::MECHANISM.as_bytes()
        || (binding.is_some() && mechanism == scram::MECHANISM_PLUS.as_bytes());
    if !offered {
        return Err(HandshakeError::refused(
            "28000",
            "client selected an invalid SASL authentication mechanism",
        ));
    }
    let scram_err = |e: ScramError| match e {
        ScramError::WrongPassword => failed(),
        ScramError::ChannelBinding(_) => HandshakeError::refused("28000", e.to_string()),
        other => HandshakeError::refused("08P01", other.to_string()),
    };
    let state = ServerFirst::new(
        verifier.unwrap_or_else(Verifier::decoy),
        mechanism,
        data,
        binding,
    )
    .map_err(scram_err)?;
    client
        .write_all(&frame::authentication(11, state.server_first_message()))
        .await?;
    let client_final = read_password_message(client).await?;
    let server_final = state.finish(&client_final).map_err(scram_err)?;
    client
        .write_all(&frame::authentication(12, &server_final))
        .await?;
    Ok(())
}

/// SASLInitialResponse body: mechanism\0, i32 length (-1 for none), data.
fn parse_sasl_initial(body: &[u8]) -> Option<(&[u8], &[u8])> {
    let (mechanism, rest) = frame::cstr(body)?;
    let len = i32::from_be_bytes(rest.get(..4)?.try_into().ok()?);
    let data = rest.get(4..)?;
    if len < 0 || len as usize != data.len() {
        return None;
    }
    Some((mechanism, data))
}

async fn run_relay<S>(
    client: ClientStream<S>,
    session: Established,
    ctx: &SessionContext,
    shutdown: Shutdown,
) where
    S: AsyncRead + AsyncWrite + IntoSocket + Unpin + Send,
{
    let status = session.backend.ready.get(5).copied().unwrap_or(b'I');
    let parts = RelayParts {
        state: Arc::new(SessionState::new(status)),
        statements: StatementTracker::new(ctx.statements.clone()),
        max_message: ctx.max_message_bytes,
    };
    let ring = relay::ring_for(
        ctx.rings.as_ref().map(Rings::pick),
        &client,
        &session.backend.stream,
    );
    let by = match ring {
        Some(_) => &ctx.stats.relayed_io_uring,
        None => &ctx.stats.relayed_epoll,
    };
    by.fetch_add(1, Ordering::Relaxed);
    let end = relay::relay(client, session.backend.stream, parts, &shutdown, ring).await;
    match &end {
        RelayEnd::ClientProtocolError(e) => {
            ctx.stats.protocol_errors.fetch_add(1, Ordering::Relaxed);
            tracing::info!(error = %e, "client protocol error; session closed");
        }
        RelayEnd::Refused(r) => {
            ctx.stats.refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(refused = %r, "statement refused; session closed");
        }
        other => tracing::debug!(end = ?other, "session ended"),
    }
    drop(session.cancel_key);
}
