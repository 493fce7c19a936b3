//! net: small TCP helpers shared by the servers that are not the client
//! proxy (the link emulator and the replication receiver).

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// The next connection, with TCP_NODELAY set, or `None` once `stop` is
/// cancelled. Accept errors (usually EMFILE) are logged and retried after a
/// short pause instead of spinning.
pub async fn accept(
    listener: &TcpListener,
    stop: &CancellationToken,
    what: &str,
) -> Option<(TcpStream, SocketAddr)> {
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    return Some((stream, peer));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "{what}: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = stop.cancelled() => return None,
        }
    }
}
