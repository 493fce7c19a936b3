//! Helpers shared by the end-to-end benchmarks: pgbench runs and `meridian
//! run` processes. Not tests: nothing here asserts on speed.
#![allow(dead_code)]

use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use meridian::cluster::postgres::{as_server_user, free_port, PgServer};

pub fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

pub struct Result {
    pub tps: f64,
    pub latency_ms: f64,
    pub transactions: f64,
}

pub fn pgbench(url: &str, args: &[&str]) -> Result {
    pgbench_env(url, args, &[])
}

/// pgbench with extra environment (for example PGOPTIONS).
pub fn pgbench_env(url: &str, args: &[&str], env: &[(&str, &str)]) -> Result {
    let out = Command::new("pgbench")
        .args(args)
        .arg(url)
        .envs(env.iter().copied())
        .output()
        .expect("pgbench");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "pgbench failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    if args.contains(&"-i") {
        return Result {
            tps: 0.0,
            latency_ms: 0.0,
            transactions: 0.0,
        };
    }
    assert!(text.contains("number of failed transactions: 0"), "{text}");
    let find = |prefix: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(prefix))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("no {prefix:?} in {text}"))
    };
    Result {
        tps: find("tps = "),
        latency_ms: find("latency average = "),
        transactions: text
            .lines()
            .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
            .and_then(|v| v.split('/').next()?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no transaction count in {text}")),
    }
}

/// Kills the proxy when dropped, also when the bench panics.
pub struct ProxyProcess(Child);

impl From<Child> for ProxyProcess {
    fn from(child: Child) -> Self {
        ProxyProcess(child)
    }
}

impl ProxyProcess {
    /// The fields of /proc/PID/stat after the command name (which is in
    /// parentheses and may hold spaces).
    fn stat(&self) -> Vec<u64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.0.id())).unwrap();
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        rest.split_whitespace()
            .map(|f| f.parse().unwrap_or(0))
            .collect()
    }

    /// CPU time the process has used so far, all its threads, user and
    /// kernel (from /proc; the unit is the kernel's clock tick).
    pub fn cpu_seconds(&self) -> f64 {
        let fields = self.stat();
        // SAFETY: sysconf has no preconditions.
        (fields[11] + fields[12]) as f64 / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
    }

    /// Minor page faults of the process so far.
    pub fn page_faults(&self) -> u64 {
        self.stat()[7]
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn start_proxy(dir: &std::path::Path, backend: &str, proxy_extra: &str) -> (ProxyProcess, u16) {
    let port = free_port().unwrap();
    let config = format!(
        "[region]\nname = \"bench\"\nid = 1\n[proxy]\nlisten = \"127.0.0.1:{port}\"\n{proxy_extra}\n{backend}\n[auth]\nmethod = \"trust\"\n"
    );
    let path = dir.join(format!("proxy-{port}.toml"));
    std::fs::write(&path, config).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_meridian"))
        .args(["run", "--config"])
        .arg(&path)
        .env("MERIDIAN_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("meridian");
    let child = ProxyProcess(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "proxy did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    (child, port)
}

/// PgBouncer (Debian's package) in session mode in front of `pg`'s
/// databases `dbs`, over its Unix socket, as a user would set it up for one
/// application: trust auth, no pooling beyond one server session per client.
pub fn start_pgbouncer(pg: &PgServer, dbs: &[&str]) -> (ProxyProcess, u16) {
    let port = free_port().unwrap();
    // The server's directory is one the postgres user can write.
    let dir = pg.socket_dir().join(format!("pgbouncer-{port}"));
    std::fs::create_dir_all(&dir).unwrap();
    let users = dir.join("users.txt");
    std::fs::write(&users, format!("\"{}\" \"\"\n", pg.superuser())).unwrap();
    let ini = dir.join("pgbouncer.ini");
    std::fs::write(
        &ini,
        format!(
            "[databases]\n{}\
             [pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n\
             auth_type = trust\nauth_file = {}\npool_mode = session\n\
             max_client_conn = 200\ndefault_pool_size = 100\nlogfile = {}\n",
            dbs.iter()
                .map(|db| format!(
                    "{db} = host={} port={} dbname={db}\n",
                    pg.socket_dir().display(),
                    pg.port
                ))
                .collect::<String>(),
            users.display(),
            dir.join("pgbouncer.log").display(),
        ),
    )
    .unwrap();
    let status = Command::new("chown")
        .args(["-R", "--reference"])
        .arg(pg.socket_dir())
        .arg(&dir)
        .status()
        .unwrap();
    assert!(status.success(), "chown of PgBouncer's directory");
    let mut cmd = Command::new("pgbouncer");
    cmd.arg(&ini).stdout(Stdio::null()).stderr(Stdio::null());
    as_server_user(&mut cmd).unwrap();
    let child = ProxyProcess(cmd.spawn().expect("pgbouncer (apt-get install pgbouncer)"));
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "PgBouncer did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    (child, port)
}

/// Median and range of paired ratios (`runs[round][target] / runs[round][0]`).
pub fn paired_ratios(results: &[Vec<Result>], target: usize) -> (f64, f64, f64) {
    let mut ratios: Vec<f64> = results.iter().map(|r| r[target].tps / r[0].tps).collect();
    ratios.sort_by(f64::total_cmp);
    (
        ratios[ratios.len() / 2],
        ratios[0],
        ratios[ratios.len() - 1],
    )
}

/// psql against `db` of `pg`, quiet and unaligned; panics with psql's error.
pub fn psql(pg: &PgServer, db: &str, sql: &str) -> String {
    let out = Command::new("psql")
        .arg(pg.socket_conninfo(db))
        .args(["-X", "-q", "-At", "-c", sql])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// `meridian migrate --config config`; panics with its error.
pub fn migrate(config: &std::path::Path) {
    let out = Command::new(env!("CARGO_BIN_EXE_meridian"))
        .args(["migrate", "--config"])
        .arg(config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
