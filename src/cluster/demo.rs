//! `meridian demo`: a local multi-region cluster. One fresh PostgreSQL and one
//! meridian proxy (with its admin endpoint) per region, all on this machine.
//! Prints `region=<name> url=<postgres-url> admin=<http-url>` per region, then
//! `ready`, and stops everything it started on SIGINT or SIGTERM.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::capture::{self, CaptureError};
use crate::cluster::postgres::{PgError, PgOptions, PgServer};
use crate::config::{
    AdminConfig, AuthConfig, AuthMethod, BackendConfig, Config, PeerConfig, PeerTlsConfig,
    ProxyConfig, RegionConfig, ReplicationConfig,
};
use crate::link::{self, LinkSettings, LinkState};
use crate::proxy::{ProxyError, Region, Shutdown};
use crate::rules::{RuleSet, RulesError};

/// Region names in the order regions are created.
pub const REGION_NAMES: [&str; 8] = [
    "us-east",
    "eu-west",
    "ap-south",
    "us-west",
    "eu-central",
    "ap-northeast",
    "sa-east",
    "af-south",
];

/// Admin endpoints listen this far above the region's client port.
pub const ADMIN_PORT_OFFSET: u16 = 1000;
/// Replication receivers listen this far above the region's client port.
pub const REPLICATION_PORT_OFFSET: u16 = 2000;
/// The links' control API listens this far above the first client port.
pub const LINK_CONTROL_OFFSET: u16 = 3000;

#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub regions: usize,
    pub port: u16,
    pub latency: Duration,
    pub jitter: Duration,
    pub schema: Option<PathBuf>,
    pub rules: PathBuf,
    /// Whether `rules` was given explicitly (then it must exist).
    pub rules_explicit: bool,
    pub data: Option<PathBuf>,
    pub keep: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("--regions must be between 1 and {max}, got {got}")]
    RegionCount { got: usize, max: usize },
    #[error("--port {port} leaves no room for {regions} regions and their admin ports (port + {ADMIN_PORT_OFFSET})")]
    PortRange { port: u16, regions: usize },
    #[error("port {0} is already in use; choose another first port with --port")]
    PortBusy(u16),
    #[error("--schema {path}: {reason}")]
    Schema { path: PathBuf, reason: String },
    #[error("--rules {0}: directory does not exist")]
    Rules(PathBuf),
    #[error("data directory {path}: {reason}")]
    Data { path: PathBuf, reason: String },
    #[error("starting PostgreSQL for {region}: {source}")]
    Postgres { region: String, source: PgError },
    #[error(transparent)]
    RuleFile(RulesError),
    #[error("meridian migrate for {region}: {source}")]
    Migrate {
        region: String,
        source: CaptureError,
    },
    #[error(transparent)]
    Proxy(#[from] ProxyError),
}

struct RegionPlan {
    name: &'static str,
    id: u16,
    port: u16,
    admin_port: u16,
    replication_port: u16,
}

fn plan(opts: &DemoOptions) -> Result<Vec<RegionPlan>, DemoError> {
    if opts.regions == 0 || opts.regions > REGION_NAMES.len() {
        return Err(DemoError::RegionCount {
            got: opts.regions,
            max: REGION_NAMES.len(),
        });
    }
    let last = opts.port as usize + opts.regions - 1 + LINK_CONTROL_OFFSET as usize;
    if last > u16::MAX as usize || opts.port == 0 {
        return Err(DemoError::PortRange {
            port: opts.port,
            regions: opts.regions,
        });
    }
    let plans: Vec<RegionPlan> = (0..opts.regions)
        .map(|i| RegionPlan {
            name: REGION_NAMES[i],
            id: i as u16 + 1,
            port: opts.port + i as u16,
            admin_port: opts.port + i as u16 + ADMIN_PORT_OFFSET,
            replication_port: opts.port + i as u16 + REPLICATION_PORT_OFFSET,
        })
        .collect();
    for p in &plans {
        for port in [p.port, p.admin_port, p.replication_port] {
            std::net::TcpListener::bind(("127.0.0.1", port))
                .map_err(|_| DemoError::PortBusy(port))?;
        }
    }
    Ok(plans)
}

fn region_config(
    plan: &RegionPlan,
    pg: &PgServer,
    rules: &std::path::Path,
    secret: &str,
    peers: Vec<PeerConfig>,
    peer_tls: PeerTlsConfig,
) -> Config {
    Config {
        region: RegionConfig {
            name: plan.name.to_string(),
            id: plan.id,
        },
        proxy: ProxyConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], plan.port)),
            ..ProxyConfig::default()
        },
        backend: BackendConfig {
            host: pg.socket_dir().display().to_string(),
            port: pg.port,
            password: None,
            password_env: None,
            connect_timeout: Duration::from_secs(5),
            user: pg.superuser().to_string(),
            database: "postgres".into(),
            tls: Default::default(),
            tls_ca: None,
            owner: None,
        },
        auth: AuthConfig {
            method: AuthMethod::Trust,
            users: Vec::new(),
        },
        tls: None,
        admin: AdminConfig {
            listen: Some(SocketAddr::from(([127, 0, 0, 1], plan.admin_port))),
        },
        replication: ReplicationConfig {
            rules: std::path::absolute(rules).unwrap_or_else(|_| rules.to_path_buf()),
            listen: Some(SocketAddr::from(([127, 0, 0, 1], plan.replication_port))),
            secret: Some(secret.to_string()),
            peers,
            tls: Some(peer_tls),
            ..ReplicationConfig::default()
        },
    }
}

async fn apply_schema(pg: &PgServer, sql: &str) -> Result<(), String> {
    let (client, conn) =
        tokio_postgres::connect(&pg.socket_conninfo("postgres"), tokio_postgres::NoTls)
            .await
            .map_err(|e| e.to_string())?;
    let driver = tokio::spawn(conn);
    let result = client
        .batch_execute(sql)
        .await
        .map_err(|e| match e.as_db_error() {
            Some(db) => format!("{}: {}", db.code().code(), db.message()),
            None => e.to_string(),
        });
    drop(client);
    let _ = driver.await;
    result
}

/// Runs the demo until `stop` resolves; `out` gets the machine-readable lines.
pub async fn run(
    opts: DemoOptions,
    out: &mut (dyn Write + Send),
    stop: impl std::future::Future<Output = ()>,
) -> Result<(), DemoError> {
    let plans = plan(&opts)?;
    let schema = match &opts.schema {
        Some(path) => Some(
            std::fs::read_to_string(path).map_err(|e| DemoError::Schema {
                path: path.clone(),
                reason: e.to_string(),
            })?,
        ),
        None => None,
    };
    if opts.rules_explicit && !opts.rules.is_dir() {
        return Err(DemoError::Rules(opts.rules.clone()));
    }
    let (base, _temp) = match &opts.data {
        Some(d) => (d.clone(), None),
        None => {
            let t = tempfile::Builder::new()
                .prefix("meridian-demo-")
                .tempdir()
                .map_err(|e| DemoError::Data {
                    path: std::env::temp_dir(),
                    reason: e.to_string(),
                })?;
            (
                t.path().to_path_buf(),
                if opts.keep { None } else { Some(t) },
            )
        }
    };
    std::fs::create_dir_all(&base).map_err(|e| DemoError::Data {
        path: base.clone(),
        reason: e.to_string(),
    })?;
    tracing::info!(dir = %base.display(), regions = plans.len(), "starting PostgreSQL servers");
    let pg_opts = PgOptions {
        durable: true,
        remove_on_stop: !opts.keep,
        ..PgOptions::default()
    };
    let starts: Vec<_> = plans
        .iter()
        .map(|p| {
            let (dir, o) = (base.join(p.name), pg_opts.clone());
            tokio::task::spawn_blocking(move || PgServer::start(&dir, &o))
        })
        .collect();
    let mut servers = Vec::new();
    let mut first_error = None;
    for (p, s) in plans.iter().zip(starts) {
        match s.await.expect("PostgreSQL start task panicked") {
            Ok(pg) => servers.push(pg),
            Err(source) => {
                first_error.get_or_insert(DemoError::Postgres {
                    region: p.name.into(),
                    source,
                });
            }
        }
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    if let (Some(sql), Some(path)) = (&schema, &opts.schema) {
        for (p, pg) in plans.iter().zip(&servers) {
            apply_schema(pg, sql)
                .await
                .map_err(|reason| DemoError::Schema {
                    path: path.clone(),
                    reason: format!("failed in {}: {reason}", p.name),
                })?;
        }
    }
    let rules = RuleSet::load(&opts.rules).map_err(DemoError::RuleFile)?;
    // One emulated link per direction between every two regions.
    let settings = LinkSettings {
        latency: opts.latency,
        jitter: opts.jitter,
        bandwidth: None,
    };
    let mut links: Vec<DemoLink> = Vec::new();
    for from in &plans {
        for to in plans.iter().filter(|t| t.id != from.id) {
            let target = format!("127.0.0.1:{}", to.replication_port);
            let (listener, state) =
                link::bind(SocketAddr::from(([127, 0, 0, 1], 0)), target, settings)
                    .await
                    .map_err(|e| DemoError::Data {
                        path: base.clone(),
                        reason: format!("cannot bind a link: {e}"),
                    })?;
            links.push(DemoLink {
                from: from.name,
                to: to.name,
                state,
                listener: Some(listener),
            });
        }
    }
    let secret = crate::replication::protocol::nonce();
    let names: Vec<&str> = plans.iter().map(|p| p.name).collect();
    let certs =
        super::certs::issue(&base.join("tls"), &names).map_err(|reason| DemoError::Data {
            path: base.join("tls"),
            reason: format!("cannot issue the peer link certificates: {reason}"),
        })?;
    let configs: Vec<Config> = plans
        .iter()
        .zip(&servers)
        .zip(certs)
        .map(|((p, pg), peer_tls)| {
            let peers = links
                .iter()
                .filter(|l| l.from == p.name)
                .map(|l| {
                    let (i, to) = plans
                        .iter()
                        .enumerate()
                        .find(|(_, t)| t.name == l.to)
                        .expect("planned region");
                    PeerConfig {
                        name: to.name.to_string(),
                        id: to.id,
                        address: l.state.listen.to_string(),
                        server_name: Some(to.name.to_string()),
                        // For `meridian verify` (straight to the peer's
                        // database, not through the link).
                        postgres: Some(servers[i].socket_conninfo("postgres")),
                    }
                })
                .collect();
            region_config(p, pg, &opts.rules, &secret, peers, peer_tls)
        })
        .collect();
    for (p, config) in plans.iter().zip(&configs) {
        let failed = |e: CaptureError| DemoError::Migrate {
            region: p.name.into(),
            source: e,
        };
        let mut client = capture::connect(config).await.map_err(failed)?;
        capture::migrate(&mut client, config, &rules)
            .await
            .map_err(failed)?;
    }
    let shutdown = Shutdown::default();
    let mut tasks = Vec::new();
    let link_stop = CancellationToken::new();
    for l in &mut links {
        if let Some(listener) = l.listener.take() {
            tasks.push(tokio::spawn(link::run(
                listener,
                l.state.clone(),
                link_stop.clone(),
            )));
        }
    }
    let control_port = opts.port + LINK_CONTROL_OFFSET;
    let control = tokio::net::TcpListener::bind(("127.0.0.1", control_port))
        .await
        .map_err(|_| DemoError::PortBusy(control_port))?;
    let links = Arc::new(links);
    tasks.push(tokio::spawn(serve_link_control(
        control,
        links.clone(),
        link_stop.clone(),
    )));
    let mut lines = String::new();
    for ((p, config), pg) in plans.iter().zip(configs).zip(&servers) {
        let config_path = base.join(format!("{}.toml", p.name));
        if let Ok(text) = toml::to_string(&config) {
            let _ = std::fs::write(&config_path, text);
        }
        let region = Region::bind(&config).await?;
        lines.push_str(&format!(
            "region={} url=postgres://{}@127.0.0.1:{}/postgres admin=http://127.0.0.1:{}\n",
            p.name,
            pg.superuser(),
            p.port,
            p.admin_port
        ));
        tasks.push(tokio::spawn(region.run(shutdown.clone())));
    }
    tracing::info!(
        latency = %humantime::format_duration(opts.latency),
        jitter = %humantime::format_duration(opts.jitter),
        links = links.len(),
        rule_tables = rules.tables.len(),
        "capture and replication are on (mutual TLS between regions); conflicts are decided by the rule files, last-writer-wins elsewhere (see meridian.conflict)"
    );
    if let Some(first) = plans.first() {
        eprintln!(
            "links between regions: curl http://127.0.0.1:{control_port}/links\n\
             partition a region:   curl -X POST 'http://127.0.0.1:{control_port}/partition?region={0}'\n\
             heal it:              curl -X POST 'http://127.0.0.1:{control_port}/heal?region={0}'\n\
             cut one link:         curl -X POST 'http://127.0.0.1:{control_port}/cut?from={0}&to={2}'   (and /heal?from=&to=)\n\
             metrics, health:      curl http://127.0.0.1:{1}/metrics   (and /health, /status)",
            first.name,
            first.admin_port,
            plans.last().map_or(&first.name, |p| &p.name),
        );
        eprintln!(
            "cluster status:       meridian status --config {0}/{1}.toml\n\
             compare all regions:  meridian verify --config {0}/{1}.toml",
            base.display(),
            first.name
        );
    }
    lines.push_str("ready\n");
    let _ = out.write_all(lines.as_bytes());
    let _ = out.flush();
    stop.await;
    tracing::info!("stopping the demo cluster");
    shutdown.abort.cancel();
    link_stop.cancel();
    for t in tasks {
        let _ = t.await;
    }
    let _ = tokio::task::spawn_blocking(move || drop(servers)).await;
    if opts.keep {
        eprintln!("kept the cluster's files in {}", base.display());
    }
    Ok(())
}

/// One emulated link of the demo: traffic from `from`'s shipper to `to`'s receiver.
struct DemoLink {
    from: &'static str,
    to: &'static str,
    state: Arc<LinkState>,
    listener: Option<tokio::net::TcpListener>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RegionQuery {
    region: Option<String>,
    from: Option<String>,
    to: Option<String>,
}

impl RegionQuery {
    /// Whether the query picks link `l`: both directions between `from`
    /// and `to`, every link to and from `region`, or (neither) all links.
    fn picks(&self, l: &DemoLink) -> bool {
        match (&self.region, &self.from, &self.to) {
            (None, Some(a), Some(b)) => (l.from == a && l.to == b) || (l.from == b && l.to == a),
            (Some(r), None, None) => r == l.from || r == l.to,
            _ => true,
        }
    }

    /// A query naming no link it could pick, or mixing the two forms.
    fn mistake(&self, links: &[DemoLink]) -> Option<String> {
        let known = |r: &String| links.iter().any(|l| l.from == r || l.to == r);
        match (&self.region, &self.from, &self.to) {
            (None, None, None) => None,
            (Some(r), None, None) if known(r) => None,
            (None, Some(a), Some(b)) if a != b && known(a) && known(b) => None,
            (Some(r), None, None) => Some(format!("no region {r:?}")),
            (None, Some(a), Some(b)) => Some(format!("no link between {a:?} and {b:?}")),
            _ => Some("give either region=R, or from=A and to=B".into()),
        }
    }
}

type Links = Arc<Vec<DemoLink>>;

fn links_status(links: &[DemoLink]) -> serde_json::Value {
    serde_json::Value::Array(
        links
            .iter()
            .map(|l| {
                let mut s = l.state.status();
                s["from"] = l.from.into();
                s["to"] = l.to.into();
                s
            })
            .collect(),
    )
}

/// The demo's link control: `GET /links`; `POST /partition?region=R` and
/// `POST /heal?region=R` (every link to and from R; all links without
/// `region`); `POST /cut?from=A&to=B` and `POST /heal?from=A&to=B` (the
/// link between A and B, both directions). A name that is not a region is
/// answered 400.
async fn serve_link_control(
    listener: tokio::net::TcpListener,
    links: Links,
    stop: CancellationToken,
) {
    let act = |partition: bool| {
        move |State(links): State<Links>, Query(q): Query<RegionQuery>| async move {
            if let Some(why) = q.mistake(&links) {
                return Err((axum::http::StatusCode::BAD_REQUEST, why));
            }
            for l in links.iter().filter(|l| q.picks(l)) {
                if partition {
                    l.state.partition();
                } else {
                    l.state.heal();
                }
            }
            Ok(Json(links_status(&links)))
        }
    };
    let app = Router::new()
        .route(
            "/links",
            get(|State(links): State<Links>| async move { Json(links_status(&links)) }),
        )
        .route("/partition", post(act(true)))
        .route("/cut", post(act(true)))
        .route("/heal", post(act(false)))
        .with_state(links);
    let _ = axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await;
}
