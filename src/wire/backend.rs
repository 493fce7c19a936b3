//! The proxy's side of a session with the region's PostgreSQL: connect over
//! TCP (under TLS with `backend.tls`) or a Unix socket, send the client's startup parameters, answer the
//! backend's authentication (SCRAM-SHA-256, MD5, cleartext or trust) and
//! collect what the client must see before its first query.

use std::io;
use std::path::PathBuf;

use bytes::{Buf, Bytes, BytesMut};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

use crate::config::BackendConfig;
use crate::wire::startup::encode_startup;
use crate::wire::stream::Socket;
use crate::wire::tls::BackendTls;

/// Where the backend listens; also where cancel requests are sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendAddr {
    Tcp { host: String, port: u16 },
    Unix(PathBuf),
}

impl BackendAddr {
    pub fn from_config(cfg: &BackendConfig) -> BackendAddr {
        if cfg.is_unix_socket() {
            BackendAddr::Unix(cfg.socket_path())
        } else {
            BackendAddr::Tcp {
                host: cfg.host.clone(),
                port: cfg.port,
            }
        }
    }

    pub async fn connect(&self) -> io::Result<Socket> {
        match self {
            BackendAddr::Tcp { host, port } => {
                let s = TcpStream::connect((host.as_str(), *port)).await?;
                s.set_nodelay(true)?;
                Ok(Socket::Tcp(s))
            }
            BackendAddr::Unix(path) => Ok(Socket::Unix(UnixStream::connect(path).await?)),
        }
    }
}

impl std::fmt::Display for BackendAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BackendAddr::Tcp { host, port } => write!(f, "{host}:{port}"),
            BackendAddr::Unix(p) => write!(f, "{}", p.display()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("could not connect to the region's PostgreSQL at {addr}: {source}")]
    Connect { addr: String, source: io::Error },
    #[error("timed out connecting to the region's PostgreSQL at {0}")]
    Timeout(String),
    /// The backend refused the session; `raw` is its ErrorResponse, forwarded as is.
    #[error("PostgreSQL refused the session")]
    Rejected { raw: Bytes },
    #[error("PostgreSQL asked for a password but backend.password is not configured")]
    NoPassword,
    #[error("PostgreSQL asked for an unsupported authentication method (code {0})")]
    UnsupportedAuth(u32),
    #[error("PostgreSQL at {0} does not accept TLS (it answered the SSLRequest with N), but backend.tls asks for it")]
    TlsRefused(String),
    #[error(
        "TLS with the region's PostgreSQL at {addr} failed (backend.tls, backend.tls_ca): {source}"
    )]
    Tls { addr: String, source: io::Error },
    #[error("unexpected reply from PostgreSQL during startup: {0}")]
    Protocol(String),
    #[error("lost the connection to PostgreSQL during startup: {0}")]
    Io(#[from] io::Error),
}

impl BackendError {
    /// SQLSTATE the client sees (a `Rejected` error carries the backend's own).
    pub fn sqlstate(&self) -> &'static str {
        match self {
            BackendError::Connect { .. }
            | BackendError::Timeout(_)
            | BackendError::Io(_)
            | BackendError::TlsRefused(_)
            | BackendError::Tls { .. } => "08006",
            BackendError::NoPassword | BackendError::UnsupportedAuth(_) => "28000",
            BackendError::Protocol(_) => "08P01",
            BackendError::Rejected { .. } => "XX000",
        }
    }
}

/// A backend session that has finished startup and is ready for queries.
pub struct BackendSession {
    pub stream: Socket,
    /// ParameterStatus and NoticeResponse messages, raw, in arrival order.
    pub startup_messages: Vec<Bytes>,
    pub pid: i32,
    pub secret: i32,
    /// The ReadyForQuery message, raw.
    pub ready: Bytes,
}

/// Reads one whole backend message: (tag, raw bytes including the header).
async fn read_message<S: AsyncRead + Unpin>(
    s: &mut S,
    buf: &mut BytesMut,
) -> Result<(u8, Bytes), BackendError> {
    loop {
        if buf.len() >= 5 {
            let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
            if !(4..=1 << 24).contains(&len) {
                return Err(BackendError::Protocol(format!("message length {len}")));
            }
            if buf.len() > len {
                let tag = buf[0];
                return Ok((tag, buf.split_to(len + 1).freeze()));
            }
        }
        if s.read_buf(buf).await? == 0 {
            return Err(BackendError::Io(io::ErrorKind::UnexpectedEof.into()));
        }
    }
}

/// Opens a connection to the region's Postgres, under TLS when `tls` says
/// so (an SSLRequest first, as libpq does), within `backend.connect_timeout`.
pub async fn open(cfg: &BackendConfig, tls: Option<&BackendTls>) -> Result<Socket, BackendError> {
    let addr = BackendAddr::from_config(cfg);
    let timeout = |_| BackendError::Timeout(addr.to_string());
    let socket = tokio::time::timeout(cfg.connect_timeout, addr.connect())
        .await
        .map_err(timeout)?
        .map_err(|source| BackendError::Connect {
            addr: addr.to_string(),
            source,
        })?;
    match (socket, tls) {
        (Socket::Tcp(tcp), Some(tls)) => {
            tokio::time::timeout(cfg.connect_timeout, start_tls(tcp, tls, &addr))
                .await
                .map_err(timeout)?
        }
        (socket, _) => Ok(socket),
    }
}

async fn start_tls(
    mut tcp: TcpStream,
    tls: &BackendTls,
    addr: &BackendAddr,
) -> Result<Socket, BackendError> {
    let mut out = BytesMut::new();
    frontend::ssl_request(&mut out);
    tcp.write_all(&out).await?;
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await?;
    if answer[0] != b'S' {
        return Err(BackendError::TlsRefused(addr.to_string()));
    }
    let connector = tokio_rustls::TlsConnector::from(tls.config.clone());
    let stream = connector
        .connect(tls.server_name.clone(), tcp)
        .await
        .map_err(|source| BackendError::Tls {
            addr: addr.to_string(),
            source,
        })?;
    Ok(Socket::Tls(Box::new(stream)))
}

/// Connects and authenticates, passing the client's startup parameters through.
pub async fn connect(
    cfg: &BackendConfig,
    tls: Option<&BackendTls>,
    params: &[(String, String)],
) -> Result<BackendSession, BackendError> {
    let addr = BackendAddr::from_config(cfg);
    let stream = open(cfg, tls).await?;
    let user = params
        .iter()
        .find(|(k, _)| k == "user")
        .map(|(_, v)| v.as_str())
        .unwrap_or_default();
    tokio::time::timeout(
        cfg.connect_timeout,
        startup(stream, user, params, cfg.resolve_password()),
    )
    .await
    .map_err(|_| BackendError::Timeout(addr.to_string()))?
}

async fn startup(
    mut stream: Socket,
    user: &str,
    params: &[(String, String)],
    password: Option<String>,
) -> Result<BackendSession, BackendError> {
    stream.write_all(&encode_startup(params)).await?;
    let mut buf = BytesMut::with_capacity(1024);
    let mut scram: Option<ScramSha256> = None;
    let mut startup_messages = Vec::new();
    let mut key = None;
    loop {
        let (tag, raw) = read_message(&mut stream, &mut buf).await?;
        let mut body = &raw[5..];
        match tag {
            b'R' => {
                if body.len() < 4 {
                    return Err(BackendError::Protocol(
                        "short authentication message".into(),
                    ));
                }
                let code = body.get_u32();
                let mut out = BytesMut::new();
                let password = || {
                    password
                        .as_deref()
                        .map(str::as_bytes)
                        .ok_or(BackendError::NoPassword)
                };
                match code {
                    0 => continue,
                    3 => frontend::password_message(password()?, &mut out)
                        .map_err(BackendError::Io)?,
                    5 => {
                        let salt: [u8; 4] = body
                            .try_into()
                            .map_err(|_| BackendError::Protocol("bad MD5 salt".into()))?;
                        let hash = postgres_protocol::authentication::md5_hash(
                            user.as_bytes(),
                            password()?,
                            salt,
                        );
                        frontend::password_message(hash.as_bytes(), &mut out)
                            .map_err(BackendError::Io)?;
                    }
                    10 => {
                        let offered = body.split(|&b| b == 0).any(|m| m == b"SCRAM-SHA-256");
                        if !offered {
                            return Err(BackendError::UnsupportedAuth(code));
                        }
                        let s = ScramSha256::new(password()?, ChannelBinding::unsupported());
                        frontend::sasl_initial_response("SCRAM-SHA-256", s.message(), &mut out)
                            .map_err(BackendError::Io)?;
                        scram = Some(s);
                    }
                    11 | 12 => {
                        let s = scram.as_mut().ok_or_else(|| {
                            BackendError::Protocol("SASL message before SASL start".into())
                        })?;
                        if code == 11 {
                            s.update(body)
                                .map_err(|e| BackendError::Protocol(e.to_string()))?;
                            frontend::sasl_response(s.message(), &mut out)
                                .map_err(BackendError::Io)?;
                        } else {
                            s.finish(body)
                                .map_err(|e| BackendError::Protocol(e.to_string()))?;
                            continue;
                        }
                    }
                    other => return Err(BackendError::UnsupportedAuth(other)),
                }
                stream.write_all(&out).await?;
            }
            b'S' | b'N' => startup_messages.push(raw),
            b'K' if body.len() == 8 => key = Some((body.get_i32(), body.get_i32())),
            b'E' => return Err(BackendError::Rejected { raw }),
            b'Z' => {
                let (pid, secret) =
                    key.ok_or_else(|| BackendError::Protocol("no BackendKeyData".into()))?;
                return Ok(BackendSession {
                    stream,
                    startup_messages,
                    pid,
                    secret,
                    ready: raw,
                });
            }
            other => {
                return Err(BackendError::Protocol(format!(
                    "message type {:?}",
                    char::from(other)
                )))
            }
        }
    }
}

/// Sends a CancelRequest for backend (`pid`, `secret`) to `addr`.
pub async fn send_cancel(addr: &BackendAddr, pid: i32, secret: i32) -> io::Result<()> {
    let mut stream = addr.connect().await?;
    let mut out = BytesMut::new();
    frontend::cancel_request(pid, secret, &mut out);
    stream.write_all(&out).await?;
    // Postgres closes the connection once it has read the request.
    let mut sink = [0u8; 1];
    let _ = stream.read(&mut sink).await;
    Ok(())
}
