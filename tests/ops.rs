//! Operating a cluster with tools written by others: a real Prometheus
//! scraping every region's `/metrics`, a real HAProxy health-checking
//! `/health`, and `meridian verify` / `meridian status` on a live demo.
//! `.ci/run` installs Debian's prometheus and haproxy packages.

mod support;

use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use meridian::cluster::postgres::{free_port, PgOptions, PgServer};
use support::*;

fn tool(name: &str) -> String {
    for dir in ["/usr/bin", "/usr/sbin", "/usr/local/bin"] {
        let p = Path::new(dir).join(name);
        if p.is_file() {
            return p.display().to_string();
        }
    }
    panic!("{name} is not installed: .ci/run installs it (apt-get install prometheus haproxy)");
}

/// A tool's process, killed and reaped when the test ends.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The link control endpoint of a demo whose first admin address is `admin`.
fn control_of(admin: &str) -> String {
    let port: u16 = admin.rsplit(':').next().unwrap().parse().unwrap();
    format!("127.0.0.1:{}", port + 2000)
}

/// A JSON value from Prometheus' HTTP API (Null while it is not answering).
fn prom_api(addr: &str, path: &str) -> serde_json::Value {
    let get = || -> std::io::Result<String> {
        let mut s = std::net::TcpStream::connect(addr)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    };
    let body = get().unwrap_or_default();
    let json = body.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    serde_json::from_str(json).unwrap_or(serde_json::Value::Null)
}

/// The value of an instant query's single result, if there is one.
fn prom_value(addr: &str, query: &str) -> Option<f64> {
    let v = prom_api(addr, &format!("/api/v1/query?query={}", urlencode(query)));
    v["data"]["result"].as_array()?.first()?["value"][1]
        .as_str()?
        .parse()
        .ok()
}

#[test]
fn prometheus_scrapes_every_region_and_the_lag_follows_a_partition() {
    let demo = start_demo(3, &["--latency", "10ms"]);
    let dir = scratch_dir("ops_prometheus");
    let admins: Vec<String> = demo
        .regions
        .iter()
        .map(|r| r.2.trim_start_matches("http://").to_string())
        .collect();
    // What every region exports is valid exposition format.
    for a in &admins {
        let body = http_get(a, "/metrics");
        let text = body.split_once("\r\n\r\n").unwrap().1;
        let mut check = Command::new(tool("promtool"))
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        check
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let out = check.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "promtool check metrics on {a}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let targets: Vec<String> = admins.iter().map(|a| format!("\"{a}\"")).collect();
    std::fs::write(
        dir.join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 500ms\n  evaluation_interval: 500ms\n\
             scrape_configs:\n  - job_name: meridian\n    static_configs:\n      - targets: [{}]\n",
            targets.join(", ")
        ),
    )
    .unwrap();
    let web = format!("127.0.0.1:{}", free_port().unwrap());
    let _prometheus = Running(spawn_tied(
        Command::new(tool("prometheus"))
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={web}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null()),
    ));
    // Every region is scraped without errors.
    eventually_value(
        "prometheus scrapes all three regions without errors",
        Duration::from_secs(60),
        || {
            let v = prom_api(&web, "/api/v1/targets");
            v["data"]["activeTargets"]
                .as_array()
                .map(|t| {
                    t.iter()
                        .map(|t| format!("{} {} {}", t["scrapeUrl"], t["health"], t["lastError"]))
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default()
        },
        |t| t.len() == 3 && t.iter().all(|x| x.ends_with("\"up\" \"\"")),
    );
    // eu-west's lag behind us-east, as Prometheus sees it: small while
    // linked, growing while eu-west is cut off, small again after the heal.
    let (eu, us) = (&demo.regions[1].0, &demo.regions[0].0);
    let lag = format!("meridian_replication_lag_seconds{{region=\"{eu}\",peer=\"{us}\"}}");
    eventually_value(
        "a lag below a second while linked",
        Duration::from_secs(60),
        || prom_value(&web, &lag),
        |v| v.is_some_and(|v| v < 1.0),
    );
    let control = control_of(&admins[0]);
    http(&control, "POST", &format!("/partition?region={eu}"));
    psql(
        &demo.regions[0].1,
        &[
            "-c",
            "CREATE TABLE t (id int PRIMARY KEY)",
            "-c",
            "INSERT INTO t VALUES (1)",
        ],
        None,
    );
    eventually_value(
        "the lag grows past 3 s while eu-west is cut off",
        Duration::from_secs(60),
        || prom_value(&web, &lag),
        |v| v.is_some_and(|v| v > 3.0),
    );
    http(&control, "POST", &format!("/heal?region={eu}"));
    eventually_value(
        "the lag is back below a second after the heal",
        Duration::from_secs(60),
        || prom_value(&web, &lag),
        |v| v.is_some_and(|v| v < 1.0),
    );
    let link_up =
        format!("meridian_replication_link_up{{region=\"{eu}\",peer=\"{us}\",direction=\"in\"}}");
    assert_eq!(prom_value(&web, &link_up), Some(1.0));
}

/// HAProxy's `show stat` status of server `name` (UP, DOWN, ...).
fn haproxy_status(socket: &Path, name: &str) -> String {
    let Ok(mut s) = std::os::unix::net::UnixStream::connect(socket) else {
        return "no socket".into();
    };
    s.write_all(b"show stat\n").unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    // CSV: pxname,svname,...; status is the 18th column.
    out.lines()
        .map(|l| l.split(',').collect::<Vec<_>>())
        .find(|f| f.len() > 17 && f[1] == name)
        .map_or("missing".into(), |f| f[17].to_string())
}

#[test]
fn haproxy_takes_a_region_out_while_its_postgres_is_stopped() {
    let dir = scratch_dir("ops_haproxy");
    let opts = PgOptions {
        remove_on_stop: false,
        port: Some(free_port().unwrap()),
        ..PgOptions::default()
    };
    let pg_dir = dir.join("pg");
    let server = PgServer::start(&pg_dir, &opts).unwrap();
    let (port, admin) = (free_port().unwrap(), free_port().unwrap());
    let config = dir.join("meridian.toml");
    std::fs::write(
        &config,
        format!(
            "[region]\nname = \"solo\"\nid = 1\n\n[proxy]\nlisten = \"127.0.0.1:{port}\"\n\n\
             [backend]\nhost = \"{}\"\nport = {}\nuser = \"{}\"\n\n[auth]\nmethod = \"trust\"\n\n\
             [admin]\nlisten = \"127.0.0.1:{admin}\"\n",
            server.socket_dir().display(),
            server.port,
            server.superuser()
        ),
    )
    .unwrap();
    let migrate = Command::new(env!("CARGO_BIN_EXE_meridian"))
        .args(["migrate", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(
        migrate.status.success(),
        "{}",
        String::from_utf8_lossy(&migrate.stderr)
    );
    let _proxy = Proxy::start_with_config(&config);
    let front = free_port().unwrap();
    let socket = dir.join("haproxy.sock");
    std::fs::write(
        dir.join("haproxy.cfg"),
        format!(
            "global\n  stats socket {} mode 600 level admin\n\
             defaults\n  mode tcp\n  timeout connect 2s\n  timeout client 30s\n  timeout server 30s\n\
             listen postgres\n  bind 127.0.0.1:{front}\n  option httpchk GET /health\n\
             http-check expect status 200\n\
             server solo 127.0.0.1:{port} check port {admin} inter 300ms fall 2 rise 2\n",
            socket.display()
        ),
    )
    .unwrap();
    let _haproxy = Running(spawn_tied(
        Command::new(tool("haproxy"))
            .args(["-db", "-f"])
            .arg(dir.join("haproxy.cfg"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null()),
    ));
    let status = || haproxy_status(&socket, "solo");
    eventually_value(
        "HAProxy puts the region in",
        Duration::from_secs(30),
        status,
        |s| s == "UP",
    );
    let through = format!(
        "postgres://{}@127.0.0.1:{front}/postgres",
        server.superuser()
    );
    let (out, _) = psql(&through, &["-At", "-c", "SELECT 41 + 1"], None);
    assert_eq!(out.trim(), "42");
    // Postgres stops: /health says 503 and HAProxy takes the region out.
    server.stop();
    eventually_value(
        "HAProxy takes the region out",
        Duration::from_secs(30),
        status,
        |s| s == "DOWN",
    );
    let health = http_get(&format!("127.0.0.1:{admin}"), "/health");
    assert!(
        health.contains(" 503 ") && health.contains("postgres unreachable"),
        "{health}"
    );
    // Postgres is back: the region is back in rotation and serves again.
    let _server = PgServer::start(&pg_dir, &opts).unwrap();
    eventually_value(
        "HAProxy puts the region back",
        Duration::from_secs(30),
        status,
        |s| s == "UP",
    );
    let (out, _) = psql(&through, &["-At", "-c", "SELECT 41 + 1"], None);
    assert_eq!(out.trim(), "42");
}

#[test]
fn verify_names_a_key_written_with_capture_off_and_status_shows_the_peers() {
    let data = scratch_dir("ops_verify");
    let demo = start_demo(3, &["--data", data.to_str().unwrap(), "--keep"]);
    let (us, eu) = (&demo.regions[0], &demo.regions[1]);
    psql(
        &us.1,
        &[
            "-c",
            "CREATE TABLE kv (k int PRIMARY KEY, v text)",
            "-c",
            "INSERT INTO kv SELECT g, 'v' || g FROM generate_series(1, 500) g",
        ],
        None,
    );
    let config = data.join(format!("{}.toml", us.0));
    let verify = |settle: &str| {
        Command::new(env!("CARGO_BIN_EXE_meridian"))
            .args(["verify", "--settle", settle, "--config"])
            .arg(&config)
            .output()
            .unwrap()
    };
    // Identical once replication has caught up (differences in flight are
    // re-read for up to --settle).
    let out = verify("30s");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("public.kv: us-east 500, eu-west 500, ap-south 500 rows"),
        "{text}"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("verify: [1/1] public.kv"));
    // A write straight into eu-west's Postgres in a session marked as one of
    // meridian's apply sessions (its replication origin makes capture skip
    // it): it never replicates.
    let eu_db = meridian::config::Config::load(&config)
        .unwrap()
        .replication
        .peers
        .iter()
        .find(|p| p.name == eu.0)
        .and_then(|p| p.postgres.clone())
        .unwrap();
    psql(
        &eu_db,
        &[
            "-c",
            "SELECT meridian.apply_session_setup()",
            "-c",
            "UPDATE kv SET v = 'changed behind its back' WHERE k = 321",
        ],
        None,
    );
    let out = verify("1s");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("DIFFERS public.kv key {\"k\": 321}:"),
        "{text}"
    );
    assert!(
        text.contains("\"v\": \"changed behind its back\""),
        "{text}"
    );
    assert!(
        text.contains("NOT identical: 1 table(s) in 3 region(s), 1 key(s) differ"),
        "{text}"
    );
    // Schema changes behind replication's back (replica mode: the schema
    // trigger does not fire), and ten tables only us-east has: each is
    // named, the tables are looked for once for all, and counts are right.
    psql(
        &eu_db,
        &[
            "-c",
            "SET session_replication_role = replica",
            "-c",
            "ALTER TABLE kv ADD COLUMN extra int",
            "-c",
            "CREATE INDEX kv_v ON kv (v)",
            "-c",
            "ALTER TABLE kv ADD CONSTRAINT kv_v_short CHECK (length(v) < 100)",
        ],
        None,
    );
    let us_db = meridian::config::Config::load(&config).unwrap().backend;
    let us_db = format!(
        "host={} port={} user={} dbname={}",
        us_db.host, us_db.port, us_db.user, us_db.database
    );
    let mut ghosts = vec!["SET session_replication_role = replica".to_string()];
    for i in 0..10 {
        ghosts.push(format!("CREATE TABLE ghost_{i} (id int PRIMARY KEY)"));
    }
    ghosts.push("INSERT INTO ghost_0 VALUES (1), (2), (3), (4)".into());
    let args: Vec<&str> = ghosts.iter().flat_map(|g| ["-c", g.as_str()]).collect();
    psql(&us_db, &args, None);
    let out = verify("2s");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    for item in [
        "DIFFERS public.kv key (schema) column extra:",
        "DIFFERS public.kv key (schema) index kv_v:",
        "DIFFERS public.kv key (schema) constraint kv_v_short:",
        "CREATE INDEX kv_v ON public.kv USING btree (v)",
        "CHECK ((length(v) < 100))",
        "public.ghost_0: us-east 4, eu-west (missing), ap-south (missing) rows",
        "DIFFERS public.ghost_9 key (the whole table):",
        "NOT identical: 11 table(s) in 3 region(s), 14 key(s) differ",
    ] {
        assert!(text.contains(item), "{item}\n{text}");
    }
    let waits = String::from_utf8_lossy(&out.stderr)
        .matches("not in every region yet")
        .count();
    assert!(
        waits <= 5,
        "one wait for all missing tables, not one each: {waits}"
    );
    // `meridian status`: both peers, links up.
    let out = Command::new(env!("CARGO_BIN_EXE_meridian"))
        .args(["status", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.starts_with(&format!("region {} (id 1)", us.0)),
        "{text}"
    );
    for peer in &demo.regions[1..] {
        let line = text
            .lines()
            .find(|l| l.trim_start().starts_with(&peer.0))
            .unwrap_or_else(|| panic!("{text}"));
        assert!(line.contains("up     up"), "{text}");
    }
    drop(demo);
}
