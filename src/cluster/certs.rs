//! A throw-away certificate authority for a local cluster: one CA and one
//! certificate per region (named after the region, usable as server and as
//! client), written as PEM files, ready for `replication.tls`. For the demo
//! and the tests; a real deployment brings its own PKI.

use std::path::Path;

use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair};

use crate::config::PeerTlsConfig;

/// Writes `ca.pem` and `<region>.pem` / `<region>.key` for each name into
/// `dir`, and returns each region's `replication.tls` settings (same order).
pub fn issue(dir: &Path, regions: &[&str]) -> Result<Vec<PeerTlsConfig>, String> {
    let err = |e: rcgen::Error| e.to_string();
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let write = |name: String, text: String| {
        let path = dir.join(name);
        std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok::<_, String>(path)
    };
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "meridian cluster CA");
    let ca_key = KeyPair::generate().map_err(err)?;
    let ca = ca_params.self_signed(&ca_key).map_err(err)?;
    let ca_path = write("ca.pem".into(), ca.pem())?;
    regions
        .iter()
        .map(|name| {
            let mut params = CertificateParams::new(vec![name.to_string()]).map_err(err)?;
            params.distinguished_name.push(DnType::CommonName, *name);
            params.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
            let key = KeyPair::generate().map_err(err)?;
            let cert = params.signed_by(&key, &ca, &ca_key).map_err(err)?;
            Ok(PeerTlsConfig {
                cert: write(format!("{name}.pem"), cert.pem())?,
                key: write(format!("{name}.key"), key.serialize_pem())?,
                ca: ca_path.clone(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication::tls::PeerTls;

    #[test]
    fn issued_certificates_load_as_peer_tls() {
        let dir = tempfile::tempdir().unwrap();
        let configs = issue(dir.path(), &["us-east", "eu-west"]).unwrap();
        assert_eq!(configs.len(), 2);
        for c in &configs {
            PeerTls::load(c).unwrap();
        }
    }
}
