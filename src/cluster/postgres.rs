//! Real PostgreSQL servers for the demo, the tests and the benchmarks.
//!
//! Each server is initialised with `initdb` and run by a small guardian shell
//! that holds the read end of a pipe whose write end only this process owns.
//! When the owner drops the [`PgServer`], exits, panics or is killed, the pipe
//! closes, and the guardian stops Postgres (fast shutdown) and removes its
//! directory. So no test run, however it ends, leaves a server behind.
//! The same pipe carries one command, `restart`, for a test that kills the
//! postmaster: the guardian starts it again on the same data.
//! As root, Postgres (which refuses to run as root) runs as `postgres`.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error("PostgreSQL binaries not found (looked in $MERIDIAN_PG_BIN, `pg_config --bindir`, /usr/lib/postgresql/*/bin); install PostgreSQL 15, e.g. `apt-get install postgresql`")]
    NoBinaries,
    #[error("running as root but there is no `postgres` user to run PostgreSQL as")]
    NoPostgresUser,
    #[error("{what} failed: {detail}")]
    Command { what: String, detail: String },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// How a server is set up.
#[derive(Debug, Clone)]
pub struct PgOptions {
    /// TCP port on 127.0.0.1; a free one when `None`.
    pub port: Option<u16>,
    /// fsync and synchronous_commit on. Tests turn this off for speed.
    pub durable: bool,
    /// Remove the server's directory when it stops.
    pub remove_on_stop: bool,
    /// Extra `name=value` settings passed as `-c`.
    pub settings: Vec<(String, String)>,
    /// pg_hba.conf lines placed before the default `trust` ones (first match wins).
    pub hba_first: Vec<String>,
}

impl Default for PgOptions {
    fn default() -> Self {
        PgOptions {
            port: None,
            durable: false,
            remove_on_stop: true,
            settings: Vec::new(),
            hba_first: Vec::new(),
        }
    }
}

/// A running PostgreSQL server; stopped and cleaned up on drop.
#[derive(Debug)]
pub struct PgServer {
    pub port: u16,
    /// Directory holding the server's Unix socket (and its data and log).
    pub dir: PathBuf,
    guardian: Child,
    guardian_stdin: Option<ChildStdin>,
    remove_on_stop: bool,
}

const SUPERUSER: &str = "postgres";

/// Finds the directory holding initdb and postgres.
pub fn bindir() -> Result<PathBuf, PgError> {
    let has_server = |d: &Path| d.join("initdb").is_file() && d.join("postgres").is_file();
    if let Some(d) = std::env::var_os("MERIDIAN_PG_BIN").map(PathBuf::from) {
        return if has_server(&d) {
            Ok(d)
        } else {
            Err(PgError::NoBinaries)
        };
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let d = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if has_server(&d) {
            return Ok(d);
        }
    }
    let mut candidates: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(_, d)| has_server(d))
        .collect();
    candidates.sort();
    candidates.pop().map(|(_, d)| d).ok_or(PgError::NoBinaries)
}

/// A TCP port on 127.0.0.1 that was free a moment ago, below the kernel's
/// range of ephemeral ports: a port from that range (what binding port 0
/// gives) can be taken by any outgoing connection before the server it was
/// chosen for binds it, and stays taken while that connection lives (a
/// clean-clone CI run failed so: "Address already in use" on a region's
/// port for the whole of the harness's 5 s of retries). Ports are taken in
/// turn from a start that differs per process, each checked by binding it.
pub fn free_port() -> std::io::Result<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const LOWEST: u32 = 10_000;
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768);
    if ephemeral <= LOWEST + 1_000 {
        // No room below the ephemeral range: let the kernel choose.
        return Ok(std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port());
    }
    let span = ephemeral - LOWEST;
    let start = std::process::id().wrapping_mul(7_919) % span;
    for _ in 0..span {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (LOWEST + (start + n) % span) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// (uid, gid) of the `postgres` user.
fn postgres_ids() -> Result<(u32, u32), PgError> {
    let out = Command::new("id").args(["-u", "postgres"]).output()?;
    let gid = Command::new("id").args(["-g", "postgres"]).output()?;
    let parse = |o: &std::process::Output| {
        String::from_utf8_lossy(&o.stdout)
            .trim()
            .parse::<u32>()
            .ok()
    };
    match (out.status.success(), parse(&out), parse(&gid)) {
        (true, Some(u), Some(g)) => Ok((u, g)),
        _ => Err(PgError::NoPostgresUser),
    }
}

/// Prepares a command to run as the user servers run as (postgres when we
/// are root), for tools that refuse root too (PgBouncer in the benchmarks).
pub fn as_server_user(cmd: &mut Command) -> Result<(), PgError> {
    let owner = if is_root() {
        Some(postgres_ids()?)
    } else {
        None
    };
    as_owner(cmd, owner);
    Ok(())
}

/// Prepares a command to run as the server's owner (postgres when we are root).
fn as_owner(cmd: &mut Command, owner: Option<(u32, u32)>) {
    if let Some((uid, gid)) = owner {
        cmd.uid(uid).gid(gid).env("HOME", "/tmp");
    }
}

impl PgServer {
    /// Initialises and starts a server in `dir` (created if missing). A `dir`
    /// kept from an earlier server (`remove_on_stop: false`) is started again
    /// with its data.
    pub fn start(dir: &Path, opts: &PgOptions) -> Result<PgServer, PgError> {
        let bin = bindir()?;
        let owner = if is_root() {
            Some(postgres_ids()?)
        } else {
            None
        };
        std::fs::create_dir_all(dir)?;
        let dir = dir.canonicalize()?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid))?;
            // The postgres user must be able to reach the directory.
            let mut parent = dir.parent();
            while let Some(p) = parent {
                let mode = std::fs::metadata(p)?.permissions().mode();
                if mode & 0o001 == 0 {
                    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode | 0o001))?;
                }
                parent = p.parent();
            }
        }
        let data = dir.join("data");
        let mut initdb = Command::new(bin.join("initdb"));
        initdb
            .args(["-D"])
            .arg(&data)
            .args([
                "-U",
                SUPERUSER,
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
                "--no-instructions",
            ])
            .stdin(Stdio::null());
        as_owner(&mut initdb, owner);
        // A directory holding a cluster already (kept from an earlier start)
        // is started as it is.
        let existing = data.join("PG_VERSION").is_file();
        if !existing {
            let out = initdb.output()?;
            if !out.status.success() {
                return Err(PgError::Command {
                    what: "initdb".into(),
                    detail: String::from_utf8_lossy(&out.stderr).into(),
                });
            }
        }
        if !opts.hba_first.is_empty() && !existing {
            let hba = data.join("pg_hba.conf");
            let default = std::fs::read_to_string(&hba)?;
            std::fs::write(&hba, format!("{}\n{default}", opts.hba_first.join("\n")))?;
        }
        let port = match opts.port {
            Some(p) => p,
            None => free_port()?,
        };
        let mut settings = vec![
            ("listen_addresses".to_string(), "127.0.0.1".to_string()),
            ("max_connections".into(), "200".into()),
            ("logging_collector".into(), "off".into()),
            // Capture reads the WAL through one logical slot per database,
            // and each apply session takes a replication origin, whose
            // state counts against max_replication_slots too.
            ("wal_level".into(), "logical".into()),
            ("max_replication_slots".into(), "500".into()),
            ("max_wal_senders".into(), "100".into()),
        ];
        if !opts.durable {
            settings.push(("fsync".into(), "off".into()));
            settings.push(("synchronous_commit".into(), "off".into()));
            settings.push(("full_page_writes".into(), "off".into()));
        }
        settings.extend(opts.settings.iter().cloned());
        let mut args = format!("-p {port} -k '{}'", dir.display());
        for (k, v) in &settings {
            args.push_str(&format!(" -c '{k}={v}'"));
        }
        // After a killed postmaster, its sessions may hold its shared memory
        // for a moment, and a new postmaster refuses to start until they
        // are gone: it is started again until it stays up.
        let script = format!(
            r#"set -u
start() {{
    "{bin}/postgres" -D "{data}" {args} </dev/null >>"{log}" 2>&1 &
    pg=$!
}}
start
while read -r cmd && [ "$cmd" = restart ]; do
    wait "$pg"
    start
    sleep 0.5
    while ! kill -0 "$pg" 2>/dev/null; do
        sleep 0.2
        start
        sleep 0.5
    done
done
kill -INT "$pg" 2>/dev/null
wait "$pg"
if [ "{remove}" = 1 ]; then rm -rf "{dir}"; fi
"#,
            bin = bin.display(),
            data = data.display(),
            log = dir.join("postgres.log").display(),
            remove = u8::from(opts.remove_on_stop),
            dir = dir.display(),
        );
        let mut guardian = Command::new("sh");
        guardian
            .arg("-c")
            .arg(script)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // Own process group: a Ctrl-C in the terminal must not kill the guardian
        // before it has cleaned up; the pipe decides when it stops.
        guardian.process_group(0);
        as_owner(&mut guardian, owner);
        let mut guardian = guardian.spawn()?;
        let guardian_stdin = guardian.stdin.take();
        let mut server = PgServer {
            port,
            dir,
            guardian,
            guardian_stdin,
            remove_on_stop: opts.remove_on_stop,
        };
        server.wait_ready(Duration::from_secs(60))?;
        Ok(server)
    }

    fn wait_ready(&mut self, limit: Duration) -> Result<(), PgError> {
        let deadline = Instant::now() + limit;
        loop {
            if self.ready_postmaster().is_some() {
                return Ok(());
            }
            if self.guardian.try_wait()?.is_some() || Instant::now() > deadline {
                return Err(self.start_failed());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The postmaster's pid, once its lock file says it accepts connections.
    fn ready_postmaster(&self) -> Option<String> {
        let pidfile = self.dir.join("data").join("postmaster.pid");
        let status = std::fs::read_to_string(pidfile).unwrap_or_default();
        let mut lines = status.lines();
        let pid = lines.next()?.trim().to_string();
        (lines.nth(6).map(str::trim) == Some("ready")).then_some(pid)
    }

    fn start_failed(&self) -> PgError {
        let log = std::fs::read_to_string(self.dir.join("postgres.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        PgError::Command {
            what: "postgres start".into(),
            detail: lines[lines.len().saturating_sub(10)..].join("\n"),
        }
    }

    /// Kills the postmaster with SIGKILL, as a crash of the machine would
    /// end it (its sessions go too), and starts it again on the same data:
    /// Postgres recovers from the WAL. Returns once it accepts connections.
    pub fn crash_and_restart(&self) -> Result<(), PgError> {
        let old = self.ready_postmaster().ok_or_else(|| self.start_failed())?;
        let killed = Command::new("kill").args(["-KILL", &old]).status()?;
        if !killed.success() {
            return Err(PgError::Command {
                what: format!("kill -KILL {old}"),
                detail: "the postmaster could not be killed".into(),
            });
        }
        let mut stdin = self
            .guardian_stdin
            .as_ref()
            .ok_or_else(|| self.start_failed())?;
        stdin.write_all(b"restart\n")?;
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.ready_postmaster().map_or(true, |pid| pid == old) {
            if Instant::now() > deadline {
                return Err(self.start_failed());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Socket directory, usable as `host` by libpq clients and by meridian's backend config.
    pub fn socket_dir(&self) -> &Path {
        &self.dir
    }

    /// A libpq URL over TCP.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://{SUPERUSER}@127.0.0.1:{}/{database}", self.port)
    }

    /// A tokio-postgres / libpq key-value connection string over the Unix socket.
    pub fn socket_conninfo(&self, database: &str) -> String {
        format!(
            "host={} port={} user={SUPERUSER} dbname={database}",
            self.dir.display(),
            self.port
        )
    }

    pub fn superuser(&self) -> &'static str {
        SUPERUSER
    }

    /// Stops the server now (fast shutdown) and waits for the guardian to finish.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(mut stdin) = self.guardian_stdin.take() {
            let _ = stdin.write_all(b"\n");
            drop(stdin);
            let _ = self.guardian.wait();
            if self.remove_on_stop {
                // The guardian emptied it; the directory entry itself may sit in
                // a parent only we (root) can write to.
                let _ = std::fs::remove_dir_all(&self.dir);
            }
        }
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}
