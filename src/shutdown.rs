//! shutdown: the two signals a region's parts stop on, owned by the binary
//! (SIGTERM drains, SIGINT aborts) or by the demo and handed down to the
//! proxy, its sessions and the admin endpoint. A module of its own, below
//! all of them, so none has to import another to carry it.

use tokio_util::sync::CancellationToken;

/// Shutdown signals shared by a proxy and its sessions.
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    /// Stop accepting; close each session once it is idle between transactions.
    pub drain: CancellationToken,
    /// Close every session now.
    pub abort: CancellationToken,
}
