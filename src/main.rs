//! The `meridian` binary: parses the command line, sets up tracing and calls
//! into the library. Nothing here is needed to test meridian's behaviour.

use std::io::BufRead;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio::signal::unix::{signal, SignalKind};

// mimalloc rather than the system allocator: the receiver frees many small
// JSON values per change (a resolved conflict cost ~40% less with it in
// benches/rules.rs; see BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use meridian::capture;
use meridian::cluster::demo::{self, DemoOptions};
use meridian::config::Config;
use meridian::link;
use meridian::proxy::{load_config, Region, Shutdown};
use meridian::rules::RuleSet;
use meridian::wire::scram::Verifier;

#[derive(Parser)]
#[command(
    name = "meridian",
    version,
    about = "Active-active geo-replicated PostgreSQL proxy"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one region's proxy.
    Run {
        #[arg(long)]
        config: PathBuf,
        /// Shift the clock's time source (milliseconds, negative = back). For tests.
        #[arg(long, default_value_t = 0, hide = true, allow_negative_numbers = true)]
        clock_offset_ms: i64,
    },
    /// Install or upgrade meridian's schema in the region's database and
    /// enable capture on every replicated table.
    Migrate {
        #[arg(long)]
        config: PathBuf,
        /// Connect as this role instead of backend.owner (or backend.user):
        /// a superuser, once per region, makes meridian's roles and event
        /// triggers and does everything else as backend.owner.
        #[arg(long = "as", value_name = "ROLE")]
        as_role: Option<String>,
    },
    /// Show the conflicts this region's rule engine decided (newest first).
    Conflicts {
        #[arg(long)]
        config: PathBuf,
        /// Only this table (`schema.table`, or a name in `public`).
        #[arg(long)]
        table: Option<String>,
        /// Only conflicts at most this old, e.g. 1h or 2days.
        #[arg(long, value_parser = humantime::parse_duration)]
        since: Option<Duration>,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: i64,
    },
    /// The cluster as this region sees it: proxy, links, lag and backlog per
    /// peer, held changes, recent conflicts.
    Status {
        #[arg(long)]
        config: PathBuf,
    },
    /// Compare every replicated table across all regions (this one and each
    /// peer's `postgres` database) and name every key that differs. Exit
    /// status 0 only if all are identical.
    Verify {
        #[arg(long)]
        config: PathBuf,
        /// How long keys that differ are re-read before they count (changes
        /// may still be on their way on a live cluster).
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        settle: Duration,
    },
    /// Validate a config file and explain every mistake.
    Check {
        #[arg(long)]
        config: PathBuf,
    },
    /// Start a local multi-region cluster (PostgreSQL + meridian per region).
    Demo {
        /// Number of regions.
        #[arg(long, default_value_t = 3)]
        regions: usize,
        /// First client port; region i listens on port + i, its admin endpoint on port + 1000 + i.
        #[arg(long, default_value_t = 6432)]
        port: u16,
        /// One-way delay between regions (used once replication exists).
        #[arg(long, default_value = "0ms", value_parser = humantime::parse_duration)]
        latency: Duration,
        /// Random extra delay between regions (used once replication exists).
        #[arg(long, default_value = "0ms", value_parser = humantime::parse_duration)]
        jitter: Duration,
        /// SQL file applied to every region before the proxies open.
        #[arg(long)]
        schema: Option<PathBuf>,
        /// Directory of conflict rule files.
        #[arg(long)]
        rules: Option<PathBuf>,
        /// Where the servers' files go (default: a temporary directory).
        #[arg(long)]
        data: Option<PathBuf>,
        /// Keep the servers' files on exit.
        #[arg(long)]
        keep: bool,
    },
    /// Emulate a WAN link: a TCP relay adding latency, jitter and a bandwidth
    /// limit, with an HTTP control API to partition, heal and change settings.
    Link {
        /// Address to accept connections on.
        #[arg(long)]
        listen: std::net::SocketAddr,
        /// Address to relay them to (host:port).
        #[arg(long)]
        to: String,
        /// One-way delay.
        #[arg(long, default_value = "0ms", value_parser = humantime::parse_duration)]
        latency: Duration,
        /// Delay varies uniformly in latency ± jitter (bytes are never reordered).
        #[arg(long, default_value = "0ms", value_parser = humantime::parse_duration)]
        jitter: Duration,
        /// Per direction of each connection, e.g. 10MB/s or 100Mbit/s (default: unlimited).
        #[arg(long, value_parser = meridian::link::parse_bandwidth)]
        bandwidth: Option<u64>,
        /// HTTP control API: GET /status, POST /partition, /heal, /settings?latency=..&jitter=..&bandwidth=..
        #[arg(long)]
        control: Option<std::net::SocketAddr>,
    },
    /// Make a SCRAM-SHA-256 verifier for [[auth.users]] from a password read on stdin.
    Verifier {
        #[arg(long)]
        user: String,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MERIDIAN_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match real_main(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes, each cause once: our error messages already
/// name their source (`... failed: {source}`), and `{:#}` would repeat it.
fn error_chain(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let part = cause.to_string();
        if !text.contains(&part) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&part);
        }
    }
    text
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn real_main(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Check { config } => Ok(check(&config)),
        Command::Run {
            config,
            clock_offset_ms,
        } => {
            let config = load_config(&config)?;
            let mut rt = tokio::runtime::Builder::new_multi_thread();
            if let Some(n) = config.proxy.worker_threads {
                rt.worker_threads(n);
            }
            rt.enable_all()
                .build()?
                .block_on(run(config, clock_offset_ms))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Conflicts {
            config,
            table,
            since,
            limit,
        } => {
            let config = load_config(&config)?;
            let conflicts = runtime()?.block_on(async {
                let client = capture::connect(&config).await?;
                meridian::replication::conflict_log::recent_conflicts(
                    &client,
                    table.as_deref(),
                    since,
                    limit,
                )
                .await
                .context("reading meridian.conflict")
            })?;
            for c in &conflicts {
                print!("{}", meridian::replication::conflict_log::describe(c));
            }
            println!(
                "{} conflict(s) in region {}{}{}",
                conflicts.len(),
                config.region.name,
                table.map(|t| format!(", table {t}")).unwrap_or_default(),
                since
                    .map(|d| format!(", last {}", humantime::format_duration(d)))
                    .unwrap_or_default()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { config } => {
            let config = load_config(&config)?;
            match runtime()?.block_on(meridian::ops::status::report(&config)) {
                Ok(text) => {
                    print!("{text}");
                    Ok(ExitCode::SUCCESS)
                }
                Err(text) => {
                    print!("{text}");
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        Command::Verify { config, settle } => {
            let config = load_config(&config)?;
            let report =
                runtime()?.block_on(meridian::ops::verify::verify(&config, settle, |line| {
                    eprintln!("{line}")
                }))?;
            print!("{}", report.render());
            Ok(if report.identical() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Migrate { config, as_role } => {
            let config = load_config(&config)?;
            let rules = RuleSet::load(&config.replication.rules)?;
            let b = &config.backend;
            let role = as_role
                .or_else(|| b.owner.clone())
                .unwrap_or_else(|| b.user.clone());
            let report = runtime()?.block_on(async {
                let mut client = capture::connect_as(&config, &role).await?;
                capture::migrate(&mut client, &config, &rules).await
            })?;
            for (version, name) in &report.applied {
                println!("applied migration {version:04}_{name}");
            }
            if report.applied.is_empty() {
                println!("schema up to date");
            }
            for (table, status) in &report.tables {
                println!("{table}: {status}");
            }
            println!(
                "{} replicated table(s) in region {} (id {})",
                report.tables.len(),
                config.region.name,
                config.region.id
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo {
            regions,
            port,
            latency,
            jitter,
            schema,
            rules,
            data,
            keep,
        } => {
            let opts = DemoOptions {
                regions,
                port,
                latency,
                jitter,
                schema,
                rules_explicit: rules.is_some(),
                rules: rules.unwrap_or_else(|| PathBuf::from("conflict-rules")),
                data,
                keep,
            };
            runtime()?.block_on(async {
                let stop = async {
                    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
                    tokio::select! { _ = tokio::signal::ctrl_c() => {}, _ = term.recv() => {} }
                };
                demo::run(opts, &mut std::io::stdout(), stop).await
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Link {
            listen,
            to,
            latency,
            jitter,
            bandwidth,
            control,
        } => {
            let settings = link::LinkSettings {
                latency,
                jitter,
                bandwidth,
            };
            runtime()?.block_on(run_link(listen, to, settings, control))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Verifier { user } => {
            eprintln!("password for {user} (read from stdin):");
            let mut password = String::new();
            std::io::stdin()
                .lock()
                .read_line(&mut password)
                .context("reading the password")?;
            let password = password.trim_end_matches(['\r', '\n']);
            anyhow::ensure!(!password.is_empty(), "empty password");
            println!(
                "[[auth.users]]\nname = {:?}\nverifier = \"{}\"",
                user,
                Verifier::generate(password)
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn check(path: &std::path::Path) -> ExitCode {
    match load_config(path) {
        Ok(c) => {
            let rules = match RuleSet::load(&c.replication.rules).and_then(|r| {
                // Region names in rules must be this region or a peer.
                meridian::replication::resolve::Engines::from_rules(&r, &c).map(|_| r)
            }) {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("{e}");
                    eprintln!("1 problem(s) found");
                    return ExitCode::FAILURE;
                }
            };
            println!(
                "{}: ok (region {} id {}, listening on {}, backend {}:{}, auth {:?}, tls {})",
                path.display(),
                c.region.name,
                c.region.id,
                c.proxy.listen,
                c.backend.host,
                c.backend.port,
                c.auth.method,
                if c.tls.is_some() { "on" } else { "off" }
            );
            println!(
                "rules: {} table rule(s) from {}",
                rules.tables.len(),
                c.replication.rules.display()
            );
            ExitCode::SUCCESS
        }
        Err(meridian::config::ConfigError::Invalid { path, problems }) => {
            for p in &problems {
                eprintln!("{}: {p}", path.display());
            }
            eprintln!("{} problem(s) found", problems.len());
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

/// `meridian link`: prints `link listen=... to=... control=...` and `ready`,
/// runs until SIGINT or SIGTERM.
async fn run_link(
    listen: std::net::SocketAddr,
    to: String,
    settings: link::LinkSettings,
    control: Option<std::net::SocketAddr>,
) -> anyhow::Result<()> {
    let (listener, state) = link::bind(listen, to.clone(), settings)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let control = match control {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr} (--control)"))?,
        ),
        None => None,
    };
    let control_url = match &control {
        Some(l) => format!("http://{}", l.local_addr()?),
        None => "none".into(),
    };
    println!("link listen={} to={to} control={control_url}", state.listen);
    println!("ready");
    let stop = tokio_util::sync::CancellationToken::new();
    if let Some(l) = control {
        let (state, stop) = (state.clone(), stop.clone());
        tokio::spawn(async move {
            if let Err(e) = link::serve_control(l, state, stop).await {
                tracing::warn!(error = %e, "link control API failed");
            }
        });
    }
    let relay = tokio::spawn(link::run(listener, state, stop.clone()));
    let mut term = signal(SignalKind::terminate())?;
    tokio::select! { _ = tokio::signal::ctrl_c() => {}, _ = term.recv() => {} }
    stop.cancel();
    let _ = relay.await;
    Ok(())
}

/// `meridian run`: SIGTERM drains, a second SIGTERM or SIGINT exits at once.
async fn run(config: Config, clock_offset_ms: i64) -> anyhow::Result<()> {
    let region = Region::bind_with_clock_offset(&config, clock_offset_ms).await?;
    tracing::info!(
        region = %config.region.name,
        listen = %region.client_addr()?,
        admin = ?region.admin_addr(),
        "meridian proxy ready"
    );
    let shutdown = Shutdown::default();
    let signals = shutdown.clone();
    // SIGHUP: reload the rule files; client sessions are not touched.
    let (rules, reload_config) = (region.rules(), config.clone());
    tokio::spawn(async move {
        let mut hup = signal(SignalKind::hangup()).expect("SIGHUP handler");
        while hup.recv().await.is_some() {
            match rules.reload(&reload_config).await {
                Ok(n) => tracing::info!(tables = n, "SIGHUP: rules reloaded"),
                Err(e) => {
                    tracing::error!(error = %e, "SIGHUP: rules not reloaded, the previous rules stay in force")
                }
            }
        }
    });
    tokio::spawn(async move {
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
        tokio::select! {
            _ = term.recv() => {
                tracing::info!("SIGTERM: draining");
                signals.drain.cancel();
                tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
            }
            _ = int.recv() => {}
        }
        tracing::info!("exiting now");
        signals.drain.cancel();
        signals.abort.cancel();
    });
    region.run(shutdown).await;
    Ok(())
}
