//! SCRAM-SHA-256 on the server side (RFC 5802 / 7677), as Postgres does it.
//!
//! The proxy authenticates clients itself, against verifiers in the config
//! (`SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`, the format of
//! `pg_authid.rolpassword`), so no plain password is ever stored. The exchange
//! is a pure state machine over byte strings; the session drives the I/O.
//!
//! Over TLS the proxy also offers `SCRAM-SHA-256-PLUS` with channel binding
//! `tls-server-end-point` (RFC 5929: the hash of the proxy's certificate), so
//! a client with `channel_binding=require` knows it talks to the holder of
//! that certificate's key. The binding data is the session's ([`Binding`]);
//! a client that says it could bind (`y`) while the server offered it is
//! refused, as RFC 5802 requires against a downgrade.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::{Digest, Sha256};

type HmacSha256 = Hmac<Sha256>;

pub const MECHANISM: &str = "SCRAM-SHA-256";
pub const MECHANISM_PLUS: &str = "SCRAM-SHA-256-PLUS";
const END_POINT: &str = "tls-server-end-point";
pub const DEFAULT_ITERATIONS: u32 = 4096;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScramError {
    #[error("malformed SCRAM verifier: {0}")]
    BadVerifier(&'static str),
    #[error("malformed SCRAM message: {0}")]
    Protocol(&'static str),
    #[error("SCRAM channel binding negotiation failed: {0}")]
    ChannelBinding(&'static str),
    #[error("password authentication failed")]
    WrongPassword,
}

/// A stored SCRAM secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Verifier {
    pub iterations: u32,
    pub salt: Vec<u8>,
    pub stored_key: [u8; 32],
    pub server_key: [u8; 32],
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("iterations", &self.iterations)
            .finish_non_exhaustive()
    }
}

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(data);
    mac.finalize().into_bytes().into()
}

fn key32(b64: &str) -> Result<[u8; 32], ScramError> {
    let v = B64
        .decode(b64)
        .map_err(|_| ScramError::BadVerifier("key is not base64"))?;
    v.try_into()
        .map_err(|_| ScramError::BadVerifier("key is not 32 bytes"))
}

impl Verifier {
    /// Derives a verifier from a password. Passwords are used as given; Postgres
    /// applies SASLprep first, which changes only non-ASCII passwords.
    pub fn from_password(password: &str, salt: &[u8], iterations: u32) -> Verifier {
        let mut salted = [0u8; 32];
        pbkdf2::pbkdf2_hmac::<Sha256>(password.as_bytes(), salt, iterations, &mut salted);
        let client_key = hmac(&salted, b"Client Key");
        Verifier {
            iterations,
            salt: salt.to_vec(),
            stored_key: Sha256::digest(client_key).into(),
            server_key: hmac(&salted, b"Server Key"),
        }
    }

    /// A verifier with a fresh random 16-byte salt.
    pub fn generate(password: &str) -> Verifier {
        let mut salt = [0u8; 16];
        rand::thread_rng().fill_bytes(&mut salt);
        Verifier::from_password(password, &salt, DEFAULT_ITERATIONS)
    }

    pub fn parse(s: &str) -> Result<Verifier, ScramError> {
        let rest = s
            .strip_prefix("SCRAM-SHA-256$")
            .ok_or(ScramError::BadVerifier("must start with SCRAM-SHA-256$"))?;
        let (params, keys) = rest
            .split_once('$')
            .ok_or(ScramError::BadVerifier("missing '$' before the keys"))?;
        let (iter, salt) = params
            .split_once(':')
            .ok_or(ScramError::BadVerifier("missing ':' after iterations"))?;
        let (stored, server) = keys
            .split_once(':')
            .ok_or(ScramError::BadVerifier("missing ':' between keys"))?;
        let iterations: u32 = iter
            .parse()
            .map_err(|_| ScramError::BadVerifier("iterations is not a number"))?;
        if iterations == 0 {
            return Err(ScramError::BadVerifier("iterations must be positive"));
        }
        let salt = B64
            .decode(salt)
            .map_err(|_| ScramError::BadVerifier("salt is not base64"))?;
        Ok(Verifier {
            iterations,
            salt,
            stored_key: key32(stored)?,
            server_key: key32(server)?,
        })
    }

    /// A verifier for an unknown user: the exchange runs to the end and fails
    /// like a wrong password, so user names cannot be probed.
    pub fn decoy() -> Verifier {
        let mut v = Verifier::generate("");
        rand::thread_rng().fill_bytes(&mut v.stored_key);
        v
    }
}

impl std::fmt::Display for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "SCRAM-SHA-256${}:{}${}:{}",
            self.iterations,
            B64.encode(&self.salt),
            B64.encode(self.stored_key),
            B64.encode(self.server_key)
        )
    }
}

/// What a session can bind to: `None` on a plain connection, else the
/// `tls-server-end-point` data of the certificate the client was shown.
pub type Binding<'a> = Option<&'a [u8]>;

/// The `tls-server-end-point` data of a DER certificate (RFC 5929 §4.1):
/// its hash under the hash function of its signature algorithm, SHA-256
/// when that is MD5 or SHA-1 (or not one this knows).
pub fn tls_server_end_point(cert: &[u8]) -> Vec<u8> {
    use sha2::{Sha384, Sha512};
    const SHA384: [&[u8]; 2] = [
        &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0c], // sha384WithRSAEncryption
        &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x03],       // ecdsa-with-SHA384
    ];
    const SHA512: [&[u8]; 2] = [
        &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0d], // sha512WithRSAEncryption
        &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x04],       // ecdsa-with-SHA512
    ];
    match signature_algorithm(cert) {
        Some(oid) if SHA384.contains(&oid) => Sha384::digest(cert).to_vec(),
        Some(oid) if SHA512.contains(&oid) => Sha512::digest(cert).to_vec(),
        _ => Sha256::digest(cert).to_vec(),
    }
}

/// The OID of a certificate's signatureAlgorithm: Certificate ::= SEQUENCE
/// { tbsCertificate, signatureAlgorithm SEQUENCE { OID, ... }, signature }.
/// Walked by hand: these two steps are all of X.509 this needs.
fn signature_algorithm(cert: &[u8]) -> Option<&[u8]> {
    let (tag, certificate, _) = der(cert)?;
    let (_, _, after_tbs) = der(certificate).filter(|_| tag == 0x30)?;
    let (tag, algorithm, _) = der(after_tbs)?;
    let (oid_tag, oid, _) = der(algorithm).filter(|_| tag == 0x30)?;
    (oid_tag == 0x06).then_some(oid)
}

/// One DER element: (tag, contents, what follows it).
fn der(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = b.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, &b| acc << 8 | b as usize);
        (len, &rest[n..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

/// Server state after the client-first message.
pub struct ServerFirst {
    verifier: Verifier,
    client_first_bare: String,
    server_first: String,
    /// What the client's `c=` must decode to: the gs2 header, then the
    /// binding data when it bound.
    expected_binding: Vec<u8>,
    nonce: String,
}

fn attr(part: Option<&str>, name: char) -> Result<&str, ScramError> {
    part.and_then(|p| p.strip_prefix(name))
        .and_then(|p| p.strip_prefix('='))
        .ok_or(ScramError::Protocol("missing attribute"))
}

impl ServerFirst {
    /// Handles client-first-message for the `mechanism` the client chose,
    /// on a session that can bind to `binding` (PLUS was offered).
    pub fn new(
        verifier: Verifier,
        mechanism: &[u8],
        client_first: &[u8],
        binding: Binding<'_>,
    ) -> Result<ServerFirst, ScramError> {
        let msg =
            std::str::from_utf8(client_first).map_err(|_| ScramError::Protocol("not UTF-8"))?;
        let mut parts = msg.splitn(3, ',');
        let flag = parts.next().unwrap_or_default();
        let plus = mechanism == MECHANISM_PLUS.as_bytes();
        if plus && binding.is_none() {
            return Err(ScramError::ChannelBinding(
                "SCRAM-SHA-256-PLUS is offered only over TLS",
            ));
        }
        let refused = |why| Err(ScramError::ChannelBinding(why));
        let bound = match (plus, flag.strip_prefix("p=")) {
            (false, None) if flag == "n" => None,
            (false, None) if flag == "y" && binding.is_some() => {
                return refused("the client supports channel binding and so does the server, but the client chose not to use it")
            }
            (false, None) if flag == "y" => None,
            (true, Some(END_POINT)) => binding,
            (true, Some(_)) => {
                return refused("unsupported channel binding type (only tls-server-end-point)")
            }
            (true, None) if flag == "n" || flag == "y" => {
                return refused("SCRAM-SHA-256-PLUS chosen without binding")
            }
            (false, Some(_)) => return refused("channel binding asked for without SCRAM-SHA-256-PLUS"),
            _ => return Err(ScramError::Protocol("bad gs2 flag")),
        };
        let authzid = parts
            .next()
            .ok_or(ScramError::Protocol("missing authzid"))?;
        if !authzid.is_empty() {
            return Err(ScramError::Protocol("authzid is not supported"));
        }
        let bare = parts
            .next()
            .ok_or(ScramError::Protocol("missing client-first-bare"))?;
        let mut attrs = bare.split(',');
        attr(attrs.next(), 'n')?; // Postgres ignores the SCRAM user name; the startup user counts.
        let client_nonce = attr(attrs.next(), 'r')?;
        if client_nonce.is_empty()
            || !client_nonce
                .bytes()
                .all(|b| (0x21..=0x7e).contains(&b) && b != b',')
        {
            return Err(ScramError::Protocol("bad client nonce"));
        }
        let mut raw = [0u8; 18];
        rand::thread_rng().fill_bytes(&mut raw);
        let nonce = format!("{client_nonce}{}", B64.encode(raw));
        let server_first = format!(
            "r={nonce},s={},i={}",
            B64.encode(&verifier.salt),
            verifier.iterations
        );
        Ok(ServerFirst {
            verifier,
            client_first_bare: bare.to_owned(),
            server_first,
            expected_binding: [
                format!("{flag},{authzid},").as_bytes(),
                bound.unwrap_or_default(),
            ]
            .concat(),
            nonce,
        })
    }

    pub fn server_first_message(&self) -> &[u8] {
        self.server_first.as_bytes()
    }

    /// Checks client-final-message; on success returns server-final-message.
    pub fn finish(self, client_final: &[u8]) -> Result<Vec<u8>, ScramError> {
        let msg =
            std::str::from_utf8(client_final).map_err(|_| ScramError::Protocol("not UTF-8"))?;
        let (without_proof, proof) = msg
            .rsplit_once(",p=")
            .ok_or(ScramError::Protocol("missing proof"))?;
        let mut attrs = without_proof.split(',');
        let binding = attr(attrs.next(), 'c')?;
        if B64.decode(binding).ok().as_deref() != Some(&self.expected_binding[..]) {
            return Err(ScramError::Protocol("channel binding data does not match"));
        }
        if attr(attrs.next(), 'r')? != self.nonce {
            return Err(ScramError::Protocol("nonce does not match"));
        }
        let proof = B64
            .decode(proof)
            .map_err(|_| ScramError::Protocol("proof is not base64"))?;
        if proof.len() != 32 {
            return Err(ScramError::Protocol("proof has the wrong length"));
        }
        let auth_message = format!(
            "{},{},{}",
            self.client_first_bare, self.server_first, without_proof
        );
        let signature = hmac(&self.verifier.stored_key, auth_message.as_bytes());
        let client_key: Vec<u8> = proof.iter().zip(signature).map(|(p, s)| p ^ s).collect();
        let stored: [u8; 32] = Sha256::digest(&client_key).into();
        // Constant-time comparison: fold all differences before deciding.
        let diff = stored
            .iter()
            .zip(self.verifier.stored_key)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        if diff != 0 {
            return Err(ScramError::WrongPassword);
        }
        let server_signature = hmac(&self.verifier.server_key, auth_message.as_bytes());
        Ok(format!("v={}", B64.encode(server_signature)).into_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};

    /// Runs postgres-protocol's client (what tokio-postgres uses) against
    /// our server; `binding`: what the client and the server bind to.
    fn run(
        stored_password: &str,
        client_password: &str,
        binding: Option<(&[u8], &[u8])>,
    ) -> Result<(), ScramError> {
        let verifier = Verifier::parse(&Verifier::generate(stored_password).to_string())?;
        let (cb, mechanism, server_has) = match binding {
            Some((sees, has)) => (
                ChannelBinding::tls_server_end_point(sees.to_vec()),
                MECHANISM_PLUS,
                Some(has),
            ),
            None => (ChannelBinding::unrequested(), MECHANISM, None),
        };
        let mut client = ScramSha256::new(client_password.as_bytes(), cb);
        let server =
            ServerFirst::new(verifier, mechanism.as_bytes(), client.message(), server_has)?;
        client
            .update(server.server_first_message())
            .map_err(|_| ScramError::Protocol("client rejected server-first"))?;
        let server_final = server.finish(client.message())?;
        client
            .finish(&server_final)
            .map_err(|_| ScramError::Protocol("client rejected server signature"))
    }

    fn exchange(stored_password: &str, client_password: &str) -> Result<(), ScramError> {
        run(stored_password, client_password, None)
    }

    fn bound_exchange(client_sees: &[u8], server_has: &[u8]) -> Result<(), ScramError> {
        run("pw", "pw", Some((client_sees, server_has)))
    }

    #[test]
    fn real_client_authenticates() {
        exchange("s3cret", "s3cret").unwrap();
    }

    #[test]
    fn wrong_password_fails() {
        assert_eq!(exchange("s3cret", "guess"), Err(ScramError::WrongPassword));
    }

    #[test]
    fn verifier_text_round_trips_and_bad_text_is_refused() {
        let v = Verifier::from_password("pencil", b"0123456789abcdef", 4096);
        assert_eq!(Verifier::parse(&v.to_string()).unwrap(), v);
        assert!(Verifier::parse("md5abc").is_err());
        assert!(Verifier::parse("SCRAM-SHA-256$0:AAAA$AAAA:AAAA").is_err());
    }

    #[test]
    fn channel_binding_to_the_certificate_the_client_saw_authenticates() {
        bound_exchange(b"cert hash", b"cert hash").unwrap();
        assert_eq!(
            bound_exchange(b"a man in the middle's", b"cert hash"),
            Err(ScramError::Protocol("channel binding data does not match"))
        );
    }

    #[test]
    fn binding_negotiation_mistakes_are_refused() {
        let first = |mechanism: &str, msg: &[u8], binding: Binding<'_>| {
            ServerFirst::new(Verifier::generate("x"), mechanism.as_bytes(), msg, binding)
                .map(|_| ())
        };
        let refused = |r: Result<(), ScramError>| matches!(r, Err(ScramError::ChannelBinding(_)));
        // PLUS on a plain connection, or binding asked for without PLUS.
        assert!(refused(first(
            MECHANISM_PLUS,
            b"p=tls-server-end-point,,n=,r=abc",
            None
        )));
        assert!(refused(first(
            MECHANISM,
            b"p=tls-server-end-point,,n=,r=abc",
            Some(b"h")
        )));
        // A downgrade: the client could bind, the server offered it.
        assert!(refused(first(MECHANISM, b"y,,n=,r=abc", Some(b"h"))));
        assert!(first(MECHANISM, b"y,,n=,r=abc", None).is_ok());
        assert!(first(MECHANISM, b"n,,n=,r=abc", Some(b"h")).is_ok());
        assert!(refused(first(
            MECHANISM_PLUS,
            b"p=tls-unique,,n=,r=abc",
            Some(b"h")
        )));
        assert!(refused(first(MECHANISM_PLUS, b"n,,n=,r=abc", Some(b"h"))));
    }

    #[test]
    fn the_end_point_hash_follows_the_certificates_signature_algorithm() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["x".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        assert_eq!(
            tls_server_end_point(cert.der()).len(),
            48,
            "ecdsa-with-SHA384: SHA-384"
        );
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["x".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        assert_eq!(
            tls_server_end_point(cert.der()),
            Sha256::digest(cert.der()).to_vec()
        );
        assert_eq!(tls_server_end_point(b"not DER").len(), 32);
    }

    #[test]
    fn decoy_never_authenticates() {
        let mut client = ScramSha256::new(b"", ChannelBinding::unrequested());
        let server = ServerFirst::new(
            Verifier::decoy(),
            MECHANISM.as_bytes(),
            client.message(),
            None,
        )
        .unwrap();
        client.update(server.server_first_message()).unwrap();
        assert_eq!(
            server.finish(client.message()),
            Err(ScramError::WrongPassword)
        );
    }
}
