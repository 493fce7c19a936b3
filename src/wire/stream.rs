//! The streams a session reads and writes: the client's (plain, or TLS after
//! an SSLRequest; generic over the transport so protocol tests can drive a
//! session over in-memory pipes), and plain sockets, TCP or Unix (the
//! backend connection, and what the io_uring relay takes over).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use std::os::fd::{AsRawFd, RawFd};

use tokio::io::{AsyncRead, AsyncWrite, DuplexStream, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

pub enum ClientStream<S> {
    Plain(S),
    Tls(Box<TlsStream<S>>),
    /// Only while a TLS handshake is in progress (or after it failed).
    Upgrading,
}

impl<S: AsyncRead + AsyncWrite + Unpin> ClientStream<S> {
    pub fn is_tls(&self) -> bool {
        matches!(self, ClientStream::Tls(_))
    }

    /// Performs the server side of the TLS handshake on a plain stream.
    pub async fn upgrade(&mut self, acceptor: &TlsAcceptor) -> io::Result<()> {
        match std::mem::replace(self, ClientStream::Upgrading) {
            ClientStream::Plain(s) => {
                *self = ClientStream::Tls(Box::new(acceptor.accept(s).await?));
                Ok(())
            }
            other => {
                *self = other;
                Err(io::Error::other("stream is not plain"))
            }
        }
    }
}

fn gone() -> io::Error {
    io::Error::new(
        io::ErrorKind::NotConnected,
        "TLS handshake did not complete",
    )
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for ClientStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            ClientStream::Tls(s) => Pin::new(s).poll_read(cx, buf),
            ClientStream::Upgrading => Poll::Ready(Err(gone())),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for ClientStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            ClientStream::Tls(s) => Pin::new(s).poll_write(cx, buf),
            ClientStream::Upgrading => Poll::Ready(Err(gone())),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_flush(cx),
            ClientStream::Tls(s) => Pin::new(s).poll_flush(cx),
            ClientStream::Upgrading => Poll::Ready(Ok(())),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            ClientStream::Tls(s) => Pin::new(s).poll_shutdown(cx),
            ClientStream::Upgrading => Poll::Ready(Ok(())),
        }
    }
}

/// A socket driven by tokio: TCP or Unix, or TCP under TLS (the proxy's
/// leg to a Postgres with `backend.tls`, which stays with tokio).
#[derive(Debug)]
pub enum Socket {
    Tcp(TcpStream),
    Unix(UnixStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

macro_rules! delegate {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            Socket::Tcp($s) => $e,
            Socket::Unix($s) => $e,
            Socket::Tls($s) => $e,
        }
    };
}

impl AsyncRead for Socket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        delegate!(self, s => Pin::new(s).poll_read(cx, buf))
    }
}

impl AsyncWrite for Socket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => Pin::new(s).poll_write(cx, buf))
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => Pin::new(s).poll_flush(cx))
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => Pin::new(s).poll_shutdown(cx))
    }
}

/// A plain socket in blocking mode, for the io_uring relay (which waits on
/// it in the kernel, not in tokio's reactor).
#[derive(Debug)]
pub enum StdSocket {
    Tcp(std::net::TcpStream),
    Unix(std::os::unix::net::UnixStream),
}

impl AsRawFd for StdSocket {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            StdSocket::Tcp(s) => s.as_raw_fd(),
            StdSocket::Unix(s) => s.as_raw_fd(),
        }
    }
}

impl Socket {
    /// Leaves tokio's reactor; the socket becomes blocking.
    pub fn into_std(self) -> io::Result<StdSocket> {
        let s = match self {
            Socket::Tcp(s) => StdSocket::Tcp(s.into_std()?),
            Socket::Unix(s) => StdSocket::Unix(s.into_std()?),
            Socket::Tls(_) => return Err(not_a_socket()),
        };
        match &s {
            StdSocket::Tcp(t) => t.set_nonblocking(false)?,
            StdSocket::Unix(u) => u.set_nonblocking(false)?,
        }
        Ok(s)
    }

    /// Back into tokio's reactor (call from within the runtime).
    pub fn from_std(s: StdSocket) -> io::Result<Socket> {
        Ok(match s {
            StdSocket::Tcp(t) => {
                t.set_nonblocking(true)?;
                Socket::Tcp(TcpStream::from_std(t)?)
            }
            StdSocket::Unix(u) => {
                u.set_nonblocking(true)?;
                Socket::Unix(UnixStream::from_std(u)?)
            }
        })
    }
}

/// A stream the io_uring relay can take over, if it is a plain socket.
pub trait IntoSocket: Sized {
    fn is_socket(&self) -> bool;
    /// Only for streams where `is_socket` said yes.
    fn into_socket(self) -> io::Result<StdSocket>;
}

fn not_a_socket() -> io::Error {
    io::Error::new(io::ErrorKind::Unsupported, "not a plain socket")
}

impl IntoSocket for Socket {
    fn is_socket(&self) -> bool {
        !matches!(self, Socket::Tls(_))
    }
    fn into_socket(self) -> io::Result<StdSocket> {
        self.into_std()
    }
}

impl IntoSocket for TcpStream {
    fn is_socket(&self) -> bool {
        true
    }
    fn into_socket(self) -> io::Result<StdSocket> {
        Socket::Tcp(self).into_std()
    }
}

impl IntoSocket for UnixStream {
    fn is_socket(&self) -> bool {
        true
    }
    fn into_socket(self) -> io::Result<StdSocket> {
        Socket::Unix(self).into_std()
    }
}

impl IntoSocket for DuplexStream {
    fn is_socket(&self) -> bool {
        false
    }
    fn into_socket(self) -> io::Result<StdSocket> {
        Err(not_a_socket())
    }
}

/// A TLS session stays with tokio: its bytes must pass through rustls.
impl<S: IntoSocket> IntoSocket for ClientStream<S> {
    fn is_socket(&self) -> bool {
        matches!(self, ClientStream::Plain(s) if s.is_socket())
    }
    fn into_socket(self) -> io::Result<StdSocket> {
        match self {
            ClientStream::Plain(s) => s.into_socket(),
            _ => Err(not_a_socket()),
        }
    }
}
