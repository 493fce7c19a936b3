//! TLS for client connections (rustls, ring provider), loaded from PEM files.

use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio_rustls::TlsAcceptor;

use crate::config::TlsConfig;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read certificate file {path}: {reason}")]
    Cert { path: PathBuf, reason: String },
    #[error("cannot read private key file {path}: {reason}")]
    Key { path: PathBuf, reason: String },
    #[error("certificate and key do not form a usable TLS configuration: {0}")]
    Config(String),
}

impl TlsError {
    /// The config key (under `tls.`) that this error is about.
    pub fn key(&self) -> &'static str {
        match self {
            TlsError::Cert { .. } | TlsError::Config(_) => "cert",
            TlsError::Key { .. } => "key",
        }
    }
}

fn open(path: &Path) -> std::io::Result<BufReader<std::fs::File>> {
    std::fs::File::open(path).map(BufReader::new)
}

/// Builds the acceptor used after a client's SSLRequest.
pub fn load_acceptor(cfg: &TlsConfig) -> Result<TlsAcceptor, TlsError> {
    let cert_err = |reason: String| TlsError::Cert {
        path: cfg.cert.clone(),
        reason,
    };
    let key_err = |reason: String| TlsError::Key {
        path: cfg.key.clone(),
        reason,
    };
    let certs = rustls_pemfile::certs(&mut open(&cfg.cert).map_err(|e| cert_err(e.to_string()))?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| cert_err(e.to_string()))?;
    if certs.is_empty() {
        return Err(cert_err("no PEM certificate found".into()));
    }
    let key = rustls_pemfile::private_key(&mut open(&cfg.key).map_err(|e| key_err(e.to_string()))?)
        .map_err(|e| key_err(e.to_string()))?
        .ok_or_else(|| key_err("no PEM private key found".into()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}
