//! replication::inbox: a peer's messages read and decoded by a task of their
//! own (at most [`DECODE_AHEAD`] ahead).

use futures_util::StreamExt;

use super::protocol::{Message, ProtocolError};
use super::{Conn, ReplicationError};

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
    pub(super) fn ready(&mut self) -> Result<Option<Message>, ReplicationError> {
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
