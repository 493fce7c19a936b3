//! replication::handshake: how a shipper and a receiver meet. The receiver
//! speaks first (a challenge with a fresh nonce), so a connection that never
//! proves it knows the cluster secret gets nothing but that nonce; the
//! shipper answers with its region and the proof; the receiver refuses a
//! wrong version, a wrong secret or a region it does not know, saying why,
//! and otherwise tells the shipper where to start (`Welcome`, sent by the
//! receiver once it has read its applied position).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;

use super::protocol::{self, Message, Position, ProtocolError};
use super::{recv, send, unexpected, Conn, ReplicationError, ReplicationStats};
use crate::config::Config;

/// Shipper side: answers the peer's challenge as region `origin`; returns
/// the position up to which the peer has applied this region's changes.
pub(super) async fn introduce(
    conn: &mut Conn,
    secret: &str,
    origin: u16,
) -> Result<Position, ReplicationError> {
    let nonce = match recv(conn).await? {
        Message::Challenge { version, nonce, .. } if version == protocol::VERSION => nonce,
        Message::Challenge { version, .. } => {
            return Err(ProtocolError::Refused(format!(
                "peer speaks protocol {version}, this build {}",
                protocol::VERSION
            ))
            .into())
        }
        other => return Err(unexpected("Challenge", &other)),
    };
    let hello = Message::Hello {
        version: protocol::VERSION,
        origin,
        proof: protocol::proof(secret, &nonce, origin),
    };
    send(conn, &hello).await?;
    match recv(conn).await? {
        Message::Welcome { position } => Ok(position),
        Message::Refused { reason } => Err(ProtocolError::Refused(reason).into()),
        other => Err(unexpected("Welcome", &other)),
    }
}

/// Receiver side: challenges the shipper at `peer` and checks its answer;
/// returns the origin region it proved to be, or refuses it (telling it why).
pub(super) async fn admit(
    conn: &mut Conn,
    config: &Config,
    stats: &ReplicationStats,
    peer: SocketAddr,
) -> Result<u16, ReplicationError> {
    let secret = config.replication.resolve_secret().unwrap_or_default();
    let nonce = protocol::nonce();
    let challenge = Message::Challenge {
        version: protocol::VERSION,
        region: config.region.id,
        nonce: nonce.clone(),
    };
    send(conn, &challenge).await?;
    let (version, origin, proof) = match recv(conn).await? {
        Message::Hello {
            version,
            origin,
            proof,
        } => (version, origin, proof),
        other => return Err(unexpected("Hello", &other)),
    };
    let known = config.replication.peers.iter().any(|p| p.id == origin);
    let refusal = if version != protocol::VERSION {
        format!(
            "protocol {version} not supported (this build speaks {})",
            protocol::VERSION
        )
    } else if !protocol::verify(&secret, &nonce, origin, &proof) {
        "wrong cluster secret".to_string()
    } else if !known {
        format!("region {origin} is not a configured peer")
    } else {
        return Ok(origin);
    };
    stats.peers_refused.fetch_add(1, Ordering::Relaxed);
    tracing::warn!(%peer, origin, reason = %refusal, "refused a peer");
    let _ = send(
        conn,
        &Message::Refused {
            reason: refusal.clone(),
        },
    )
    .await;
    Err(ProtocolError::Refused(refusal).into())
}
