//! SCRAM-SHA-256 on the server side (RFC 5802 / 7677), as Postgres does it.
//!
//! The proxy authenticates clients itself, against verifiers in the config
//! (`SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`, the format of
//! `pg_authid.rolpassword`), so no plain password is ever stored. The exchange
//! is a pure state machine over byte strings; the session drives the I/O.
//! Channel binding is not offered (only `SCRAM-SHA-256` is advertised), so the
//! gs2 flags `n` and `y` are accepted and `p` is refused.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::{Digest, Sha256};

type HmacSha256 = Hmac<Sha256>;

pub const MECHANISM: &str = "SCRAM-SHA-256";
pub const DEFAULT_ITERATIONS: u32 = 4096;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScramError {
    #[error("malformed SCRAM verifier: {0}")]
    BadVerifier(&'static str),
    #[error("malformed SCRAM message: {0}")]
    Protocol(&'static str),
    #[error("client asked for channel binding, which meridian does not offer")]
    ChannelBinding,
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

/// Server state after the client-first message.
pub struct ServerFirst {
    verifier: Verifier,
    client_first_bare: String,
    server_first: String,
    gs2_header: String,
    nonce: String,
}

fn attr(part: Option<&str>, name: char) -> Result<&str, ScramError> {
    part.and_then(|p| p.strip_prefix(name))
        .and_then(|p| p.strip_prefix('='))
        .ok_or(ScramError::Protocol("missing attribute"))
}

impl ServerFirst {
    /// Handles client-first-message; returns the state and server-first-message.
    pub fn new(verifier: Verifier, client_first: &[u8]) -> Result<ServerFirst, ScramError> {
        let msg =
            std::str::from_utf8(client_first).map_err(|_| ScramError::Protocol("not UTF-8"))?;
        let mut parts = msg.splitn(3, ',');
        let flag = parts.next().unwrap_or_default();
        match flag {
            "n" | "y" => {}
            f if f.starts_with("p=") => return Err(ScramError::ChannelBinding),
            _ => return Err(ScramError::Protocol("bad gs2 flag")),
        }
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
            gs2_header: format!("{flag},{authzid},"),
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
        if B64.decode(binding).ok().as_deref() != Some(self.gs2_header.as_bytes()) {
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

    /// Runs postgres-protocol's client (what tokio-postgres uses) against our server.
    fn exchange(stored_password: &str, client_password: &str) -> Result<(), ScramError> {
        let verifier = Verifier::parse(&Verifier::generate(stored_password).to_string())?;
        let mut client =
            ScramSha256::new(client_password.as_bytes(), ChannelBinding::unrequested());
        let server = ServerFirst::new(verifier, client.message())?;
        client
            .update(server.server_first_message())
            .map_err(|_| ScramError::Protocol("client rejected server-first"))?;
        let server_final = server.finish(client.message())?;
        client
            .finish(&server_final)
            .map_err(|_| ScramError::Protocol("client rejected server signature"))?;
        Ok(())
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
    fn channel_binding_request_is_refused() {
        let v = Verifier::generate("x");
        assert!(matches!(
            ServerFirst::new(v, b"p=tls-server-end-point,,n=,r=abc"),
            Err(ScramError::ChannelBinding)
        ));
    }

    #[test]
    fn decoy_never_authenticates() {
        let mut client = ScramSha256::new(b"", ChannelBinding::unrequested());
        let server = ServerFirst::new(Verifier::decoy(), client.message()).unwrap();
        client.update(server.server_first_message()).unwrap();
        assert_eq!(
            server.finish(client.message()),
            Err(ScramError::WrongPassword)
        );
    }
}
