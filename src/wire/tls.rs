//! TLS for client connections (rustls, ring provider), loaded from PEM files.
//! The PEM readers and [`TlsError`] also serve peer links
//! (`replication::tls`).

use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

use crate::config::TlsConfig;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read certificate file {path}: {reason}")]
    Cert { path: PathBuf, reason: String },
    #[error("cannot read private key file {path}: {reason}")]
    Key { path: PathBuf, reason: String },
    #[error("cannot read certificate authority file {path}: {reason}")]
    Ca { path: PathBuf, reason: String },
    #[error("certificate and key do not form a usable TLS configuration: {0}")]
    Config(String),
}

impl TlsError {
    /// The config key (under `tls.` or `replication.tls.`) that this error is about.
    pub fn key(&self) -> &'static str {
        match self {
            TlsError::Cert { .. } | TlsError::Config(_) => "cert",
            TlsError::Key { .. } => "key",
            TlsError::Ca { .. } => "ca",
        }
    }
}

fn open(path: &Path) -> std::io::Result<BufReader<std::fs::File>> {
    std::fs::File::open(path).map(BufReader::new)
}

/// Every PEM certificate in `path` (at least one); errors name the file.
pub(crate) fn read_certs(
    path: &Path,
    error: impl Fn(String) -> TlsError,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = rustls_pemfile::certs(&mut open(path).map_err(|e| error(e.to_string()))?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| error(e.to_string()))?;
    if certs.is_empty() {
        return Err(error("no PEM certificate found".into()));
    }
    Ok(certs)
}

/// A certificate chain and its private key.
pub(crate) fn read_identity(
    cert: &Path,
    key: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let certs = read_certs(cert, |reason| TlsError::Cert {
        path: cert.into(),
        reason,
    })?;
    let key_err = |reason: String| TlsError::Key {
        path: key.into(),
        reason,
    };
    let key = rustls_pemfile::private_key(&mut open(key).map_err(|e| key_err(e.to_string()))?)
        .map_err(|e| key_err(e.to_string()))?
        .ok_or_else(|| key_err("no PEM private key found".into()))?;
    Ok((certs, key))
}

pub(crate) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// What the proxy needs to serve clients over TLS.
#[derive(Clone)]
pub struct ClientTls {
    pub acceptor: TlsAcceptor,
    /// The `tls-server-end-point` channel binding data of the certificate
    /// clients are shown (for SCRAM-SHA-256-PLUS).
    pub end_point: Vec<u8>,
}

/// Builds the acceptor used after a client's SSLRequest.
pub fn load_acceptor(cfg: &TlsConfig) -> Result<ClientTls, TlsError> {
    let (certs, key) = read_identity(&cfg.cert, &cfg.key)?;
    let end_point = crate::wire::scram::tls_server_end_point(&certs[0]);
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    Ok(ClientTls {
        acceptor: TlsAcceptor::from(Arc::new(config)),
        end_point,
    })
}
