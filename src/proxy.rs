//! proxy: one region's server. Binds the client listener, enforces the
//! connection limit, spawns a session per client and runs graceful shutdown:
//! on drain it stops accepting at once, lets sessions finish their open
//! transactions up to `proxy.shutdown_timeout`, then cuts what is left.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;

use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::config::{Config, ConfigError, ConfigProblem};
pub use crate::shutdown::Shutdown;
use crate::wire::frame::{self, Severity};
use crate::wire::session::{serve_client, SessionContext};

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] crate::wire::tls::TlsError),
    #[error(transparent)]
    Context(#[from] crate::wire::session::ContextError),
    #[error(transparent)]
    Rules(#[from] crate::rules::RulesError),
}

/// The problems of the files a config names (client TLS, peer TLS), each
/// under its key path: read here, above both TLS modules, so `config`
/// stays data plus structural checks and imports neither.
pub fn check_files(config: &Config) -> Vec<ConfigProblem> {
    let mut problems = Vec::new();
    if let Some(tls) = &config.tls {
        if let Err(e) = crate::wire::tls::load_acceptor(tls) {
            problems.push(ConfigProblem {
                key: format!("tls.{}", e.key()),
                message: e.to_string(),
            });
        }
    }
    if let Err(e) = crate::wire::tls::BackendTls::from_config(&config.backend) {
        problems.push(ConfigProblem {
            key: match e {
                crate::wire::tls::TlsError::Ca { .. } => "backend.tls_ca".into(),
                _ => "backend.host".into(),
            },
            message: e.to_string(),
        });
    }
    if let Some(tls) = &config.replication.tls {
        if let Err(e) = crate::replication::tls::PeerTls::load(tls) {
            problems.push(ConfigProblem {
                key: format!("replication.tls.{}", e.key()),
                message: e.to_string(),
            });
        }
    }
    problems
}

/// [`Config::load`] and then [`check_files`]: what every command of the
/// binary reads its config with, so a missing certificate is named by key
/// before anything starts.
pub fn load_config(path: &std::path::Path) -> Result<Config, ConfigError> {
    let config = Config::load(path)?;
    let problems = check_files(&config);
    if problems.is_empty() {
        Ok(config)
    } else {
        Err(ConfigError::Invalid {
            path: path.into(),
            problems,
        })
    }
}

/// A bound, not yet running proxy.
pub struct Proxy {
    listener: TcpListener,
    ctx: Arc<SessionContext>,
    max_connections: usize,
    shutdown_timeout: Duration,
}

impl Proxy {
    pub async fn bind(config: &Config) -> Result<Proxy, ProxyError> {
        let addr = config.proxy.listen;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ProxyError::Bind { addr, source })?;
        Proxy::with_listener(config, listener)
    }

    /// Uses an already bound listener (tests bind port 0).
    pub fn with_listener(config: &Config, listener: TcpListener) -> Result<Proxy, ProxyError> {
        let ctx = SessionContext::from_config(config)?;
        Ok(Proxy {
            listener,
            ctx: Arc::new(ctx),
            max_connections: config.proxy.max_connections,
            shutdown_timeout: config.proxy.shutdown_timeout,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub fn context(&self) -> Arc<SessionContext> {
        self.ctx.clone()
    }

    /// Serves until `shutdown` says stop and every session has ended.
    pub async fn run(self, shutdown: Shutdown) {
        let permits = Arc::new(Semaphore::new(self.max_connections));
        let sessions = TaskTracker::new();
        loop {
            let accepted = tokio::select! {
                r = self.listener.accept() => r,
                _ = shutdown.drain.cancelled() => break,
                _ = shutdown.abort.cancelled() => break,
            };
            let (socket, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Usually EMFILE: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = socket.set_nodelay(true);
            match permits.clone().try_acquire_owned() {
                Ok(permit) => {
                    let (ctx, shutdown) = (self.ctx.clone(), shutdown.clone());
                    sessions.spawn(async move {
                        serve_client(socket, peer.to_string(), ctx, shutdown).await;
                        drop(permit);
                    });
                }
                Err(_) => {
                    self.ctx.stats.refused_full.fetch_add(1, Ordering::Relaxed);
                    sessions.spawn(refuse_full(socket, self.max_connections));
                }
            }
        }
        drop(self.listener);
        sessions.close();
        tracing::info!(
            sessions = sessions.len(),
            "stopped accepting; draining sessions"
        );
        tokio::select! {
            _ = sessions.wait() => {}
            _ = tokio::time::sleep(self.shutdown_timeout) => {
                tracing::warn!(sessions = sessions.len(), "shutdown timeout reached; closing remaining sessions");
                shutdown.abort.cancel();
                sessions.wait().await;
            }
            _ = shutdown.abort.cancelled() => sessions.wait().await,
        }
        tracing::info!("proxy stopped");
    }
}

async fn refuse_full(mut socket: TcpStream, max: usize) {
    let msg = frame::error_response(
        Severity::Fatal,
        "53300",
        &format!("sorry, too many clients already (proxy.max_connections = {max})"),
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), socket.write_all(&msg)).await;
}

/// A region's proxy plus its admin endpoint and its clock, bound and ready to run.
pub struct Region {
    name: String,
    config: Config,
    clock: Arc<Clock>,
    proxy: Proxy,
    admin: Option<TcpListener>,
    /// Where peers ship their changes to, when replication is configured.
    replication: Option<TcpListener>,
    /// TLS for peer links, when `replication.tls` is set.
    peer_tls: Option<crate::replication::tls::PeerTls>,
    /// The rule engines of tables whose conflicts they decide.
    engines: crate::replication::resolve::EngineHandle,
    /// Shared by capture and the apply sessions (see `capture::wal`).
    barrier: Arc<crate::capture::wal::Barrier>,
    /// Replication counters (shipping and applying), shown by the admin endpoint.
    replication_stats: Arc<crate::replication::ReplicationStats>,
}

impl Region {
    pub async fn bind(config: &Config) -> Result<Region, ProxyError> {
        Region::bind_with_clock_offset(config, 0).await
    }

    /// As [`Region::bind`], with the clock's time source shifted by
    /// `offset_ms` (tests set the clock back to check it never goes backwards).
    pub async fn bind_with_clock_offset(
        config: &Config,
        offset_ms: i64,
    ) -> Result<Region, ProxyError> {
        let clock = Arc::new(Clock::shifted(offset_ms, 0, config.replication.max_drift));
        // The client port is bound last: once clients can connect, every
        // other listener is bound too (a port taken meanwhile fails the
        // start before any client sees the region up).
        let admin = match config.admin.listen {
            Some(addr) => Some(
                crate::admin::bind(addr)
                    .await
                    .map_err(|source| ProxyError::Bind { addr, source })?,
            ),
            None => None,
        };
        let replication = match config.replication.listen {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(|source| ProxyError::Bind { addr, source })?,
            ),
            None => None,
        };
        // Capture stamps each transaction from the WAL: the relay adds nothing.
        let proxy = Proxy::bind(config).await?;
        let peer_tls = config
            .replication
            .tls
            .as_ref()
            .map(crate::replication::tls::PeerTls::load)
            .transpose()?;
        let engines = if config.replication.listen.is_some() {
            crate::replication::resolve::Engines::load(config)?
        } else {
            Default::default()
        };
        Ok(Region {
            replication,
            peer_tls,
            engines: crate::replication::resolve::EngineHandle::new(engines),
            barrier: Arc::new(crate::capture::wal::Barrier::new(config)?),
            replication_stats: Arc::default(),
            name: config.region.name.clone(),
            config: config.clone(),
            clock,
            proxy,
            admin,
        })
    }

    pub fn client_addr(&self) -> std::io::Result<SocketAddr> {
        self.proxy.local_addr()
    }

    pub fn replication_addr(&self) -> Option<SocketAddr> {
        self.replication.as_ref().and_then(|l| l.local_addr().ok())
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The rules in force, for reloading them (SIGHUP).
    pub fn rules(&self) -> crate::replication::resolve::EngineHandle {
        self.engines.clone()
    }

    pub fn clock(&self) -> Arc<Clock> {
        self.clock.clone()
    }

    /// Runs until shutdown completes. Client sessions are accepted once the
    /// clock has moved past its persisted high-water mark (or that mark could
    /// not be read within the backend's connect timeout; it keeps trying).
    pub async fn run(self, shutdown: Shutdown) {
        let (ready, stop) = (CancellationToken::new(), CancellationToken::new());
        let lease = tokio::spawn(crate::capture::clock_store::keep_lease(
            self.config.clone(),
            self.clock.clone(),
            ready.clone(),
            stop.clone(),
        ));
        let wait = self.config.backend.connect_timeout + Duration::from_secs(1);
        if tokio::time::timeout(wait, ready.cancelled()).await.is_err() {
            tracing::warn!("clock high-water mark not read yet; serving anyway");
        }
        let stats = self.replication_stats.clone();
        let capture = tokio::spawn(crate::capture::wal::run(
            self.config.clone(),
            self.clock.clone(),
            self.barrier.clone(),
            stop.clone(),
        ));
        let mut replication = Vec::new();
        let peers = &self.config.replication.peers;
        let relay = std::sync::Arc::new(crate::replication::Relay::new(
            peers.iter().map(|p| p.id).collect(),
            crate::replication::relay::RELAY_MAX,
        ));
        if let Some(listener) = self.replication {
            let receiver = crate::replication::Receiver {
                config: self.config.clone(),
                barrier: self.barrier.clone(),
                engines: self.engines.clone(),
                tls: self.peer_tls.clone(),
                clock: self.clock.clone(),
                stats: stats.clone(),
                applied: Default::default(),
                relay: relay.clone(),
            };
            replication.push(tokio::spawn(crate::replication::receive(
                listener,
                receiver,
                stop.clone(),
            )));
        }
        if !self.config.replication.peers.is_empty() || self.config.replication.listen.is_some() {
            replication.push(tokio::spawn(crate::replication::maintain(
                self.config.clone(),
                self.engines.clone(),
                self.barrier.clone(),
                stats.clone(),
                stop.clone(),
            )));
        }
        for peer in &self.config.replication.peers {
            replication.push(tokio::spawn(crate::replication::ship_to(
                self.config.clone(),
                peer.clone(),
                self.peer_tls.clone(),
                stats.clone(),
                stop.clone(),
            )));
            // A relay link to the peer for every third region's changes.
            for origin in peers.iter().filter(|o| o.id != peer.id) {
                replication.push(tokio::spawn(crate::replication::forward_to(
                    self.config.clone(),
                    peer.clone(),
                    origin.id,
                    relay.clone(),
                    self.peer_tls.clone(),
                    stats.clone(),
                    stop.clone(),
                )));
            }
        }
        let admin = self.admin.map(|listener| {
            let (name, ctx, shutdown) = (self.name.clone(), self.proxy.context(), shutdown.clone());
            let stats = stats.clone();
            tokio::spawn(async move {
                if let Err(e) = crate::admin::serve(listener, name, ctx, stats, shutdown).await {
                    tracing::warn!(error = %e, "admin endpoint failed");
                }
            })
        });
        self.proxy.run(shutdown).await;
        stop.cancel();
        let _ = lease.await;
        let _ = capture.await;
        for task in replication {
            let _ = task.await;
        }
        if let Some(a) = admin {
            let _ = a.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "[region]\nname = \"us-east\"\nid = 1\n[backend]\nhost = \"127.0.0.1\"\n[auth]\nmethod = \"trust\"\n";

    #[test]
    fn peer_tls_mistakes_name_the_file_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let issued = crate::cluster::certs::issue(dir.path(), &["b"]).unwrap();
        let text = format!(
            "{MINIMAL}\n[replication]\nsecret = \"0123456789abcdef\"\n\
             [replication.tls]\ncert = {:?}\nkey = {:?}\nca = \"/nonexistent/ca.pem\"\n\
             [[replication.peers]]\nname = \"b\"\nid = 2\naddress = \"127.0.0.1:1\"\nserver_name = \"b\"\n",
            issued[0].cert, issued[0].key
        );
        let problems = check_files(&Config::from_toml(&text).unwrap());
        let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["replication.tls.ca"]);
        assert!(
            problems[0].message.contains("/nonexistent/ca.pem"),
            "{}",
            problems[0].message
        );

        let good = text.replace("/nonexistent/ca.pem", &issued[0].ca.display().to_string());
        assert!(check_files(&Config::from_toml(&good).unwrap()).is_empty());
    }

    #[test]
    fn a_missing_client_certificate_is_named_by_key() {
        let text = format!(
            "{MINIMAL}\n[tls]\ncert = \"/nonexistent/cert.pem\"\nkey = \"/nonexistent/key.pem\"\n"
        );
        let problems = check_files(&Config::from_toml(&text).unwrap());
        let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["tls.cert"]);
    }
}
