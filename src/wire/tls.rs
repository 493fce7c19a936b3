//! TLS for client connections (rustls, ring provider), loaded from PEM files,
//! and towards the region's Postgres (`backend.tls`, [`BackendTls`]). The PEM
//! readers and [`TlsError`] also serve peer links (`replication::tls`).

use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio_rustls::TlsAcceptor;

use crate::config::{BackendConfig, BackendTlsMode, TlsConfig};

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

/// TLS towards the region's Postgres: the client config and the name its
/// certificate must carry (`backend.host`).
#[derive(Clone)]
pub struct BackendTls {
    pub config: Arc<rustls::ClientConfig>,
    pub server_name: ServerName<'static>,
}

impl BackendTls {
    /// `None` for `backend.tls = "disable"`; errors name the CA file.
    pub fn from_config(cfg: &BackendConfig) -> Result<Option<BackendTls>, TlsError> {
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let config = match (cfg.tls, &cfg.tls_ca) {
            (BackendTlsMode::Disable, _) => return Ok(None),
            (BackendTlsMode::Require, _) => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider())))
                .with_no_client_auth(),
            (BackendTlsMode::VerifyFull, ca) => {
                let ca = ca.as_deref().ok_or_else(|| TlsError::Ca {
                    path: PathBuf::new(),
                    reason: "backend.tls_ca is not set".into(),
                })?;
                let mut roots = rustls::RootCertStore::empty();
                let certs = read_certs(ca, |reason| TlsError::Ca {
                    path: ca.into(),
                    reason,
                })?;
                for cert in certs {
                    roots.add(cert).map_err(|e| TlsError::Ca {
                        path: ca.into(),
                        reason: e.to_string(),
                    })?;
                }
                builder.with_root_certificates(roots).with_no_client_auth()
            }
        };
        let server_name = ServerName::try_from(cfg.host.clone())
            .map_err(|e| TlsError::Config(format!("backend.host {:?}: {e}", cfg.host)))?;
        Ok(Some(BackendTls {
            config: Arc::new(config),
            server_name,
        }))
    }
}

/// `backend.tls = "require"`: any certificate is accepted (as libpq's
/// `sslmode=require`), but the handshake's signatures are still checked,
/// so the session is encrypted to whoever holds the certificate's key.
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
