//! replication::forward: relay links. For every peer and every third
//! region (not this one, not the peer), one task keeps a connection to the
//! peer that can carry the third region's changes as this region applied
//! them ([`super::relay`] keeps them), so a change reaches every region
//! over any connected path: with the A-C link cut, B relays A's changes to
//! C.
//!
//! The cost when every link is up is a small message now and then: the
//! peer's receiver reports ([`Message::Have`]) how far it has applied the
//! origin and whether the origin's own link to it is live, and only while
//! it is not does this task send anything. A change that arrives twice, by
//! two paths, is applied once: the apply skips what its origin's position
//! in `meridian.applied` already covers, and refuses a batch that would
//! leave a gap (`ApplyError::Gap`).

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use futures_util::{SinkExt, StreamExt};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::protocol::{binary, Message, Position, ProtocolError};
use super::relay::Relay;
use super::ship::connect_peer;
use super::stats::{Link, LinkGuard};
use super::{handshake, tls, unexpected, ReplicationError, ReplicationStats};
use super::{keep_trying, IO_TIMEOUT, TARGET_FRAME, WINDOW};
use crate::config::{Config, PeerConfig};

/// Relays `origin`'s changes to `peer` whenever the peer says it needs
/// them, until `stop`, reconnecting as needed.
pub async fn forward_to(
    config: Config,
    peer: PeerConfig,
    origin: u16,
    relay: Arc<Relay>,
    tls: Option<tls::PeerTls>,
    stats: Arc<ReplicationStats>,
    stop: CancellationToken,
) {
    let span = tracing::info_span!("relay", peer = %peer.name, origin);
    let link = RelayLink {
        config: &config,
        peer: &peer,
        origin,
        relay: &relay,
        stats: &stats,
    };
    keep_trying(&stop, "the relay link", || link.run(tls.as_ref()))
        .instrument(span)
        .await
}

struct RelayLink<'a> {
    config: &'a Config,
    peer: &'a PeerConfig,
    origin: u16,
    relay: &'a Relay,
    stats: &'a Arc<ReplicationStats>,
}

/// What the peer has told this link.
struct PeerView {
    /// How far it has applied the origin (reports and acknowledgements).
    have: Position,
    /// Whether the origin's own link to it is live (until it says
    /// otherwise: nothing is relayed before the first report).
    direct: bool,
}

impl RelayLink<'_> {
    async fn run(&self, tls: Option<&tls::PeerTls>) -> Result<(), ReplicationError> {
        let secret = self.config.replication.resolve_secret().unwrap_or_default();
        let mut conn = connect_peer(self.peer, tls).await?;
        let me = Some(self.config.region.id);
        let have = handshake::introduce(&mut conn, &secret, self.origin, me).await?;
        let (mut sink, mut stream) = conn.split();
        let mut view = PeerView { have, direct: true };
        // Last positions of the batches sent and not yet covered by `have`.
        let mut in_flight: VecDeque<Position> = VecDeque::new();
        let mut sent = have;
        let mut recorded = self.relay.subscribe();
        let mut last_heard = tokio::time::Instant::now();
        let mut relaying: Option<LinkGuard> = None;
        let mut short = false;
        loop {
            if !view.direct {
                relaying.get_or_insert_with(|| {
                    tracing::info!(from = ?view.have, "the peer's link to the origin is down: relaying");
                    LinkGuard::new(self.stats, &self.peer.name, Link::RelayingTo)
                });
                sent = sent.max(view.have);
                while in_flight.len() < WINDOW {
                    let Some(frame) = self.next_frame(sent) else {
                        break;
                    };
                    let (end, n, bytes) = frame;
                    tokio::time::timeout(IO_TIMEOUT, sink.send(bytes))
                        .await
                        .map_err(|_| ReplicationError::Timeout(IO_TIMEOUT))?
                        .map_err(ProtocolError::Io)?;
                    self.stats.changes_relayed.fetch_add(n, Ordering::Relaxed);
                    in_flight.push_back(end);
                    sent = end;
                }
                let gap = in_flight.is_empty() && !self.relay.covers(self.origin, sent);
                if gap && !short {
                    tracing::info!(at = ?sent, "cannot relay: the peer needs changes this region no longer keeps (it gets them when its link to the origin heals)");
                }
                short = gap;
            } else if relaying.take().is_some() {
                tracing::info!("the peer's link to the origin is up again: relaying stops");
            }
            tokio::select! {
                frame = stream.next() => {
                    let frame = frame.ok_or(ProtocolError::Closed)?.map_err(ProtocolError::Io)?;
                    self.heard(Message::decode(&frame)?, &mut view)?;
                    while in_flight.front().is_some_and(|&e| e <= view.have) {
                        in_flight.pop_front();
                    }
                    last_heard = tokio::time::Instant::now();
                }
                _ = recorded.changed(), if !view.direct => {}
                _ = tokio::time::sleep_until(last_heard + IO_TIMEOUT), if !in_flight.is_empty() => {
                    return Err(ReplicationError::Timeout(IO_TIMEOUT));
                }
            }
        }
    }

    /// The next batch to relay after `from`: its last position, its
    /// changes and its frame. None when nothing kept follows `from`.
    fn next_frame(&self, from: Position) -> Option<(Position, u64, bytes::Bytes)> {
        // One run per frame (`pending` stops once it has one).
        let entries = self.relay.pending(self.origin, from, 1);
        let e = entries.first()?;
        let mut changes = e.after_position(from);
        loop {
            // The entry's floor and caught-up time hold only after all of it.
            let whole = changes.len() == e.after_position(from).len();
            let (floor, caught_up) = match whole {
                true => (e.floor, e.caught_up),
                false => (None, None),
            };
            let frame = binary::encode(from, changes, &e.deps, floor, caught_up);
            if frame.len() <= TARGET_FRAME || changes.len() == 1 {
                let end = changes.last()?.position();
                return Some((end, changes.len() as u64, frame.into()));
            }
            changes = &changes[..changes.len() / 2];
        }
    }

    fn heard(&self, m: Message, view: &mut PeerView) -> Result<(), ReplicationError> {
        match m {
            Message::Have { position, direct } => {
                view.have = view.have.max(position);
                view.direct = direct;
            }
            Message::Ack { position, .. } => view.have = view.have.max(position),
            other => return Err(unexpected("Have or Ack", &other)),
        }
        self.relay.report(self.peer.id, self.origin, view.have);
        Ok(())
    }
}
