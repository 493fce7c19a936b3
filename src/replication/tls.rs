//! Mutual TLS on peer links (`replication.tls`): a region presents its
//! certificate both when a peer ships to it (as the server) and when it
//! ships to a peer (as the client), and accepts only peers whose certificate
//! chains to the cluster's CA. The cluster secret is still checked inside
//! the TLS session, so either alone keeps strangers out; TLS adds privacy
//! and integrity on the wire.

use std::sync::Arc;

use rustls::pki_types::ServerName;
use rustls::server::WebPkiClientVerifier;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::config::PeerTlsConfig;
use crate::wire::tls::{provider, read_certs, read_identity, TlsError};

/// A peer connection: plain TCP or TLS over it.
pub trait PeerStream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> PeerStream for T {}

pub type BoxedStream = Box<dyn PeerStream>;

/// Both sides of peer TLS, built once from the config.
#[derive(Clone)]
pub struct PeerTls {
    acceptor: TlsAcceptor,
    connector: TlsConnector,
}

impl std::fmt::Debug for PeerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PeerTls")
    }
}

impl PeerTls {
    pub fn load(cfg: &PeerTlsConfig) -> Result<PeerTls, TlsError> {
        let ca_err = |reason: String| TlsError::Ca {
            path: cfg.ca.clone(),
            reason,
        };
        let mut roots = rustls::RootCertStore::empty();
        for cert in read_certs(&cfg.ca, ca_err)? {
            roots.add(cert).map_err(|e| ca_err(e.to_string()))?;
        }
        let roots = Arc::new(roots);
        let (certs, key) = read_identity(&cfg.cert, &cfg.key)?;
        let config_err = |e: rustls::Error| TlsError::Config(e.to_string());

        let client_verifier =
            WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
                .build()
                .map_err(|e| ca_err(e.to_string()))?;
        let server = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(config_err)?
            .with_client_cert_verifier(client_verifier)
            .with_single_cert(certs.clone(), key.clone_key())
            .map_err(config_err)?;
        let client = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(config_err)?
            .with_root_certificates(roots)
            .with_client_auth_cert(certs, key)
            .map_err(config_err)?;
        Ok(PeerTls {
            acceptor: TlsAcceptor::from(Arc::new(server)),
            connector: TlsConnector::from(Arc::new(client)),
        })
    }

    /// The server side, for a peer that connected to ship here.
    pub async fn accept(&self, tcp: TcpStream) -> std::io::Result<BoxedStream> {
        Ok(Box::new(self.acceptor.accept(tcp).await?))
    }

    /// The client side, towards a peer whose certificate must carry `name`.
    pub async fn connect(&self, tcp: TcpStream, name: &str) -> std::io::Result<BoxedStream> {
        let name = ServerName::try_from(name.to_string())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        Ok(Box::new(self.connector.connect(name, tcp).await?))
    }
}

/// Wraps `tcp` as the server side when TLS is configured.
pub async fn accept(tls: Option<&PeerTls>, tcp: TcpStream) -> std::io::Result<BoxedStream> {
    match tls {
        Some(t) => t.accept(tcp).await,
        None => Ok(Box::new(tcp)),
    }
}

/// Wraps `tcp` as the client side when TLS is configured.
pub async fn connect(
    tls: Option<&PeerTls>,
    tcp: TcpStream,
    name: &str,
) -> std::io::Result<BoxedStream> {
    match tls {
        Some(t) => t.connect(tcp, name).await,
        None => Ok(Box::new(tcp)),
    }
}
