//! `meridian link`, the WAN emulator, as a real process between real clients
//! and a real PostgreSQL: traffic passes with the configured delay, the
//! control API partitions (existing connections drop, new ones are refused),
//! heals and changes settings at run time.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use support::*;

struct Link {
    child: Child,
    listen: String,
    control: String,
}

impl Drop for Link {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_link(args: &[&str]) -> Link {
    let pg = pg();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_meridian"));
    cmd.args([
        "link",
        "--listen",
        "127.0.0.1:0",
        "--control",
        "127.0.0.1:0",
    ])
    .args(["--to", &format!("127.0.0.1:{}", pg.port)])
    .args(args)
    .stdout(Stdio::piped())
    .stderr(Stdio::null());
    let mut child = spawn_tied(&mut cmd);
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    assert_eq!(lines.next().unwrap().unwrap(), "ready");
    let field = |name: &str| {
        first
            .split_whitespace()
            .find_map(|f| f.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} in {first}"))
            .to_string()
    };
    let listen = field("listen=");
    let control = field("control=http://");
    assert!(
        first.contains(&format!("to=127.0.0.1:{}", pg.port)),
        "{first}"
    );
    Link {
        child,
        listen,
        control,
    }
}

fn url(link: &Link) -> String {
    let port = link.listen.rsplit(':').next().unwrap();
    format!(
        "postgres://{}@127.0.0.1:{port}/postgres?sslmode=disable",
        pg().superuser()
    )
}

fn body(response: &str) -> serde_json::Value {
    let body = response.split("\r\n\r\n").nth(1).unwrap_or_default();
    serde_json::from_str(body.trim()).unwrap_or_else(|e| panic!("{e}: {response}"))
}

#[test]
fn postgres_clients_work_through_a_delayed_jittery_link() {
    let link = start_link(&[
        "--latency",
        "20ms",
        "--jitter",
        "10ms",
        "--bandwidth",
        "10MB/s",
    ]);
    let (out, _) = psql(&url(&link), &["-At", "-c", "SELECT 40 + 2"], None);
    assert_eq!(out.trim(), "42");
    let db_url = url(&link);
    pgbench(&db_url, &["-i", "-s", "1", "-q"]);
    let out = pgbench(&db_url, &["-S", "-c", "2", "-t", "20", "-n"]);
    assert!(out.contains("number of failed transactions: 0"), "{out}");
    let status = body(&http_get(&link.control, "/status"));
    assert_eq!(status["latency_ms"], 20.0);
    assert_eq!(status["bandwidth_bytes_per_s"], 10_000_000);
    assert!(status["bytes_forwarded"].as_u64().unwrap() > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_cuts_and_refuses_connections_until_healed() {
    let link = start_link(&[]);
    let (client, conn) = tokio_postgres::connect(&url(&link), tokio_postgres::NoTls)
        .await
        .unwrap();
    let conn = tokio::spawn(conn);
    client.simple_query("SELECT 1").await.unwrap();

    let control = link.control.clone();
    let status = tokio::task::spawn_blocking(move || body(&http(&control, "POST", "/partition")))
        .await
        .unwrap();
    assert_eq!(status["partitioned"], true);
    // The open connection is cut...
    let _ = conn.await;
    assert!(client.simple_query("SELECT 1").await.is_err());
    // ...and new ones are refused while partitioned.
    assert!(tokio_postgres::connect(&url(&link), tokio_postgres::NoTls)
        .await
        .is_err());

    let control = link.control.clone();
    let status = tokio::task::spawn_blocking(move || body(&http(&control, "POST", "/heal")))
        .await
        .unwrap();
    assert_eq!(status["partitioned"], false);
    assert_eq!(status["refused_while_partitioned"], 1);
    let (client, conn) = tokio_postgres::connect(&url(&link), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client.simple_query("SELECT 1").await.unwrap();
}

#[test]
fn settings_change_at_run_time_and_bad_values_are_refused() {
    let link = start_link(&["--latency", "5ms"]);
    let status = body(&http(
        &link.control,
        "POST",
        "/settings?latency=100ms&jitter=5ms&bandwidth=1Mbit/s",
    ));
    assert_eq!(status["latency_ms"], 100.0);
    assert_eq!(status["jitter_ms"], 5.0);
    assert_eq!(status["bandwidth_bytes_per_s"], 125_000);
    let bad = http(&link.control, "POST", "/settings?latency=soon");
    assert!(bad.starts_with("HTTP/1.0 400"), "{bad}");
    assert!(bad.contains("latency=soon"), "{bad}");
    let status = body(&http(&link.control, "POST", "/settings?bandwidth=none"));
    assert_eq!(status["bandwidth_bytes_per_s"], serde_json::Value::Null);
    assert_eq!(status["latency_ms"], 100.0, "other settings kept");
    let (out, _) = psql(&url(&link), &["-At", "-c", "SELECT 'still works'"], None);
    assert_eq!(out.trim(), "still works");

    let out = Command::new(env!("CARGO_BIN_EXE_meridian"))
        .args([
            "link",
            "--listen",
            "127.0.0.1:0",
            "--to",
            "127.0.0.1:1",
            "--bandwidth",
            "fast",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("expected a number and a unit"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
