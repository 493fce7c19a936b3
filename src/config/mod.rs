//! Configuration: one TOML file per region proxy.
//!
//! Parsing is strict (`deny_unknown_fields` everywhere) and every mistake is
//! reported with the dotted path of the offending key, both by `meridian check`
//! and when `meridian run` starts. Defaults live here and nowhere else.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::wire::scram::Verifier;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub region: RegionConfig,
    #[serde(default)]
    pub proxy: ProxyConfig,
    pub backend: BackendConfig,
    #[serde(default)]
    pub auth: AuthConfig,
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub replication: ReplicationConfig,
}

/// What is replicated, and how keys stay region-disjoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReplicationConfig {
    /// Every table of these schemas is replicated (plus tables named in rule files).
    pub schemas: Vec<String>,
    /// Directory of conflict rule files (`*.toml`); relative to the config file.
    /// A missing directory means no rules.
    pub rules: PathBuf,
    /// Sequences and identity columns of replicated tables step by this much,
    /// each region starting at its id, so regions never mint the same key.
    /// Region ids must be below it.
    pub sequence_stride: u16,
    /// Largest clock offset accepted from a peer (and the base of the clock lease).
    #[serde(with = "humantime_serde")]
    pub max_drift: Duration,
    /// Where peers connect to ship their changes here; no replication when unset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    /// Shared cluster secret authenticating peer links (or `secret_env`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    /// Name of an environment variable holding the cluster secret.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret_env: Option<String>,
    /// The other regions: this region ships its changes to each.
    pub peers: Vec<PeerConfig>,
    /// TLS on peer links, both ways; plain TCP when unset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<PeerTlsConfig>,
    /// How far back from the present (in this region's Postgres clock) a
    /// transaction's stamp may still be when it writes: the margin kept before
    /// delete tombstones are dropped (see `meridian.floor`). Covers clock
    /// skew between a proxy and its Postgres.
    #[serde(with = "humantime_serde")]
    pub tombstone_grace: Duration,
    /// How long entries of the conflict log (`meridian.conflict`) are kept.
    #[serde(with = "humantime_serde")]
    pub conflict_retention: Duration,
}

/// Mutual TLS between regions: each region presents `cert` to peers that
/// ship to it and to peers it ships to, and accepts only certificates that
/// chain to `ca`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerTlsConfig {
    /// PEM certificate chain of this region.
    pub cert: PathBuf,
    /// PEM private key of this region.
    pub key: PathBuf,
    /// PEM certificate(s) of the cluster's certificate authority.
    pub ca: PathBuf,
}

/// Another region this one ships its changes to.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    pub name: String,
    pub id: u16,
    /// The peer's `replication.listen` address (or a link in front of it), `host:port`.
    pub address: String,
    /// With `replication.tls`: the name the peer's certificate must carry;
    /// the host part of `address` when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
    /// The peer's database, as a libpq connection string or URL
    /// (`postgres://user@host:5432/db`): `meridian verify` compares tables
    /// there. Not used by replication.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postgres: Option<String>,
}

/// The host part of `host:port` (brackets of an IPv6 literal removed).
pub fn host_of(address: &str) -> String {
    let host = address.rsplit_once(':').map_or(address, |(h, _)| h);
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .to_string()
}

impl PeerConfig {
    /// The name the peer's certificate must carry.
    pub fn tls_name(&self) -> String {
        self.server_name
            .clone()
            .unwrap_or_else(|| host_of(&self.address))
    }
}

impl ReplicationConfig {
    pub fn resolve_secret(&self) -> Option<String> {
        self.secret
            .clone()
            .or_else(|| self.secret_env.as_ref().and_then(|v| std::env::var(v).ok()))
    }
}

impl Default for ReplicationConfig {
    fn default() -> Self {
        ReplicationConfig {
            schemas: vec!["public".into()],
            rules: PathBuf::from("conflict-rules"),
            sequence_stride: 64,
            max_drift: crate::clock::DEFAULT_MAX_DRIFT,
            listen: None,
            secret: None,
            secret_env: None,
            peers: Vec::new(),
            tls: None,
            tombstone_grace: Duration::from_secs(10),
            conflict_retention: Duration::from_secs(30 * 24 * 3600),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegionConfig {
    /// Human name, e.g. `us-east`. Lowercase letters, digits and dashes.
    pub name: String,
    /// Unique, never reused numeric id; breaks ties between equal clocks.
    pub id: u16,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyConfig {
    /// Address clients connect to.
    pub listen: SocketAddr,
    /// Client sessions beyond this are refused with SQLSTATE 53300.
    pub max_connections: usize,
    /// Largest message a client may send (length field), in bytes.
    pub max_message_bytes: u32,
    /// Time a client has to complete TLS, startup and authentication.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// On SIGTERM, how long open transactions may run before sessions are cut.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// Threads serving sessions; one per CPU when unset. See BENCHMARKS.md for
    /// why 1 can be faster when the proxy shares a small machine with Postgres.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub worker_threads: Option<usize>,
    /// How plain (non-TLS) sessions are relayed once established.
    pub relay: RelayIo,
    /// io_uring relay threads; one per four CPUs (at least one) when unset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub relay_threads: Option<usize>,
}

impl ProxyConfig {
    /// `relay_threads`, or its default for this machine.
    pub fn relay_threads(&self) -> usize {
        self.relay_threads.unwrap_or_else(|| {
            let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
            (cpus / 4).max(1)
        })
    }
}

/// The relay's I/O for plain sessions; TLS sessions always use tokio's.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum RelayIo {
    /// io_uring where the kernel allows it, else epoll (logged at start).
    #[default]
    Auto,
    /// io_uring, or refuse to start.
    IoUring,
    /// tokio's tasks on epoll.
    Epoll,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 6432)),
            max_connections: 1000,
            max_message_bytes: 64 << 20,
            handshake_timeout: Duration::from_secs(10),
            shutdown_timeout: Duration::from_secs(30),
            worker_threads: None,
            relay: RelayIo::Auto,
            relay_threads: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    /// Host name or IP of the region's PostgreSQL, or a directory holding its Unix socket.
    pub host: String,
    #[serde(default = "default_pg_port")]
    pub port: u16,
    /// Password for the backend when it asks for one (SCRAM, MD5 or cleartext).
    /// Prefer `password_env`, or trust/peer authentication over a Unix socket.
    #[serde(default)]
    pub password: Option<String>,
    /// Name of an environment variable holding the backend password.
    #[serde(default)]
    pub password_env: Option<String>,
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Role meridian itself uses (migrate, clock high-water mark). Client
    /// sessions always use the client's own role.
    #[serde(default = "default_backend_user")]
    pub user: String,
    /// The role that owns meridian's schema and runs `meridian migrate`,
    /// when it is not `user` (least privilege: README "Roles"). `user`
    /// then only applies peers' changes and reads the change stream.
    #[serde(default)]
    pub owner: Option<String>,
    /// Database holding the replicated schemas and meridian's own schema.
    #[serde(default = "default_backend_database")]
    pub database: String,
    /// Encryption of every connection to the region's Postgres (client
    /// sessions, meridian's own, the capture slot's), over TCP only.
    #[serde(default)]
    pub tls: BackendTlsMode,
    /// The certificate authorities (PEM) `verify-full` trusts.
    #[serde(default)]
    pub tls_ca: Option<PathBuf>,
}

/// How the proxy encrypts its connections to Postgres (as libpq's sslmode).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum BackendTlsMode {
    /// Plain text (a Unix socket, or a trusted network).
    #[default]
    Disable,
    /// Encrypted; the server's certificate is not checked (like libpq's
    /// `sslmode=require`: no protection against an active attacker).
    Require,
    /// Encrypted, and the certificate must chain to `tls_ca` and name
    /// `backend.host`.
    VerifyFull,
}

fn default_backend_user() -> String {
    "postgres".into()
}

fn default_backend_database() -> String {
    "postgres".into()
}

fn default_pg_port() -> u16 {
    5432
}

fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}

impl BackendConfig {
    /// The password to answer the backend with, if any is configured.
    pub fn resolve_password(&self) -> Option<String> {
        self.password.clone().or_else(|| {
            self.password_env
                .as_ref()
                .and_then(|v| std::env::var(v).ok())
        })
    }

    pub fn is_unix_socket(&self) -> bool {
        self.host.starts_with('/')
    }

    /// The Unix socket path Postgres uses for `port` in directory `host`.
    pub fn socket_path(&self) -> PathBuf {
        Path::new(&self.host).join(format!(".s.PGSQL.{}", self.port))
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum AuthMethod {
    /// SCRAM-SHA-256 against the verifiers in `auth.users`.
    #[default]
    #[serde(rename = "scram-sha-256")]
    ScramSha256,
    /// No password: for local development only.
    Trust,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    #[serde(default)]
    pub method: AuthMethod,
    #[serde(default)]
    pub users: Vec<UserConfig>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    pub name: String,
    /// `SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>`; make one with `meridian verifier`.
    pub verifier: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// HTTP address for /health and /status; none when unset.
    #[serde(default)]
    pub listen: Option<SocketAddr>,
}

/// One mistake in a config file: where it is and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    pub key: String,
    pub message: String,
}

impl std::fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.key, self.message)
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {}", problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n  "))]
    Invalid {
        path: PathBuf,
        problems: Vec<ConfigProblem>,
    },
}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        let mut config = Config::from_toml(&text).map_err(|problems| ConfigError::Invalid {
            path: path.into(),
            problems,
        })?;
        // Relative paths in a config file mean relative to that file.
        if let Some(dir) = path.parent() {
            if config.replication.rules.is_relative() {
                config.replication.rules = dir.join(&config.replication.rules);
            }
        }
        Ok(config)
    }

    /// Parses and validates config text, returning every problem found.
    pub fn from_toml(text: &str) -> Result<Config, Vec<ConfigProblem>> {
        let de = toml::Deserializer::new(text);
        let config: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let inner = e.into_inner();
            let mut message = inner.message().to_string();
            if let Some(span) = inner.span() {
                let line = text[..span.start.min(text.len())].lines().count().max(1);
                message = format!("{message} (line {line})");
            }
            vec![ConfigProblem {
                key: if key == "." { String::new() } else { key },
                message,
            }]
        })?;
        let problems = config.validate();
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(problems)
        }
    }

    /// Checks what the types cannot: names and references. Files the config
    /// names (certificates, keys) are read where they are used, and checked
    /// up front by `proxy::check_files` (`meridian check`, `meridian run`).
    pub fn validate(&self) -> Vec<ConfigProblem> {
        let mut problems = Vec::new();
        let mut problem =
            |key: String, message: String| problems.push(ConfigProblem { key, message });
        let name = &self.region.name;
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            problem(
                "region.name".into(),
                format!("{name:?} must be lowercase letters, digits and dashes, e.g. \"us-east\""),
            );
        }
        if self.proxy.max_connections == 0 {
            problem("proxy.max_connections".into(), "must be at least 1".into());
        }
        if self.proxy.relay_threads == Some(0) {
            problem(
                "proxy.relay_threads".into(),
                "must be at least 1 (leave it out for one per four CPUs)".into(),
            );
        }
        if self.proxy.worker_threads == Some(0) {
            problem(
                "proxy.worker_threads".into(),
                "must be at least 1 (leave it out for one per CPU)".into(),
            );
        }
        if self.proxy.max_message_bytes < 1024 {
            problem(
                "proxy.max_message_bytes".into(),
                "must be at least 1024".into(),
            );
        }
        if self.backend.password.is_some() && self.backend.password_env.is_some() {
            problem(
                "backend.password_env".into(),
                "set either backend.password or backend.password_env, not both".into(),
            );
        }
        let tls = self.backend.tls;
        if tls != BackendTlsMode::Disable && self.backend.is_unix_socket() {
            problem(
                "backend.tls".into(),
                "Postgres does not encrypt Unix-socket connections: set backend.host to a host name or address, or backend.tls = \"disable\"".into(),
            );
        }
        match (tls, &self.backend.tls_ca) {
            (BackendTlsMode::VerifyFull, None) => problem(
                "backend.tls_ca".into(),
                "backend.tls = \"verify-full\" needs the certificate authority that signed Postgres' certificate (a PEM file)".into(),
            ),
            (BackendTlsMode::Disable, Some(_)) => problem(
                "backend.tls_ca".into(),
                "is set but backend.tls is \"disable\": set backend.tls = \"verify-full\" to use it".into(),
            ),
            _ => {}
        }
        if let Some(var) = &self.backend.password_env {
            if std::env::var(var).is_err() {
                problem(
                    "backend.password_env".into(),
                    format!("environment variable {var} is not set"),
                );
            }
        }
        if self.auth.method == AuthMethod::ScramSha256 && self.auth.users.is_empty() {
            problem("auth.users".into(), "auth.method is \"scram-sha-256\" but no users are configured; add [[auth.users]] entries (see `meridian verifier`) or use method = \"trust\" for local development".into());
        }
        for (i, user) in self.auth.users.iter().enumerate() {
            if user.name.is_empty() {
                problem(format!("auth.users[{i}].name"), "must not be empty".into());
            }
            if self.auth.users[..i].iter().any(|u| u.name == user.name) {
                problem(
                    format!("auth.users[{i}].name"),
                    format!("user {:?} is listed twice", user.name),
                );
            }
            if let Err(e) = Verifier::parse(&user.verifier) {
                problem(
                    format!("auth.users[{i}].verifier"),
                    format!(
                        "{e}; make one with `meridian verifier --user {}`",
                        user.name
                    ),
                );
            }
        }
        let r = &self.replication;
        if r.sequence_stride < 2 {
            problem(
                "replication.sequence_stride".into(),
                "must be at least 2".into(),
            );
        } else if self.region.id == 0 || self.region.id >= r.sequence_stride {
            problem(
                "region.id".into(),
                format!(
                    "must be between 1 and {} (below replication.sequence_stride)",
                    r.sequence_stride - 1
                ),
            );
        }
        for (i, schema) in r.schemas.iter().enumerate() {
            if schema.is_empty() || schema == "meridian" || schema.starts_with("pg_") {
                problem(
                    format!("replication.schemas[{i}]"),
                    format!("{schema:?} cannot be replicated"),
                );
            }
        }
        let replicating = r.listen.is_some() || !r.peers.is_empty();
        if replicating && !r.resolve_secret().is_some_and(|s| s.len() >= 16) {
            problem(
                "replication.secret".into(),
                "replication needs a cluster secret of at least 16 characters (replication.secret or replication.secret_env), the same in every region".into(),
            );
        }
        for (i, peer) in r.peers.iter().enumerate() {
            if peer.id == self.region.id {
                problem(
                    format!("replication.peers[{i}].id"),
                    format!("{} is this region's own id", peer.id),
                );
            }
            if r.peers[..i].iter().any(|p| p.id == peer.id) {
                problem(
                    format!("replication.peers[{i}].id"),
                    format!("peer id {} is listed twice", peer.id),
                );
            }
        }
        for (i, peer) in r.peers.iter().enumerate() {
            if let Some(Err(e)) = peer
                .postgres
                .as_ref()
                .map(|p| p.parse::<tokio_postgres::Config>())
            {
                problem(
                    format!("replication.peers[{i}].postgres"),
                    format!("not a PostgreSQL connection string or URL: {e}"),
                );
            }
        }
        if r.tls.is_some() {
            for (i, peer) in r.peers.iter().enumerate() {
                let name = peer.tls_name();
                if rustls::pki_types::ServerName::try_from(name.as_str()).is_err() {
                    problem(
                        format!("replication.peers[{i}].server_name"),
                        format!("{name:?} is not a DNS name or IP address a certificate can carry"),
                    );
                }
            }
        }
        problems
    }
}

#[cfg(test)]
mod tests;
