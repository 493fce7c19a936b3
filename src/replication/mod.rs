//! replication: shipping this region's captured changes to every peer, and
//! applying the changes peers ship here. One file per part:
//!
//! ```text
//! origin                                   receiving region
//! ship  --- protocol (frames over tls) ---> receive: handshake -> inbox -> gate
//!   ^                                              -> apply (set_wise | in stream order,
//!   |                                                        resolve for engine tables)
//!   +------------- Ack <-------------------------- account (stats, lag, acks)
//! housekeeping (each region, once a second): prune, held retries, floors,
//!   conflict_log expiry, metrics
//! ```
//!
//! - [`ship`]: one task per peer; reads changes in the safe order and sends
//!   up to [`WINDOW`] batches ahead of the peer's acknowledgements. A slow or
//!   absent peer only delays its own shipper; client writes never wait.
//! - [`handshake`]: the receiver's challenge, the shipper's proof of the
//!   cluster secret, refusals with a reason.
//! - [`receive`]: per connection, the order of the steps; [`inbox`] decodes
//!   ahead; [`queue`] holds batches until their dependencies are met (the
//!   checks in [`gate`], with no time bound) and gathers what is ready
//!   into one apply; [`gate`] also holds batches for clock drift;
//!   [`apply`] is the one apply entry point (settings, resend check,
//!   position, typed outcome); [`account`] counts and acknowledges.
//! - [`held`]: changes that could not be applied are retried with back-off,
//!   through the apply's stream-order path.
//! - [`housekeeping`]: pruning what every peer has applied, tombstones below
//!   every region's floor (`migrations/functions/floors.sql`), metrics.
//! - [`tls`]: with `replication.tls`, every peer link is mutual TLS under the
//!   cluster's CA; the secret handshake then runs inside it.

mod account;
pub mod apply;
pub mod conflict_log;
mod copy_text;
mod forward;
mod gate;
mod handshake;
mod held;
mod housekeeping;
mod inbox;
mod progress;
pub mod protocol;
mod queue;
mod receive;
pub mod relay;
pub mod resolve;
mod rows;
mod set_wise;
mod ship;
mod stats;
pub mod tls;

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio_util::codec::{Framed, LengthDelimitedCodec};

use crate::capture::CaptureError;
pub use apply::{Applied, ApplyError};
pub use forward::forward_to;
pub use housekeeping::maintain;
use protocol::{Message, ProtocolError};
pub use receive::{receive, Receiver};
pub use relay::Relay;
pub use ship::ship_to;
pub use stats::{PeerState, ReplicationStats};

/// Changes per batch, at most.
pub const BATCH: i64 = 5000;
/// Changes one apply transaction takes at most (gathered from several
/// batches): per-apply costs (the sync point, statements per table, the
/// commit) spread over more rows in a catch-up.
pub const APPLY_MAX: usize = 20_000;
/// Batches are made smaller while their encoding exceeds this.
pub const TARGET_FRAME: usize = 8 << 20;
/// How often an idle shipper looks for new changes.
pub const POLL: Duration = Duration::from_millis(5);
/// Batches sent ahead of their acknowledgement.
pub const WINDOW: usize = 32;
/// While batches are in flight, the next one is read at most this often.
pub const GATHER: Duration = Duration::from_millis(10);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Reconnect attempts back off up to this: a healed link is used again
/// within it (at 2 s the catch-up benchmark spent up to 2 s of a heal
/// waiting to reconnect), and a refused connection costs next to nothing.
const BACKOFF_MAX: Duration = Duration::from_millis(500);
/// How often shipped changes are pruned.
pub const PRUNE_EVERY: Duration = Duration::from_secs(1);
/// Times a batch is retried after losing a deadlock to local writes.
const APPLY_RETRIES: u64 = 20;
/// How often a shipper takes its region's floor (see [`Message::Floor`]).
pub const FLOOR_EVERY: Duration = Duration::from_secs(1);
/// A silent peer is given up on after this long.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs `attempt` (one connection's life) again and again until it ends
/// well or `stop`, backing off between failures; each new kind of error is
/// logged once.
async fn keep_trying<F, Fut>(stop: &tokio_util::sync::CancellationToken, what: &str, mut attempt: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), ReplicationError>>,
{
    let mut backoff = BACKOFF_MIN;
    let mut last_error = String::new();
    loop {
        let result = tokio::select! {
            r = attempt() => r,
            _ = stop.cancelled() => return,
        };
        match result {
            Ok(()) => return,
            Err(e) => {
                let text = e.to_string();
                if text != last_error {
                    tracing::warn!(error = %text, "{what} interrupted; retrying");
                    last_error = text;
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.cancelled() => return,
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// The configured name of peer region `id` (its number if it has none).
fn peer_name(config: &crate::config::Config, id: u16) -> String {
    config
        .replication
        .peers
        .iter()
        .find(|p| p.id == id)
        .map_or_else(|| id.to_string(), |p| p.name.clone())
}

/// Wall clock in ms since the epoch (lag is measured against the origin's).
pub fn wall_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error(transparent)]
    Capture(#[from] CaptureError),
    #[error("cannot reach {address}: {source}")]
    Connect {
        address: String,
        source: std::io::Error,
    },
    #[error("peer went silent for {0:?}")]
    Timeout(Duration),
    #[error("TLS handshake failed: {0}")]
    Tls(std::io::Error),
    #[error("applying a batch failed: {0}")]
    Apply(String),
}

type Conn = Framed<tls::BoxedStream, LengthDelimitedCodec>;

async fn send(
    conn: &mut (impl futures_util::Sink<bytes::Bytes, Error = std::io::Error> + Unpin),
    m: &Message,
) -> Result<(), ReplicationError> {
    tokio::time::timeout(IO_TIMEOUT, conn.send(m.encode()))
        .await
        .map_err(|_| ReplicationError::Timeout(IO_TIMEOUT))?
        .map_err(ProtocolError::Io)?;
    Ok(())
}

async fn recv(conn: &mut Conn) -> Result<Message, ReplicationError> {
    let frame = tokio::time::timeout(IO_TIMEOUT, conn.next())
        .await
        .map_err(|_| ReplicationError::Timeout(IO_TIMEOUT))?
        .ok_or(ProtocolError::Closed)?
        .map_err(ProtocolError::Io)?;
    Ok(Message::decode(&frame)?)
}

fn unexpected(expected: &'static str, got: &Message) -> ReplicationError {
    ProtocolError::Unexpected {
        expected,
        got: got.kind().into(),
    }
    .into()
}
