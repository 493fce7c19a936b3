//! The driver and ORM matrix: real client libraries (pgJDBC, node-postgres,
//! postgres.js, pgx v4, psycopg 3, asyncpg, SQLAlchemy 2 with Alembic,
//! Django 5, Ruby's pg, PHP's PDO) run their scripts under tests/drivers/
//! through region 1 of one shared 2-region `meridian demo`; each test then
//! checks that region 2 converges to the same rows and the same schema for
//! that client's tables. Every client uses its own table prefix, so the
//! tests run in parallel. The tools come from Debian (`bash .ci/test`
//! installs them); npm and PyPI packages are installed under target/ on
//! first use.

mod support;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use support::*;

const INSTALL_HINT: &str = "`bash .ci/test` installs it";
const JDBC_JAR: &str = "/usr/share/java/postgresql.jar";
const GOPATH: &str = "/usr/share/gocode";
/// How long one client script may run.
const SCRIPT_LIMIT: Duration = Duration::from_secs(180);
/// How long region 2 may take to converge to region 1's rows and schema.
const REPLICATION_LIMIT: Duration = Duration::from_secs(60);

/// The shared demo: region URLs and its log (stderr) so far.
struct Cluster {
    urls: Vec<String>,
    log: Arc<Mutex<String>>,
}

static DEMO_PID: AtomicI32 = AtomicI32::new(0);

/// Stops the demo at exit with SIGINT, so it stops its servers and removes
/// its files (a test binary never drops a static).
extern "C" fn stop_demo() {
    let pid = DEMO_PID.swap(0, Ordering::SeqCst);
    if pid <= 0 {
        return;
    }
    unsafe { libc::kill(pid, libc::SIGINT) };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut status = 0;
        if unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } != 0 {
            return;
        }
        if Instant::now() > deadline {
            unsafe { libc::kill(pid, libc::SIGKILL) };
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One 2-region demo for the whole binary. It is started from a thread that
/// lives as long as the binary: the demo is tied to the thread that spawned
/// it (PR_SET_PDEATHSIG), and test threads end. If it cannot start, every
/// test fails with the reason, without trying again.
fn cluster() -> &'static Cluster {
    static CLUSTER: OnceLock<Result<Cluster, String>> = OnceLock::new();
    let started = CLUSTER.get_or_init(|| {
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("demo".into())
            .spawn(move || {
                let started = std::panic::catch_unwind(|| start_demo(2, &["--latency", "10ms"]));
                let mut demo = match started {
                    Ok(demo) => demo,
                    Err(panic) => {
                        let why = panic
                            .downcast_ref::<String>()
                            .cloned()
                            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                            .unwrap_or_default();
                        let _ = tx.send(Err(why));
                        return;
                    }
                };
                let log = Arc::new(Mutex::new(String::new()));
                if let Some(stderr) = demo.child.stderr.take() {
                    let log = log.clone();
                    std::thread::spawn(move || {
                        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                            let mut log = log.lock().unwrap();
                            log.push_str(&strip_ansi(&line));
                            log.push('\n');
                        }
                    });
                }
                DEMO_PID.store(demo.child.id() as i32, Ordering::SeqCst);
                unsafe { libc::atexit(stop_demo) };
                let urls = demo.regions.iter().map(|r| r.1.clone()).collect();
                tx.send(Ok(Cluster { urls, log })).unwrap();
                loop {
                    std::thread::park();
                }
            })
            .unwrap();
        rx.recv()
            .unwrap_or_else(|_| Err("the demo thread ended without a word".into()))
    });
    match started {
        Ok(cluster) => cluster,
        Err(why) => panic!("the shared 2-region demo did not start: {why}"),
    }
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

impl Cluster {
    fn region1(&self) -> &str {
        &self.urls[0]
    }

    /// For failure messages: what region 2 holds back for `prefix`'s tables
    /// (meridian.held) and the demo's last warnings and errors.
    fn problems(&self, prefix: &str) -> String {
        let held = psql_raw(
            &self.urls[1],
            &[
                "-At",
                "-c",
                &format!(
                    "SELECT format('%s: %s %s (%s changes)', tbl, sqlstate, error, count(*)) \
                     FROM meridian.held WHERE tbl LIKE 'public.{prefix}%' \
                     GROUP BY tbl, sqlstate, error ORDER BY 1"
                ),
            ],
            None,
            &[],
        );
        let log = self.log.lock().unwrap();
        let lines: Vec<&str> = log
            .lines()
            .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
            .collect();
        format!(
            "--- held in region 2 (meridian.held):\n{}{}\n--- the demo's last warnings and errors:\n{}",
            String::from_utf8_lossy(&held.stdout),
            String::from_utf8_lossy(&held.stderr),
            lines[lines.len().saturating_sub(15)..].join("\n")
        )
    }
}

fn manifest() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn script(rel: &str) -> PathBuf {
    manifest().join("tests").join("drivers").join(rel)
}

/// Fails with a pointer to `.ci/test` when `ok` is false.
fn require(ok: bool, what: &str) {
    assert!(ok, "{what} is missing: {INSTALL_HINT}");
}

/// True if `cmd` runs and exits 0 (its output discarded).
fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs a client script to completion (at most SCRIPT_LIMIT); returns its
/// stdout. Fails with both outputs if it exits non-zero.
fn run_client(what: &str, cmd: &mut Command) -> String {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = match cmd.spawn() {
        Ok(child) => child,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            panic!("{what}: {:?} not found: {INSTALL_HINT}", cmd.get_program())
        }
        Err(e) => panic!("{what}: cannot run {:?}: {e}", cmd.get_program()),
    };
    let reader = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            String::from_utf8_lossy(&buf).into_owned()
        })
    };
    let out = reader(Box::new(child.stdout.take().unwrap()));
    let err = reader(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + SCRIPT_LIMIT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let (out, err) = (out.join().unwrap(), err.join().unwrap());
    match status {
        Some(s) if s.success() => {
            println!("{what}:\n{out}{err}");
            out
        }
        Some(s) => panic!("{what} failed ({s}):\n--- stdout\n{out}--- stderr\n{err}"),
        None => panic!(
            "{what} did not finish within {SCRIPT_LIMIT:?}:\n--- stdout\n{out}--- stderr\n{err}"
        ),
    }
}

/// Runs a command that prepares a client (a compiler, a package manager); fails with its output.
fn build_step(what: &str, cmd: &mut Command) {
    let out = match cmd.output() {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            panic!("{what}: {:?} not found: {INSTALL_HINT}", cmd.get_program())
        }
        Err(e) => panic!("{what}: {e}"),
    };
    assert!(
        out.status.success(),
        "{what} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// True if `output` is missing or older than `source`.
fn stale(source: &Path, output: &Path) -> bool {
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    match (modified(source), modified(output)) {
        (Some(s), Some(o)) => s > o,
        _ => true,
    }
}

/// tests/drivers/jdbc compiled into target/test-java (recompiled when the source changes).
fn java_classes() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = manifest().join("target").join("test-java");
        let source = script("jdbc/DriverCheck.java");
        if stale(&source, &dir.join("DriverCheck.class")) {
            std::fs::create_dir_all(&dir).unwrap();
            build_step(
                "javac",
                Command::new("javac").arg("-d").arg(&dir).arg(&source),
            );
        }
        dir
    })
}

/// node_modules with pg (node-postgres) and postgres (postgres.js) from npm, under target/test-node.
fn node_modules() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = manifest().join("target").join("test-node");
        let ready = dir.join(".meridian-ready-1");
        if !ready.exists() {
            std::fs::create_dir_all(&dir).unwrap();
            // A package.json of its own, so npm installs here and not in a parent project.
            std::fs::write(
                dir.join("package.json"),
                "{\"name\": \"meridian-driver-tests\", \"private\": true}\n",
            )
            .unwrap();
            build_step(
                "npm install",
                Command::new("npm").current_dir(&dir).args([
                    "install",
                    "--no-audit",
                    "--no-fund",
                    "--no-update-notifier",
                    "--loglevel=error",
                    "pg@8",
                    "postgres@3",
                ]),
            );
            std::fs::write(&ready, "").unwrap();
        }
        dir.join("node_modules")
    })
}

/// tests/drivers/pgx built in GOPATH mode against Debian's Go packages into target/test-go.
fn pgx_binary() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        require(
            Path::new(GOPATH)
                .join("src/github.com/jackc/pgx/v4")
                .is_dir(),
            "pgx v4 (golang-github-jackc-pgx-v4-dev)",
        );
        let dir = manifest().join("target").join("test-go");
        let bin = dir.join("pgx-check");
        let source = script("pgx/main.go");
        if stale(&source, &bin) {
            std::fs::create_dir_all(&dir).unwrap();
            build_step(
                "go build",
                Command::new("go")
                    .current_dir(source.parent().unwrap())
                    .args(["build", "-o"])
                    .arg(&bin)
                    .arg(".")
                    .env("GO111MODULE", "off")
                    .env("GOPATH", GOPATH)
                    .env("GOCACHE", dir.join("cache"))
                    .env("GOFLAGS", ""),
            );
        }
        bin
    })
}

/// Everything region `url` has for the tables whose names start with
/// `prefix`: the table list, every row as text (sorted), and the schema as
/// pg_dump prints it, with what is legitimately per region masked.
fn snapshot(url: &str, prefix: &str) -> String {
    let (tables, _) = psql(
        url,
        &[
            "-At",
            "-c",
            &format!(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public' \
                 AND left(tablename, {}) = '{prefix}' ORDER BY 1",
                prefix.len()
            ),
        ],
        None,
    );
    let mut out = format!("== tables\n{tables}");
    let mut args = vec!["-At".to_string()];
    for t in tables.lines() {
        args.push("-c".into());
        args.push(format!("SELECT '== rows of {t}'"));
        args.push("-c".into());
        args.push(format!("SELECT x::text FROM public.\"{t}\" x ORDER BY 1"));
    }
    if args.len() > 1 {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        out.push_str(&psql(url, &args, None).0);
    }
    out.push_str("== schema\n");
    let dump = Command::new("pg_dump")
        .args(["--schema-only", "--exclude-schema=meridian", "-t"])
        .arg(format!("public.{prefix}*"))
        .arg(url)
        .output()
        .expect("pg_dump");
    if dump.status.success() {
        out.push_str(&mask_schema(&String::from_utf8_lossy(&dump.stdout)));
    } else {
        out.push_str(&format!(
            "pg_dump failed: {}",
            String::from_utf8_lossy(&dump.stderr)
        ));
    }
    out
}

/// Masks what differs between regions by design: sequences and identity
/// columns start at the region's id (START WITH), capture trigger functions
/// are named after the table's OID, and pg_dump's \restrict key is random.
fn mask_schema(dump: &str) -> String {
    dump.lines()
        .map(|l| {
            let t = l.trim_start();
            if let Some(rest) = t.strip_prefix("START WITH ") {
                if rest.trim_end_matches(';').parse::<u64>().is_ok() {
                    let end = if rest.ends_with(';') { ";" } else { "" };
                    return format!("{}START WITH <region id>{end}", &l[..l.len() - t.len()]);
                }
            }
            if t.starts_with("\\restrict ") || t.starts_with("\\unrestrict ") {
                return format!("{} <key>", t.split(' ').next().unwrap());
            }
            mask_digits_after(l, "meridian.capture_")
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

fn mask_digits_after(line: &str, marker: &str) -> String {
    let Some(at) = line.find(marker) else {
        return line.to_string();
    };
    let start = at + marker.len();
    let digits = line[start..]
        .chars()
        .take_while(char::is_ascii_digit)
        .count();
    if digits == 0 {
        return line.to_string();
    }
    format!("{}<oid>{}", &line[..start], &line[start + digits..])
}

/// Lines only in `a` (-) or only in `b` (+), with two lines of context, by
/// longest common subsequence; empty if they are equal.
fn line_diff(a: &str, b: &str) -> String {
    if a == b {
        return String::new();
    }
    let (a, b): (Vec<&str>, Vec<&str>) = (a.lines().collect(), b.lines().collect());
    let (n, m) = (a.len(), b.len());
    let mut lcs = vec![vec![0u32; m + 1]; n + 1];
    for i in (0..n).rev() {
        for j in (0..m).rev() {
            lcs[i][j] = if a[i] == b[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let mut ops = Vec::new();
    let (mut i, mut j) = (0, 0);
    while i < n || j < m {
        if i < n && j < m && a[i] == b[j] {
            ops.push((' ', a[i]));
            i += 1;
            j += 1;
        } else if j < m && (i == n || lcs[i][j + 1] >= lcs[i + 1][j]) {
            ops.push(('+', b[j]));
            j += 1;
        } else {
            ops.push(('-', a[i]));
            i += 1;
        }
    }
    let near = |k: usize| {
        ops[k.saturating_sub(2)..(k + 3).min(ops.len())]
            .iter()
            .any(|(op, _)| *op != ' ')
    };
    let mut out = String::new();
    let mut skipped = false;
    for (k, (op, line)) in ops.iter().enumerate() {
        if near(k) {
            if skipped {
                out.push_str("  ...\n");
                skipped = false;
            }
            out.push_str(&format!("{op} {line}\n"));
        } else {
            skipped = true;
        }
    }
    out
}

/// How region 2 differs from region 1; its Debug form is the diff itself.
struct Differences(String);

impl std::fmt::Debug for Differences {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "region 1 (-) vs region 2 (+):\n{}", self.0)
    }
}

/// Region 1 has exactly `tables` with `prefix`; region 2 converges to the
/// same tables, rows and (masked) schema.
fn assert_replicated(c: &Cluster, prefix: &str, tables: &[&str]) {
    let want = snapshot(&c.urls[0], prefix);
    let mut expected: Vec<&str> = tables.to_vec();
    expected.sort_unstable();
    let listed = want
        .strip_prefix("== tables\n")
        .and_then(|s| s.split("\n== ").next())
        .unwrap_or_default();
    assert_eq!(
        listed.lines().collect::<Vec<_>>(),
        expected,
        "region 1's {prefix}* tables"
    );
    let deadline = Instant::now() + REPLICATION_LIMIT;
    eventually_value(
        &format!("region 2 to have region 1's {prefix}* tables, rows and schema"),
        REPLICATION_LIMIT,
        || {
            let diff = line_diff(&want, &snapshot(&c.urls[1], prefix));
            // On the last try, add the demo's warnings to the failure message.
            if !diff.is_empty() && Instant::now() + Duration::from_secs(1) > deadline {
                return Differences(format!("{diff}{}", c.problems(prefix)));
            }
            Differences(diff)
        },
        |d| d.0.is_empty(),
    );
}

fn py_client(what: &str, rel: &str, args: &[&str]) -> String {
    // No __pycache__ in the source tree (Django's and Alembic's modules are imported from there).
    run_client(
        what,
        Command::new(python())
            .arg(script(rel))
            .args(args)
            .env("PYTHONDONTWRITEBYTECODE", "1"),
    )
}

fn jdbc(prefix: &str, properties: &str) {
    require(
        Path::new(JDBC_JAR).exists(),
        "pgJDBC (libpostgresql-jdbc-java)",
    );
    let c = cluster();
    let classes = java_classes();
    let out = run_client(
        &format!("pgJDBC {prefix} {properties}"),
        Command::new("java")
            .arg("-cp")
            .arg(format!("{}:{JDBC_JAR}", classes.display()))
            .args(["DriverCheck", c.region1(), prefix, properties]),
    );
    assert!(out.contains("jdbc ok"), "{out}");
    assert_replicated(
        c,
        prefix,
        &[&format!("{prefix}items"), &format!("{prefix}log")],
    );
}

#[test]
fn pgjdbc_default_settings_rollbacks_savepoints_and_replication() {
    jdbc("jdbc_default_", "");
}

#[test]
fn pgjdbc_prepare_threshold_1_rollbacks_savepoints_and_replication() {
    jdbc("jdbc_pt1_", "prepareThreshold=1");
}

#[test]
fn node_postgres_transactions_errors_prepared_statements_and_replication() {
    let c = cluster();
    let modules = node_modules();
    let out = run_client(
        "node-postgres",
        Command::new("node")
            .arg(script("node-postgres/check.js"))
            .arg(c.region1())
            .env("NODE_PATH", modules),
    );
    assert!(out.contains("node-postgres ok"), "{out}");
    assert_replicated(c, "nodepg_", &["nodepg_items", "nodepg_log"]);
}

#[test]
fn postgres_js_begin_with_unique_violation_reports_23505_and_end_returns() {
    let c = cluster();
    let modules = node_modules();
    let out = run_client(
        "postgres.js",
        Command::new("node")
            .arg(script("postgres-js/check.js"))
            .arg(c.region1())
            .env("NODE_PATH", modules),
    );
    assert!(
        out.contains("sql.begin with a unique violation: 23505"),
        "{out}"
    );
    assert!(out.contains("sql.end() returned"), "{out}");
    assert_replicated(c, "pgjs_", &["pgjs_items", "pgjs_log"]);
}

#[test]
fn pgx_v4_transactions_errors_batches_and_replication() {
    let c = cluster();
    let out = run_client("pgx", Command::new(pgx_binary()).arg(c.region1()));
    assert!(out.contains("batch of 12 statements"), "{out}");
    assert!(out.contains("pgx ok"), "{out}");
    assert_replicated(c, "pgx_", &["pgx_items", "pgx_log"]);
}

#[test]
fn psycopg3_pipeline_error_in_transaction_leaves_connection_usable_and_replicates() {
    let c = cluster();
    let out = py_client("psycopg 3", "psycopg/check.py", &[c.region1()]);
    assert!(
        out.contains("pipeline: error in a transaction rolled back, connection still usable"),
        "{out}"
    );
    assert_replicated(c, "psycopg_", &["psycopg_items", "psycopg_log"]);
}

#[test]
fn asyncpg_transactions_prepared_statements_copy_and_replication() {
    let c = cluster();
    let out = py_client("asyncpg", "asyncpg/check.py", &[c.region1()]);
    assert!(out.contains("copy_records_to_table: 25 rows"), "{out}");
    assert!(out.contains("asyncpg ok"), "{out}");
    assert_replicated(c, "asyncpg_", &["asyncpg_items", "asyncpg_log"]);
}

#[test]
fn sqlalchemy_create_all_and_alembic_migrations_replicate() {
    let c = cluster();
    let out = py_client(
        "SQLAlchemy + Alembic",
        "sqlalchemy/check.py",
        &[c.region1()],
    );
    assert!(out.contains("alembic upgrade head"), "{out}");
    assert!(out.contains("sqlalchemy ok"), "{out}");
    assert_replicated(
        c,
        "sqla_",
        &[
            "sqla_alembic_version",
            "sqla_orders",
            "sqla_posts",
            "sqla_users",
        ],
    );
}

#[test]
fn django_migrate_orm_writes_and_migrate_zero_replicate() {
    let c = cluster();
    let out = py_client(
        "Django migrate + ORM",
        "django/check.py",
        &[c.region1(), "write"],
    );
    assert!(out.contains("django ok"), "{out}");
    // "dj" covers the app's tables (dj_*) and django_migrations.
    assert_replicated(c, "dj", &["dj_author", "dj_book", "django_migrations"]);
    let out = py_client(
        "Django migrate dj zero",
        "django/check.py",
        &[c.region1(), "zero"],
    );
    assert!(out.contains("the app's tables are gone"), "{out}");
    assert_replicated(c, "dj", &["django_migrations"]);
}

#[test]
fn ruby_pg_prepared_statements_rollback_after_error_and_replication() {
    require(
        succeeds(Command::new("ruby").args(["-e", "require 'pg'"])),
        "Ruby with its pg library (ruby-pg)",
    );
    let c = cluster();
    let out = run_client(
        "Ruby pg",
        Command::new("ruby")
            .arg(script("ruby/check.rb"))
            .arg(c.region1()),
    );
    assert!(out.contains("ruby ok"), "{out}");
    assert_replicated(c, "ruby_", &["ruby_items", "ruby_log"]);
}

#[test]
fn php_pdo_prepared_statements_rollback_after_error_and_replication() {
    require(
        succeeds(Command::new("php").args([
            "-r",
            "exit(in_array('pgsql', PDO::getAvailableDrivers()) ? 0 : 1);",
        ])),
        "PHP with PDO for PostgreSQL (php-cli, php-pgsql)",
    );
    let c = cluster();
    let out = run_client(
        "PHP PDO",
        Command::new("php")
            .arg(script("php/check.php"))
            .arg(c.region1()),
    );
    assert!(out.contains("php ok"), "{out}");
    assert_replicated(c, "php_", &["php_items", "php_log"]);
}
