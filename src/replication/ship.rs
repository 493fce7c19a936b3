//! replication::ship: one task per peer sending this region's captured
//! changes, read in the safe order (`capture::reader`), up to [`WINDOW`]
//! batches ahead of the peer's acknowledgements; each acknowledgement is
//! recorded in `meridian.shipped` (pruning reads it). Any failure:
//! reconnect with back-off and resume from what the peer says it has.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_postgres::Client;
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::protocol::{self, Message, Position, ProtocolError};
use super::stats::{Link, LinkGuard};
use super::{handshake, tls, unexpected, wall_ms, Conn, ReplicationError, ReplicationStats};
use super::{keep_trying, BATCH, FLOOR_EVERY, GATHER, IO_TIMEOUT, POLL, TARGET_FRAME, WINDOW};
use crate::capture::reader::{read_changes, read_deps};
use crate::capture::{self, CaptureError};
use crate::config::{Config, PeerConfig};

/// Ships this region's changes to `peer` until `stop`, reconnecting as needed.
pub async fn ship_to(
    config: Config,
    peer: PeerConfig,
    tls: Option<tls::PeerTls>,
    stats: Arc<ReplicationStats>,
    stop: CancellationToken,
) {
    let span = tracing::info_span!("ship", peer = %peer.name, address = %peer.address);
    let attempt = || ship_once(&config, &peer, tls.as_ref(), &stats, &stop);
    keep_trying(&stop, "shipping", attempt)
        .instrument(span)
        .await
}

async fn ship_once(
    config: &Config,
    peer: &PeerConfig,
    tls: Option<&tls::PeerTls>,
    stats: &Arc<ReplicationStats>,
    stop: &CancellationToken,
) -> Result<(), ReplicationError> {
    let secret = config.replication.resolve_secret().unwrap_or_default();
    let client = capture::connect(config).await?;
    let mut conn = connect_peer(peer, tls).await?;
    let position = handshake::introduce(&mut conn, &secret, config.region.id, None).await?;
    tracing::info!(?position, "connected; shipping from the peer's position");
    // The peer may have had these changes through another region: they
    // are shipped, as far as pruning is concerned.
    record_shipped(&client, peer.id, position).await?;
    let _link = LinkGuard::new(stats, &peer.name, Link::Shipping);
    // Up to WINDOW batches in flight: sending does not wait for the previous
    // batch's acknowledgement (a round trip over the WAN), acknowledgements
    // are matched in order as they come.
    let mut in_flight: std::collections::VecDeque<(Position, u64, tokio::time::Instant)> =
        Default::default();
    let mut sent = position;
    let mut last_send = tokio::time::Instant::now();
    let mut last_ack = last_send;
    let mut limit = BATCH;
    let grace_ms = config.replication.tombstone_grace.as_millis() as i64;
    let mut last_floor = tokio::time::Instant::now() - FLOOR_EVERY;
    let (mut sink, mut stream) = conn.split();
    loop {
        let room = in_flight.len() < WINDOW;
        let busy = !in_flight.is_empty();
        let next = async {
            if !room {
                return std::future::pending().await;
            }
            if busy {
                // While batches are in flight, gather for a moment: fewer,
                // larger batches mean fewer commits on the receiving side.
                tokio::time::sleep_until(last_send + GATHER).await;
            }
            // The floor is taken before the read: a transaction still
            // running then counts in it, one starting later stamps above it.
            let floor = if last_floor.elapsed() >= FLOOR_EVERY {
                Some(local_floor(&client, grace_ms).await?)
            } else {
                None
            };
            let read_at = wall_ms();
            let changes = read_changes(&client, sent, limit).await?;
            // Only a read that reached the end of what is committed leaves
            // nothing older behind it.
            let complete = (changes.len() as i64) < limit;
            let floor = floor.filter(|_| complete);
            let caught_up = complete.then_some(read_at);
            if changes.is_empty() && floor.is_none() {
                tokio::time::sleep(POLL).await;
            }
            let deps = match (changes.first(), changes.last()) {
                (Some(first), Some(last)) => read_deps(&client, first.xid, last.xid).await?,
                _ => Vec::new(),
            };
            Ok::<_, ReplicationError>((changes, deps, floor, caught_up))
        };
        tokio::select! {
            read = next => {
                let (changes, deps, floor, caught_up) = read?;
                let Some(last) = changes.last() else {
                    if let Some(hlc) = floor {
                        tokio::time::timeout(IO_TIMEOUT, sink.send(Message::Floor { hlc, caught_up }.encode()))
                            .await
                            .map_err(|_| ReplicationError::Timeout(IO_TIMEOUT))?
                            .map_err(ProtocolError::Io)?;
                        last_floor = tokio::time::Instant::now();
                    }
                    continue;
                };
                let last = last.position();
                let n = changes.len() as u64;
                let frame = Message::Batch { after: sent, changes, deps, floor, caught_up }.encode();
                if frame.len() > TARGET_FRAME && n > 1 {
                    // Wide rows: fewer changes per batch, so frames stay bounded.
                    limit = (n as i64 / 2).max(1);
                    continue;
                }
                if frame.len() > protocol::MAX_FRAME {
                    return Err(ProtocolError::Refused(format!(
                        "a single change at {last:?} encodes to {} bytes, above the {} byte frame limit",
                        frame.len(),
                        protocol::MAX_FRAME
                    ))
                    .into());
                }
                limit = (limit * 2).min(BATCH);
                tokio::time::timeout(IO_TIMEOUT, sink.send(frame))
                    .await
                    .map_err(|_| ReplicationError::Timeout(IO_TIMEOUT))?
                    .map_err(ProtocolError::Io)?;
                last_send = tokio::time::Instant::now();
                if floor.is_some() {
                    last_floor = last_send;
                }
                in_flight.push_back((last, n, last_send));
                sent = last;
            }
            frame = stream.next() => {
                let frame = frame.ok_or(ProtocolError::Closed)?.map_err(ProtocolError::Io)?;
                let (expected, n, _) = in_flight.pop_front().ok_or_else(|| {
                    ProtocolError::Refused("acknowledgement with nothing in flight".into())
                })?;
                match Message::decode(&frame)? {
                    Message::Ack { position: acked, .. } if acked == expected => {}
                    Message::Ack { position: acked, .. } => {
                        return Err(ProtocolError::Refused(format!(
                            "peer acknowledged {acked:?}, expected {expected:?}"
                        ))
                        .into())
                    }
                    other => return Err(unexpected("Ack", &other)),
                }
                last_ack = tokio::time::Instant::now();
                stats.batches_sent.fetch_add(1, Ordering::Relaxed);
                stats.changes_sent.fetch_add(n, Ordering::Relaxed);
                record_shipped(&client, peer.id, expected).await?;
            }
            _ = stop.cancelled() => return Ok(()),
            // The peer has acknowledged nothing for too long while batches
            // wait. Counted from its last acknowledgement, not from when the
            // oldest batch was sent: with WINDOW batches in flight in a
            // catch-up, the last one sent waits for all before it to be
            // applied (at 15,000 rows/s, 11 s for 160,000 changes), and
            // timing that out dropped a busy peer's connection mid-backlog.
            _ = tokio::time::sleep_until(
                in_flight.front().map_or_else(tokio::time::Instant::now, |f| f.2.max(last_ack)) + IO_TIMEOUT
            ), if !in_flight.is_empty() => {
                return Err(ReplicationError::Timeout(IO_TIMEOUT));
            }
        }
    }
}

/// Opens a link to `peer`: TCP without delay, TLS when configured, frames.
pub(super) async fn connect_peer(
    peer: &PeerConfig,
    tls: Option<&tls::PeerTls>,
) -> Result<Conn, ReplicationError> {
    let stream = tokio::time::timeout(IO_TIMEOUT, TcpStream::connect(&peer.address))
        .await
        .map_err(|_| ReplicationError::Timeout(IO_TIMEOUT))?
        .map_err(|source| ReplicationError::Connect {
            address: peer.address.clone(),
            source,
        })?;
    let _ = stream.set_nodelay(true);
    let stream = tokio::time::timeout(IO_TIMEOUT, tls::connect(tls, stream, &peer.tls_name()))
        .await
        .map_err(|_| ReplicationError::Timeout(IO_TIMEOUT))?
        .map_err(ReplicationError::Tls)?;
    Ok(Framed::new(stream, protocol::codec()))
}

/// Records (durably, on this side) how far `peer` has applied this region's
/// changes, for pruning.
async fn record_shipped(client: &Client, peer: u16, at: Position) -> Result<(), ReplicationError> {
    client
        .execute(
            "INSERT INTO meridian.shipped AS s (peer, xid, seq, acked_at) VALUES ($1, $2, $3, now())
             ON CONFLICT (peer) DO UPDATE SET xid = excluded.xid, seq = excluded.seq, acked_at = now()
             WHERE (s.xid, s.seq) < (excluded.xid, excluded.seq)",
            &[&i32::from(peer), &(at.xid as i64), &at.seq],
        )
        .await
        .map_err(|source| CaptureError::Postgres {
            context: "recording a peer's acknowledgement".into(),
            source,
        })?;
    Ok(())
}

/// This region's floor: every change it captures from now on has a row
/// version above it (`meridian.local_floor`).
async fn local_floor(client: &Client, grace_ms: i64) -> Result<i64, ReplicationError> {
    let row = client
        .query_one("SELECT meridian.local_floor($1)", &[&grace_ms])
        .await
        .map_err(|source| CaptureError::Postgres {
            context: "taking this region's floor".into(),
            source,
        })?;
    Ok(row.get(0))
}
