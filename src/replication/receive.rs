//! replication::receive: the receiving side of every peer link. Per
//! connection: the handshake ([`super::handshake`]), then a loop of
//!
//! ```text
//! inbox (decoded ahead) -> queue -> what the causal gate lets through
//!   (whole batches, a prefix of the one that waits) -> drift hold
//!   -> apply::apply (one transaction, with the origin's position)
//!   -> applied vector moves (wakes the other receivers) -> account -> ack
//!   -> kept for relaying (`relay`)
//! ```
//!
//! A relay link (another region shipping the origin's changes, see
//! [`super::forward`]) runs the same loop, and beside it a task telling the
//! relayer how far this region has applied the origin and whether the
//! origin's own link is live ([`report_have`]).
//!
//! Each step is a function of its own module; this file only strings them
//! together, so the order of the steps is read here and nowhere else.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_postgres::Client;
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::account::{acknowledge, Account};
use super::gate::{hold_until_within_drift, CausalGate};
use super::handshake::Admitted;
use super::inbox::Inbox;
use super::progress::{applied_position, note_floor, AppliedVector};
use super::protocol::{self, Message, OriginPosition, Position};
use super::queue::Gathered;
use super::relay::Relay;
use super::stats::Link;
use super::{apply, handshake, resolve, send, tls, Conn};
use super::{Applied, ApplyError, ReplicationError, ReplicationStats, APPLY_RETRIES, IO_TIMEOUT};
use crate::capture::{self, wal::Barrier};
use crate::clock::Clock;
use crate::config::Config;

/// What every receiving connection of a region shares.
#[derive(Clone)]
pub struct Receiver {
    pub config: Config,
    /// Capture's barrier: applies decide on exact local state (see
    /// `capture::wal::Barrier::settle`).
    pub barrier: Arc<crate::capture::wal::Barrier>,
    /// Rule engines of the tables whose conflicts they decide.
    pub engines: resolve::EngineHandle,
    pub tls: Option<tls::PeerTls>,
    pub clock: Arc<Clock>,
    pub stats: Arc<ReplicationStats>,
    /// The applied vector the receivers share (the causal gate's view).
    pub applied: Arc<AppliedVector>,
    /// Other origins' changes applied here, kept for relaying.
    pub relay: Arc<Relay>,
}

/// Accepts peers' shipments until `stop`.
pub async fn receive(listener: TcpListener, receiver: Receiver, stop: CancellationToken) {
    while let Some((stream, peer)) = crate::net::accept(&listener, &stop, "replication").await {
        let (receiver, stop) = (receiver.clone(), stop.clone());
        let span = tracing::info_span!("receive", %peer);
        tokio::spawn(
            async move {
                tokio::select! {
                    r = serve_peer(stream, peer, &receiver, &stop) => {
                        if let Err(e) = r {
                            tracing::info!(error = %e, "peer connection ended");
                        }
                    }
                    _ = stop.cancelled() => {}
                }
            }
            .instrument(span),
        );
    }
}

async fn serve_peer(
    stream: TcpStream,
    peer: SocketAddr,
    receiver: &Receiver,
    stop: &CancellationToken,
) -> Result<(), ReplicationError> {
    let Receiver {
        config,
        barrier,
        engines,
        tls,
        clock,
        stats,
        applied,
        relay,
    } = receiver;
    let me = config.region.id;
    let stream = accept_tls(tls.as_ref(), stream, stats, peer).await?;
    let mut conn = Framed::new(stream, protocol::codec());
    let Admitted { origin, via } = handshake::admit(&mut conn, config, stats, peer).await?;
    let mut client = capture::connect_apply(config).await?;
    let position = applied_position(&client, origin).await?;
    send(&mut conn, &Message::Welcome { position }).await?;
    let (acks, stream) = conn.split();
    let acks = Arc::new(tokio::sync::Mutex::new(acks));
    let inbox = Inbox::new(stream);
    tracing::info!(origin, ?via, ?position, "peer authenticated; receiving");
    let link = match via {
        None => Link::Receiving,
        Some(_) => Link::RelayedIn,
    };
    let mut account = Account::new(stats, config, origin, link);
    let _reports = via.map(|_| {
        let name = super::peer_name(config, origin);
        let task = report_have(acks.clone(), applied.clone(), stats.clone(), name, origin);
        tokio_util::task::AbortOnDropHandle::new(tokio::spawn(task))
    });
    let mut gate = CausalGate::new(inbox, applied, &client, me, origin).await?;
    loop {
        let gathered = gate.next(&client, stats).await?;
        account.heard();
        if gathered.changes.is_empty() {
            if let Some(hlc) = gathered.floor {
                note_floor(&client, origin, hlc).await?;
            }
            account.caught_up(gathered.origin_ms, 0);
            continue;
        }
        if !hold_until_within_drift(clock, gathered.newest_stamp(), stats, stop).await {
            return Ok(());
        }
        let engines = engines.current();
        let outcome =
            apply_with_retries(&mut client, barrier, &engines, origin, &gathered, stats).await?;
        if let Some(last) = gathered.changes.last() {
            applied.merge(&[OriginPosition {
                origin,
                position: last.position(),
            }]);
        }
        if let Some(hlc) = gathered.floor {
            note_floor(&client, origin, hlc).await?;
        }
        account.applied(&outcome, &gathered);
        acknowledge(&mut *acks.lock().await, &gathered.ends, &outcome).await?;
        relay.record(origin, gathered);
    }
}

/// On a relay link: tells the relayer how far this region has applied
/// `origin` and whether the origin's own link is live, whenever either
/// changes (looked at after every apply, and every [`REPORT_EVERY`]).
async fn report_have(
    sink: Arc<tokio::sync::Mutex<futures_util::stream::SplitSink<Conn, bytes::Bytes>>>,
    applied: Arc<AppliedVector>,
    stats: Arc<ReplicationStats>,
    name: String,
    origin: u16,
) {
    let mut vector = applied.subscribe();
    let mut last = None;
    loop {
        let position = vector
            .borrow_and_update()
            .iter()
            .find(|p| p.origin == origin)
            .map_or(Position::default(), |p| p.position);
        let direct = stats.with_peer(&name, |p| p.direct_live());
        if last != Some((position, direct)) {
            let have = Message::Have { position, direct };
            if send(&mut *sink.lock().await, &have).await.is_err() {
                return;
            }
            last = Some((position, direct));
        }
        tokio::select! {
            _ = vector.changed() => {}
            _ = tokio::time::sleep(REPORT_EVERY) => {}
        }
    }
}

/// How often a relay link's receiver looks whether the origin's own link
/// is still live.
const REPORT_EVERY: Duration = Duration::from_millis(100);

async fn accept_tls(
    tls: Option<&tls::PeerTls>,
    stream: TcpStream,
    stats: &ReplicationStats,
    peer: SocketAddr,
) -> Result<tls::BoxedStream, ReplicationError> {
    match tokio::time::timeout(IO_TIMEOUT, tls::accept(tls, stream)).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => {
            stats.peers_refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%peer, error = %e, "refused a peer: TLS handshake failed");
            Err(ReplicationError::Tls(e))
        }
        Err(_) => Err(ReplicationError::Timeout(IO_TIMEOUT)),
    }
}

/// Applies `changes` in one transaction, retrying what is worth retrying:
/// an apply that gave way to capture (a local schema change queued behind
/// it) once capture has caught up, and a lost deadlock or serialization
/// race against local writes a few times.
async fn apply_with_retries(
    client: &mut Client,
    barrier: &Barrier,
    engines: &resolve::Engines,
    origin: u16,
    gathered: &Gathered,
    stats: &ReplicationStats,
) -> Result<Applied, ReplicationError> {
    let (after, changes) = (gathered.after, &gathered.changes);
    let mut attempt = 0;
    loop {
        match apply::apply(client, Some(barrier), engines, origin, after, changes).await {
            Ok(done) => return Ok(done),
            Err(ApplyError::GaveWay(limit)) => {
                stats.batches_retried.fetch_add(1, Ordering::Relaxed);
                tracing::info!(origin, ?limit, "an apply gave way to capture (a local schema change may have queued behind it); retrying");
                barrier
                    .catch_up()
                    .await
                    .map_err(|e| ReplicationError::Apply(capture::describe(&e)))?;
            }
            Err(e) if attempt < APPLY_RETRIES && e.is_retryable() => {
                attempt += 1;
                stats.batches_retried.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(5 * attempt)).await;
            }
            Err(ApplyError::Postgres(e)) => {
                return Err(ReplicationError::Apply(capture::describe(&e)))
            }
            // The connection ends; its shipper starts again from what is
            // applied here.
            Err(e @ ApplyError::Gap { .. }) => return Err(ReplicationError::Apply(e.to_string())),
        }
    }
}
