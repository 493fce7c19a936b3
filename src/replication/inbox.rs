//! replication::inbox: a peer's messages read and decoded by a task of their
//! own (at most [`DECODE_AHEAD`] ahead), and the gathering of batches that
//! have already arrived into one apply.

use futures_util::StreamExt;
use tokio_postgres::Client;

use super::gate::dependencies_met;
use super::progress::applied_vector;
use super::protocol::{Change, Message, OriginPosition, Position, ProtocolError};
use super::{Conn, ReplicationError, APPLY_MAX};

/// Messages decoded ahead of the receiver, at most this many.
const DECODE_AHEAD: usize = 8;

/// A peer's messages, read and decoded by a task of their own, so decoding
/// the next batches overlaps with applying this one (decoded in line, it
/// was 40% of the receiver's time in a catch-up, between applies).
pub(super) struct Inbox {
    rx: tokio::sync::mpsc::Receiver<Result<Message, ProtocolError>>,
    reader: tokio::task::JoinHandle<()>,
}

impl Inbox {
    pub(super) fn new(mut stream: futures_util::stream::SplitStream<Conn>) -> Inbox {
        let (tx, rx) = tokio::sync::mpsc::channel(DECODE_AHEAD);
        let reader = tokio::spawn(async move {
            loop {
                let message = match stream.next().await {
                    None => Err(ProtocolError::Closed),
                    Some(Err(e)) => Err(ProtocolError::Io(e)),
                    Some(Ok(frame)) => Message::decode(&frame),
                };
                let end = message.is_err();
                if tx.send(message).await.is_err() || end {
                    return;
                }
            }
        });
        Inbox { rx, reader }
    }

    /// The next message, waiting for it.
    pub(super) async fn next(&mut self) -> Result<Message, ReplicationError> {
        Ok(self.rx.recv().await.ok_or(ProtocolError::Closed)??)
    }

    /// The next message if one has arrived.
    fn ready(&mut self) -> Result<Option<Message>, ReplicationError> {
        match self.rx.try_recv() {
            Ok(m) => Ok(Some(m?)),
            Err(tokio::sync::mpsc::error::TryRecvError::Empty) => Ok(None),
            Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => {
                Err(ProtocolError::Closed.into())
            }
        }
    }
}

impl Drop for Inbox {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// Batches received together, applied in one transaction.
pub(super) struct Gathered {
    pub changes: Vec<Change>,
    /// Each batch's last position, in order (each gets its acknowledgement).
    pub ends: Vec<Position>,
    /// The last batch's floor and caught-up time that were set.
    pub floor: Option<i64>,
    pub origin_ms: Option<i64>,
}

impl Gathered {
    pub(super) fn new(
        changes: Vec<Change>,
        floor: Option<i64>,
        origin_ms: Option<i64>,
    ) -> Gathered {
        Gathered {
            ends: changes.last().map(Change::position).into_iter().collect(),
            changes,
            floor,
            origin_ms,
        }
    }

    /// The newest stamp among the changes (the clock's receive event).
    pub(super) fn newest_stamp(&self) -> u64 {
        self.changes
            .iter()
            .map(|c| c.hlc.max(c.tx_hlc))
            .max()
            .unwrap_or(0) as u64
    }
}

/// Adds to `gathered` the batches that have already arrived behind it (and
/// whose causal dependencies are met), up to [`APPLY_MAX`] changes: one apply
/// transaction then carries them all. An apply waits for this region's
/// capture (a sync point) and commits, so per batch it costs more than the
/// shipper spends to read one; applied one by one, a steady stream of small
/// batches would queue up to the shipper's whole window. Returns a message
/// read that has to wait for the next round.
pub(super) async fn gather(
    inbox: &mut Inbox,
    client: &Client,
    gathered: &mut Gathered,
    me: u16,
    origin: u16,
) -> Result<Option<Message>, ReplicationError> {
    let mut have: Option<Vec<OriginPosition>> = None;
    while gathered.changes.len() < APPLY_MAX {
        let Some(message) = inbox.ready()? else {
            return Ok(None);
        };
        let Message::Batch {
            changes,
            after,
            floor,
            caught_up,
        } = message
        else {
            return Ok(Some(message));
        };
        if have.is_none() {
            have = Some(applied_vector(client).await?);
        }
        if !dependencies_met(&after, have.as_deref().unwrap_or_default(), me, origin) {
            let message = Message::Batch {
                changes,
                after,
                floor,
                caught_up,
            };
            return Ok(Some(message));
        }
        gathered.ends.extend(changes.last().map(Change::position));
        gathered.changes.extend(changes);
        gathered.floor = floor.or(gathered.floor);
        gathered.origin_ms = caught_up.or(gathered.origin_ms);
    }
    Ok(None)
}
