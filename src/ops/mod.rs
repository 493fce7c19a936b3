//! ops: what an operator runs against a live cluster from the command line.
//!
//! - [`status`]: `meridian status`, the cluster as one region sees it (its
//!   proxy, links, lag and backlog per peer, held changes, recent
//!   conflicts), from the region's admin endpoint and its database;
//! - [`verify`]: `meridian verify`, comparing every replicated table across
//!   all regions' databases and naming each key that differs.
//!
//! Both are library functions returning reports, so tests drive them the
//! way the binary does.

pub mod schema;
pub mod status;
pub mod verify;

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// GET `path` from the HTTP endpoint at `addr` (meridian's own admin
/// endpoint: HTTP/1.0, a small body). Returns status code and body.
pub async fn http_get(addr: &str, path: &str) -> Result<(u16, String), String> {
    let io = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await?;
        let mut buf = Vec::new();
        s.take(16 << 20).read_to_end(&mut buf).await?;
        Ok::<_, std::io::Error>(buf)
    };
    let buf = tokio::time::timeout(Duration::from_secs(3), io)
        .await
        .map_err(|_| format!("{addr}: no answer within 3 s"))?
        .map_err(|e| format!("{addr}: {e}"))?;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("{addr}: not an HTTP response"))?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("{addr}: not an HTTP response"))?;
    Ok((code, body.to_string()))
}
