//! Test harness shared by the integration tests: one real PostgreSQL per test
//! binary (cleaned up by its guardian when the binary exits, however it
//! exits), meridian proxies run as real `meridian run` processes, and helpers
//! for real clients (psql, pgbench, Python drivers).
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{mpsc, OnceLock};
use std::time::{Duration, Instant};

use meridian::cluster::postgres::{free_port, PgOptions, PgServer};
use meridian::wire::scram::Verifier;
use tokio_postgres::{Client, NoTls};

pub const APP_USER: &str = "app";
pub const APP_PASSWORD: &str = "correct horse battery staple";

/// Roles the shared server authenticates by password over TCP, to exercise
/// meridian's backend authentication.
pub const SCRAM_ROLE: &str = "scram_role";
pub const MD5_ROLE: &str = "md5_role";
pub const ROLE_PASSWORD: &str = "backend-pw";
/// A role a test creates with a verifier meridian generated; SCRAM over TCP.
pub const MERIDIAN_MADE_ROLE: &str = "meridian_made";

/// The roles a [`Region`] runs meridian with (neither a superuser; README
/// "Roles"), and the ordinary role that owns its database and tables and
/// writes through its proxy.
pub const REGION_OWNER: &str = "meridian_owner";
pub const REGION_APPLIER: &str = "meridian_apply";
pub const REGION_APP: &str = "region_app";

/// The test binary's PostgreSQL server, started once.
pub fn pg() -> &'static PgServer {
    static PG: OnceLock<PgServer> = OnceLock::new();
    PG.get_or_init(|| {
        let dir = scratch_dir("pg");
        let opts = PgOptions {
            hba_first: vec![
                format!("host all {SCRAM_ROLE} 127.0.0.1/32 scram-sha-256"),
                format!("host all {MD5_ROLE} 127.0.0.1/32 md5"),
                format!("host all {MERIDIAN_MADE_ROLE} 127.0.0.1/32 scram-sha-256"),
            ],
            ..PgOptions::default()
        };
        let server = PgServer::start(&dir, &opts).expect("start PostgreSQL");
        let sql = format!(
            "CREATE ROLE {APP_USER} LOGIN SUPERUSER;
             CREATE ROLE {REGION_APP} LOGIN;
             SET password_encryption = 'scram-sha-256';
             CREATE ROLE {SCRAM_ROLE} LOGIN SUPERUSER PASSWORD '{ROLE_PASSWORD}';
             SET password_encryption = 'md5';
             CREATE ROLE {MD5_ROLE} LOGIN SUPERUSER PASSWORD '{ROLE_PASSWORD}';"
        );
        let out = psql_raw(
            &server.socket_conninfo("postgres"),
            &["-c", &sql],
            None,
            &[],
        );
        assert!(
            out.status.success(),
            "set up roles: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        server
    })
}

/// A fresh directory under the system temp dir, removed by its owner.
pub fn scratch_dir(prefix: &str) -> PathBuf {
    let dir = tempfile::Builder::new()
        .prefix(&format!("meridian-test-{prefix}-"))
        .tempdir()
        .expect("tempdir");
    dir.keep()
}

/// Waits until meridian listens; `Err(log)` if it exited first.
/// Waits until this proxy says it is ready (every listener bound), which
/// it logs only after binding. A port that merely accepts connections is
/// not proof: a port picked free may meanwhile be another process's (say,
/// another test's admin endpoint), and a client would talk to that.
fn wait_until_ready(addr: SocketAddr, child: &mut Child, log: &Path) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains("meridian proxy ready") {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            let log = std::fs::read_to_string(log).unwrap_or_default();
            return Err(format!("meridian exited before listening: {status}\n{log}"));
        }
        assert!(
            Instant::now() < deadline,
            "meridian did not get ready to listen on {addr}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// TLS material for a proxy: a self-signed certificate for localhost/127.0.0.1.
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub cert_der: Vec<u8>,
}

pub fn tls_files() -> &'static TlsFiles {
    static TLS: OnceLock<TlsFiles> = OnceLock::new();
    TLS.get_or_init(|| {
        // Under target/: reused by later runs instead of piling up in /tmp.
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("test-tls");
        std::fs::create_dir_all(&dir).unwrap();
        let ck = rcgen::generate_simple_self_signed(vec![
            "localhost".to_string(),
            "127.0.0.1".to_string(),
        ])
        .expect("certificate");
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        std::fs::write(&cert, ck.cert.pem()).unwrap();
        std::fs::write(&key, ck.key_pair.serialize_pem()).unwrap();
        TlsFiles {
            cert,
            key,
            cert_der: ck.cert.der().to_vec(),
        }
    })
}

/// How a test proxy is configured.
pub struct ProxySpec {
    pub scram: bool,
    pub tls: bool,
    /// Connect to the backend over TCP as this role with ROLE_PASSWORD, instead of the Unix socket.
    pub backend_role_password: bool,
    pub extra_proxy: String,
}

impl Default for ProxySpec {
    fn default() -> Self {
        ProxySpec {
            scram: true,
            tls: true,
            backend_role_password: false,
            extra_proxy: String::new(),
        }
    }
}

/// A `meridian run` process; killed on drop.
pub struct Proxy {
    pub child: Child,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub config_path: PathBuf,
    pub scram: bool,
    pub tls: bool,
    /// The config's directory was made by `Proxy::start` and goes with the proxy.
    owns_dir: bool,
}

impl Proxy {
    pub fn start(spec: ProxySpec) -> Proxy {
        let pg = pg();
        let port = free_port().unwrap();
        let admin_port = free_port().unwrap();
        let verifier = Verifier::generate(APP_PASSWORD);
        let mut users = String::new();
        for user in [APP_USER, SCRAM_ROLE, MD5_ROLE, "postgres"] {
            users.push_str(&format!(
                "[[auth.users]]\nname = \"{user}\"\nverifier = \"{verifier}\"\n"
            ));
        }
        let auth = if spec.scram {
            format!("[auth]\nmethod = \"scram-sha-256\"\n{users}")
        } else {
            "[auth]\nmethod = \"trust\"\n".into()
        };
        let backend = if spec.backend_role_password {
            format!(
                "[backend]\nhost = \"127.0.0.1\"\nport = {}\npassword = \"{ROLE_PASSWORD}\"\n",
                pg.port
            )
        } else {
            format!(
                "[backend]\nhost = \"{}\"\nport = {}\n",
                pg.socket_dir().display(),
                pg.port
            )
        };
        let tls = if spec.tls {
            let t = tls_files();
            format!(
                "[tls]\ncert = \"{}\"\nkey = \"{}\"\n",
                t.cert.display(),
                t.key.display()
            )
        } else {
            String::new()
        };
        let config = format!(
            "[region]\nname = \"test\"\nid = 1\n\n[proxy]\nlisten = \"127.0.0.1:{port}\"\n{}\n{backend}\n{auth}\n{tls}\n[admin]\nlisten = \"127.0.0.1:{admin_port}\"\n",
            spec.extra_proxy
        );
        let dir = scratch_dir("proxy");
        let config_path = dir.join("meridian.toml");
        std::fs::write(&config_path, config).unwrap();
        let mut proxy = Proxy::spawn(&config_path, port, admin_port, spec.scram, spec.tls, &[]);
        proxy.owns_dir = true;
        proxy
    }

    /// Runs a proxy from an existing config file (TLS and SCRAM as it says).
    pub fn start_with_config(config_path: &Path) -> Proxy {
        Proxy::start_with_config_args(config_path, &[])
    }

    /// As `start_with_config`, with extra `meridian run` arguments.
    pub fn start_with_config_args(config_path: &Path, args: &[&str]) -> Proxy {
        let c = meridian::config::Config::load(config_path).expect("valid test config");
        let admin = c.admin.listen.map(|a| a.port()).unwrap_or(0);
        let scram = c.auth.method == meridian::config::AuthMethod::ScramSha256;
        Proxy::spawn(
            config_path,
            c.proxy.listen.port(),
            admin,
            scram,
            c.tls.is_some(),
            args,
        )
    }

    fn spawn(
        config_path: &Path,
        port: u16,
        admin_port: u16,
        scram: bool,
        tls: bool,
        args: &[&str],
    ) -> Proxy {
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        // A restarted proxy binds the ports it had; while it was down another
        // process (often an outgoing connection's ephemeral port) may hold one
        // for a moment. Only that is retried.
        let mut attempt = 0;
        let child = loop {
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_meridian"));
            cmd.args(["run", "--config"])
                .arg(config_path)
                .args(args)
                .env("MERIDIAN_LOG", "info,meridian=debug");
            cmd.stdout(Stdio::null()).stderr(Stdio::from(
                std::fs::File::create(config_path.with_extension("log")).unwrap(),
            ));
            let mut child = spawn_tied(&mut cmd);
            match wait_until_ready(addr, &mut child, &config_path.with_extension("log")) {
                Ok(()) => break child,
                Err(log) if log.contains("Address already in use") && attempt < 50 => {
                    attempt += 1;
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(log) => panic!("{log}"),
            }
        };
        Proxy {
            child,
            addr,
            admin: format!("127.0.0.1:{admin_port}").parse().unwrap(),
            config_path: config_path.into(),
            scram,
            tls,
            owns_dir: false,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, sig: i32) {
        unsafe {
            libc::kill(self.pid(), sig);
        }
    }

    /// The proxy's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.config_path.with_extension("log")).unwrap_or_default()
    }

    /// libpq URL for `user` (password and sslmode as the proxy requires).
    pub fn url(&self, user: &str, database: &str) -> String {
        let password = if self.scram {
            format!(":{}", urlencode(APP_PASSWORD))
        } else {
            String::new()
        };
        let ssl = if self.tls { "require" } else { "disable" };
        format!(
            "postgres://{user}{password}@127.0.0.1:{}/{database}?sslmode={ssl}",
            self.addr.port()
        )
    }

    /// Resident memory of the proxy process, in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- meridian log ---\n{}", self.log());
        }
        if let Some(dir) = self.config_path.parent().filter(|_| self.owns_dir) {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Spawns a child that the kernel kills if the spawning thread dies, so a
/// failed test never leaves a meridian process (and its servers) behind.
pub fn spawn_tied(cmd: &mut Command) -> Child {
    // SAFETY: prctl is async-signal-safe and touches only this process.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    cmd.spawn().expect("spawn meridian")
}

pub fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Runs psql against `conninfo` with `args`, feeding `stdin`.
pub fn psql_raw(
    conninfo: &str,
    args: &[&str],
    stdin: Option<&str>,
    env: &[(&str, &str)],
) -> Output {
    let mut cmd = Command::new("psql");
    cmd.arg(conninfo)
        .args(["-X", "-v", "ON_ERROR_STOP=1"])
        .args(args);
    cmd.envs(env.iter().copied());
    run_with_stdin(&mut cmd, stdin)
}

/// Runs `cmd` with stdout/stderr captured, feeding it `stdin` if given.
pub fn run_with_stdin(cmd: &mut Command, stdin: Option<&str>) -> Output {
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn");
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    child.wait_with_output().unwrap()
}

/// psql that must succeed; returns stdout and stderr.
pub fn psql(conninfo: &str, args: &[&str], stdin: Option<&str>) -> (String, String) {
    let out = psql_raw(conninfo, args, stdin, &[]);
    let (o, e) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(out.status.success(), "psql failed: {e}\n{o}");
    (o, e)
}

/// A Python interpreter with psycopg 3, asyncpg, SQLAlchemy 2, Alembic and
/// Django 5, in a venv under target/ (made once; the marker file names the
/// package set, so a venv from an older set is brought up to date).
pub fn python() -> &'static Path {
    static PY: OnceLock<PathBuf> = OnceLock::new();
    PY.get_or_init(|| {
        let venv = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("target")
            .join("test-venv");
        let py = venv.join("bin").join("python");
        let ready = venv.join(".meridian-ready-2");
        if !ready.exists() {
            let ok = Command::new("python3")
                .args(["-m", "venv"])
                .arg(&venv)
                .status()
                .map(|s| s.success());
            assert!(matches!(ok, Ok(true)), "python3 -m venv failed");
            let out = Command::new(&py)
                .args([
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "--disable-pip-version-check",
                    "psycopg[binary]>=3.1,<4",
                    "asyncpg>=0.29",
                    "sqlalchemy>=2,<3",
                    "alembic>=1.12,<2",
                    "django>=5,<6",
                ])
                .output()
                .expect("pip");
            assert!(
                out.status.success(),
                "pip install failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            std::fs::write(&ready, "").unwrap();
        }
        py
    })
}

/// Runs tests/python/<script> with the given URL; asserts it exits 0.
pub fn run_python(script: &str, url: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("python")
        .join(script);
    let out = Command::new(python())
        .arg(&path)
        .arg(url)
        .output()
        .expect("python");
    let (o, e) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(
        out.status.success(),
        "{script} failed:\nstdout:\n{o}\nstderr:\n{e}"
    );
    o
}

/// Runs pgbench with `args` against `url`; returns its stdout. Asserts success.
pub fn pgbench(url: &str, args: &[&str]) -> String {
    let out = Command::new("pgbench")
        .args(args)
        .arg(url)
        .output()
        .expect("pgbench");
    let (o, e) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(out.status.success(), "pgbench {args:?} failed:\n{o}\n{e}");
    o
}

/// Polls `cond` until it holds or the deadline passes.
pub fn eventually(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Polls `get` until `ok` accepts its value (at most `limit`) and returns
/// it; on timeout the failure shows `what` and the last value seen (so put
/// what explains a failure, like held changes, into the value).
pub fn eventually_value<T: std::fmt::Debug>(
    what: &str,
    limit: Duration,
    mut get: impl FnMut() -> T,
    mut ok: impl FnMut(&T) -> bool,
) -> T {
    let deadline = Instant::now() + limit;
    loop {
        let value = get();
        if ok(&value) {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for: {what}; last seen: {value:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// GET `path` from an HTTP endpoint with a plain HTTP/1.0 request; the whole response.
pub fn http_get(addr: &str, path: &str) -> String {
    http(addr, "GET", path)
}

/// An HTTP/1.0 request without a body; the whole response (status line, headers, body).
pub fn http(addr: &str, method: &str, path: &str) -> String {
    use std::io::Read;
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(format!("{method} {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// Waits for a child process to exit; returns its status.
pub fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    let mut status = None;
    eventually("the process to exit", Duration::from_secs(60), || {
        status = child.try_wait().unwrap();
        status.is_some()
    });
    status.unwrap()
}

/// `db` straight to Postgres as [`REGION_APP`].
pub fn app_conninfo(db: &str) -> String {
    pg().socket_conninfo(db).replace(
        &format!("user={}", pg().superuser()),
        &format!("user={REGION_APP}"),
    )
}

/// A database with meridian migrated into it and a proxy in front of it.
pub struct Region {
    pub db: String,
    pub config: PathBuf,
    pub proxy: Option<Proxy>,
}

impl Region {
    /// Creates database `db` from `schema`, writes `rules` (file name, text)
    /// and a config, and runs `meridian migrate`; returns the region and the
    /// migrate output. Does not start the proxy.
    pub fn prepare(
        db: &str,
        schema: &str,
        rules: &[(&str, &str)],
    ) -> (Region, std::process::Output) {
        Region::prepare_as(db, 3, schema, rules, "")
    }

    /// As `prepare`, as region `id`, with `extra` appended to the config's
    /// `[replication]` section (listen, secret, peers).
    pub fn prepare_as(
        db: &str,
        id: u16,
        schema: &str,
        rules: &[(&str, &str)],
        extra: &str,
    ) -> (Region, std::process::Output) {
        let pg = pg();
        psql(
            &pg.socket_conninfo("postgres"),
            &[
                "-c",
                &format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"),
                "-c",
                &format!("CREATE DATABASE {db} OWNER {REGION_APP}"),
            ],
            None,
        );
        if !schema.is_empty() {
            psql(&app_conninfo(db), &["-c", schema], None);
        }
        let dir = scratch_dir(db);
        let rules_dir = dir.join("rules");
        std::fs::create_dir_all(&rules_dir).unwrap();
        for (name, text) in rules {
            std::fs::write(rules_dir.join(name), text).unwrap();
        }
        let (port, admin) = (free_port().unwrap(), free_port().unwrap());
        let name = db.replace('_', "-");
        let config = dir.join("meridian.toml");
        std::fs::write(
            &config,
            format!(
                "[region]\nname = \"{name}\"\nid = {id}\n\n[proxy]\nlisten = \"127.0.0.1:{port}\"\n\n\
                 [backend]\nhost = \"{}\"\nport = {}\nuser = \"{REGION_APPLIER}\"\nowner = \"{REGION_OWNER}\"\ndatabase = \"{db}\"\n\n\
                 [auth]\nmethod = \"trust\"\n\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n\n\
                 [replication]\nrules = \"rules\"\n{extra}\n",
                pg.socket_dir().display(),
                pg.port,
            ),
        )
        .unwrap();
        let region = Region {
            db: db.into(),
            config,
            proxy: None,
        };
        let out = region.migrate();
        (region, out)
    }

    /// `prepare` that must migrate cleanly, then starts the proxy.
    pub fn start(db: &str, schema: &str, rules: &[(&str, &str)]) -> Region {
        let (mut region, out) = Region::prepare(db, schema, rules);
        assert!(
            out.status.success(),
            "migrate failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        region.proxy = Some(Proxy::start_with_config(&region.config));
        region
    }

    /// `meridian migrate --as` the superuser: makes meridian's roles (and
    /// any event trigger that is missing) and does the rest as the owner.
    pub fn migrate(&self) -> std::process::Output {
        Command::new(env!("CARGO_BIN_EXE_meridian"))
            .args(["migrate", "--as", pg().superuser(), "--config"])
            .arg(&self.config)
            .output()
            .unwrap()
    }

    pub fn proxy(&self) -> &Proxy {
        self.proxy.as_ref().expect("proxy started")
    }

    /// libpq URL through the proxy.
    pub fn url(&self) -> String {
        self.proxy().url(REGION_APP, &self.db)
    }

    /// conninfo straight to Postgres, bypassing the proxy.
    pub fn direct(&self) -> String {
        pg().socket_conninfo(&self.db)
    }

    pub async fn client(&self) -> Client {
        let (client, conn) = tokio_postgres::connect(&self.url(), NoTls).await.unwrap();
        tokio::spawn(conn);
        client
    }

    pub async fn direct_client(&self) -> Client {
        let (client, conn) = tokio_postgres::connect(&self.direct(), NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        client
    }

    /// Applies `changes` (a JSON array of changes as a peer ships them) as
    /// region `origin`'s, through the receiver's apply entry point, in a
    /// session marked as the receiver's.
    pub fn apply_changes(&self, origin: u16, changes: &str) -> meridian::replication::Applied {
        let changes: Vec<meridian::replication::protocol::Change> =
            serde_json::from_str(changes).expect("changes as a peer ships them");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut client = self.direct_client().await;
            client
                .execute("SELECT meridian.apply_session_setup()", &[])
                .await
                .unwrap();
            let engines = meridian::replication::resolve::Engines::default();
            meridian::replication::apply::apply(&mut client, None, &engines, origin, None, &changes)
                .await
                .unwrap()
        })
    }

    /// Waits until capture has recorded every transaction committed so far
    /// (capture reads the WAL after commit): a sync point is placed in the
    /// WAL and capture's progress must pass it.
    pub fn captured(&self) {
        let lsn = self.query(meridian::capture::wal::Barrier::EMIT);
        let passed = format!(
            "SELECT lsn >= '{}'::pg_lsn FROM meridian.capture_progress",
            lsn[0]
        );
        eventually(
            "capture recorded what was committed",
            Duration::from_secs(60),
            || self.query(&passed) == ["t"],
        );
    }

    /// conninfo straight to Postgres as the application's role.
    pub fn app_direct(&self) -> String {
        app_conninfo(&self.db)
    }

    /// One column of one query, straight to Postgres, as text.
    pub fn query(&self, sql: &str) -> Vec<String> {
        let (out, _) = psql(&self.direct(), &["-At", "-c", sql], None);
        out.lines().map(str::to_string).collect()
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        self.proxy.take();
        if let Some(dir) = self.config.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// A running `meridian demo` (stopped when dropped).
pub struct Demo {
    pub child: Child,
    /// Per region: name, client URL, admin address.
    pub regions: Vec<(String, String, String)>,
}

/// Starts a demo on free ports, retrying if another process took one meanwhile.
pub fn start_demo(regions: usize, extra: &[&str]) -> Demo {
    for attempt in 0..5 {
        let port = 20000 + (std::process::id() as u16 % 5000) * 2 + attempt * 10;
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_meridian"));
        cmd.args([
            "demo",
            "--regions",
            &regions.to_string(),
            "--port",
            &port.to_string(),
        ])
        .args(extra);
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = spawn_tied(&mut cmd);
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut lines = Vec::new();
        loop {
            match rx.recv_timeout(Duration::from_secs(120)) {
                Ok(l) if l == "ready" => break,
                Ok(l) => lines.push(l),
                Err(_) => break,
            }
        }
        if lines.len() != regions {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            if err.contains("already in use") {
                continue;
            }
            panic!("demo did not become ready: {lines:?}\n{err}");
        }
        let regions = lines
            .iter()
            .map(|l| {
                let parts: Vec<&str> = l.split(' ').collect();
                assert_eq!(parts.len(), 3, "{l}");
                let field = |i: usize, key: &str| {
                    parts[i]
                        .strip_prefix(key)
                        .unwrap_or_else(|| panic!("{l}"))
                        .to_string()
                };
                (field(0, "region="), field(1, "url="), field(2, "admin="))
            })
            .collect();
        return Demo { child, regions };
    }
    panic!("no free ports for the demo");
}

impl Drop for Demo {
    fn drop(&mut self) {
        // Only reached with the process still running when a test failed.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Demo {
    pub fn stop(&mut self, signal: i32) -> std::process::ExitStatus {
        unsafe {
            libc::kill(self.child.id() as i32, signal);
        }
        wait_exit(&mut self.child)
    }
}
