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

/// Shipper side: answers the peer's challenge for region `origin`'s
/// changes (relayed by region `via`, if set); returns the position up to
/// which the peer has applied them.
pub(super) async fn introduce(
    conn: &mut Conn,
    secret: &str,
    origin: u16,
    via: Option<u16>,
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
        via,
        proof: protocol::proof(secret, &nonce, origin),
    };
    send(conn, &hello).await?;
    match recv(conn).await? {
        Message::Welcome { position } => Ok(position),
        Message::Refused { reason } => Err(ProtocolError::Refused(reason).into()),
        other => Err(unexpected("Welcome", &other)),
    }
}

/// Who a connection admitted by [`admit`] carries changes of.
#[derive(Debug, Clone, Copy)]
pub(super) struct Admitted {
    /// The region whose changes they are.
    pub origin: u16,
    /// The region relaying them (a relay link), if not the origin.
    pub via: Option<u16>,
}

/// Receiver side: challenges the shipper at `peer` and checks its answer;
/// returns whose changes it carries, or refuses it (telling it why).
pub(super) async fn admit(
    conn: &mut Conn,
    config: &Config,
    stats: &ReplicationStats,
    peer: SocketAddr,
) -> Result<Admitted, ReplicationError> {
    let secret = config.replication.resolve_secret().unwrap_or_default();
    let nonce = protocol::nonce();
    let challenge = Message::Challenge {
        version: protocol::VERSION,
        region: config.region.id,
        nonce: nonce.clone(),
    };
    send(conn, &challenge).await?;
    let (version, origin, via, proof) = match recv(conn).await? {
        Message::Hello {
            version,
            origin,
            via,
            proof,
        } => (version, origin, via, proof),
        other => return Err(unexpected("Hello", &other)),
    };
    let peer_id = |id: u16| config.replication.peers.iter().any(|p| p.id == id);
    let known = peer_id(origin);
    let refusal = if version != protocol::VERSION {
        format!(
            "protocol {version} not supported (this build speaks {})",
            protocol::VERSION
        )
    } else if !protocol::verify(&secret, &nonce, origin, &proof) {
        "wrong cluster secret".to_string()
    } else if !known {
        format!("region {origin} is not a configured peer")
    } else if let Some(v) = via.filter(|&v| v == origin || !peer_id(v)) {
        format!("region {v} cannot relay region {origin}'s changes: not another configured peer")
    } else {
        return Ok(Admitted { origin, via });
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
