//! Misbehaving clients, limits and shutdown, against a real `meridian run`
//! process and a real PostgreSQL. Each bad client must get a clean error (or
//! a timeout) for its own connection only, while other sessions keep working
//! and the proxy's memory stays bounded.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use support::*;

fn plain_proxy(extra: &str) -> Proxy {
    Proxy::start(ProxySpec {
        scram: false,
        tls: false,
        extra_proxy: extra.into(),
        ..ProxySpec::default()
    })
}

fn startup_packet(user: &str, db: &str) -> Vec<u8> {
    let mut body = 196608u32.to_be_bytes().to_vec();
    for (k, v) in [("user", user), ("database", db)] {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut packet = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    packet.extend(body);
    packet
}

fn raw(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s
}

/// A raw connection that has finished startup (trust auth) and seen ReadyForQuery.
fn raw_session(addr: SocketAddr) -> TcpStream {
    let mut s = raw(addr);
    s.write_all(&startup_packet(APP_USER, "postgres")).unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    // ReadyForQuery ('Z', length 5, status) is the last message of the startup reply.
    while !(seen.len() >= 6 && seen[seen.len() - 6..seen.len() - 1] == [b'Z', 0, 0, 0, 5]) {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "proxy closed during startup");
        seen.extend_from_slice(&buf[..n]);
    }
    s
}

/// Everything the proxy says until it closes the connection.
fn read_to_close(s: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    out
}

fn assert_fatal(reply: &[u8], sqlstate: &str, fragment: &str) {
    assert_eq!(
        reply.first(),
        Some(&b'E'),
        "expected an ErrorResponse, got {reply:?}"
    );
    let text = String::from_utf8_lossy(reply);
    assert!(
        text.contains(&format!("C{sqlstate}\0")),
        "expected SQLSTATE {sqlstate}: {text:?}"
    );
    assert!(text.contains(fragment), "expected {fragment:?} in {text:?}");
}

fn healthy_query(url: &str, n: i32) {
    let (out, _) = psql(url, &["-At", "-c", &format!("SELECT {n} + 1")], None);
    assert_eq!(out.trim(), (n + 1).to_string());
}

#[test]
fn bad_clients_get_errors_while_others_keep_working() {
    let proxy = plain_proxy("handshake_timeout = \"1s\"\nmax_message_bytes = 1048576");
    let url = proxy.url(APP_USER, "postgres");
    // A session that stays open throughout, as well as fresh ones between cases.
    let mut keeper = raw_session(proxy.addr);
    healthy_query(&url, 0);

    // Garbage instead of a startup packet (an HTTP request).
    let mut s = raw(proxy.addr);
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    assert_fatal(
        &read_to_close(&mut s),
        "08P01",
        "invalid startup packet length",
    );
    healthy_query(&url, 1);

    // A length prefix of 2 GiB, before and after startup.
    let mut s = raw(proxy.addr);
    s.write_all(&0x8000_0000u32.to_be_bytes()).unwrap();
    assert_fatal(
        &read_to_close(&mut s),
        "08P01",
        "invalid startup packet length 2147483648",
    );
    let mut s = raw_session(proxy.addr);
    s.write_all(b"Q\x80\x00\x00\x00").unwrap();
    assert_fatal(
        &read_to_close(&mut s),
        "08P01",
        "above the limit of 1048576 bytes",
    );
    healthy_query(&url, 2);

    // An unknown message type after startup.
    let mut s = raw_session(proxy.addr);
    s.write_all(b"z\x00\x00\x00\x04").unwrap();
    assert_fatal(
        &read_to_close(&mut s),
        "08P01",
        "invalid frontend message type 122",
    );
    // Garbage after startup.
    let mut s = raw_session(proxy.addr);
    s.write_all(&[0xff; 64]).unwrap();
    assert_fatal(
        &read_to_close(&mut s),
        "08P01",
        "invalid frontend message type 255",
    );
    healthy_query(&url, 3);

    // A truncated startup packet, then silence: the handshake timeout answers.
    let mut s = raw(proxy.addr);
    s.write_all(&100u32.to_be_bytes()).unwrap();
    s.write_all(b"\x00\x03\x00\x00user").unwrap();
    assert_fatal(
        &read_to_close(&mut s),
        "08P01",
        "timeout during connection startup",
    );
    // A client that connects and says nothing.
    let mut s = raw(proxy.addr);
    assert_fatal(
        &read_to_close(&mut s),
        "08P01",
        "timeout during connection startup",
    );
    // A truncated message after startup, then the client goes away: the session ends quietly.
    let mut s = raw_session(proxy.addr);
    s.write_all(b"Q\x00\x00\x00\x64SELECT").unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let _ = read_to_close(&mut s);
    healthy_query(&url, 4);

    // The long-lived session is unaffected.
    let reply = send_query(&mut keeper, "SELECT 1;");
    assert_eq!(
        reply[0], b'T',
        "row description for the keeper's query: {reply:?}"
    );

    let status = http_get(&proxy.admin.to_string(), "/status");
    assert!(status.contains("\"protocol_errors\":5"), "{status}");
    assert!(status.contains("\"handshake_timeouts\":2"), "{status}");
}

#[test]
fn memory_stays_bounded_under_hostile_clients() {
    let proxy = plain_proxy("handshake_timeout = \"2s\"");
    healthy_query(&proxy.url(APP_USER, "postgres"), 0);
    let before = proxy.rss_kib();
    for round in 0..5 {
        let mut conns = Vec::new();
        for i in 0..40 {
            let mut s = raw(proxy.addr);
            // Each claims a huge message and starts to send it.
            let claim: &[u8] = if i % 2 == 0 {
                b"\x7f\xff\xff\xff"
            } else {
                b"\x00\x00\x27\x10"
            };
            s.write_all(claim).unwrap();
            let _ = s.write_all(&[0x41; 8192]);
            conns.push(s);
        }
        let mut sessions = Vec::new();
        for _ in 0..20 {
            let mut s = raw_session(proxy.addr);
            // A message claiming 1 GiB, followed by 256 KiB of it, then abandoned.
            s.write_all(b"Q\x3f\xff\xff\xff").unwrap();
            let _ = s.write_all(&vec![b'x'; 256 * 1024]);
            sessions.push(s);
        }
        for mut s in conns.into_iter().chain(sessions) {
            let _ = read_to_close(&mut s);
        }
        healthy_query(&proxy.url(APP_USER, "postgres"), round);
    }
    let after = proxy.rss_kib();
    eprintln!("proxy RSS before {before} KiB, after {after} KiB");
    assert!(before > 0 && after > 0, "could not read the proxy's RSS");
    // Hostile clients claimed terabytes in total; the proxy may grow by buffers, not by claims.
    assert!(
        after < before + 32 * 1024,
        "RSS grew from {before} KiB to {after} KiB"
    );
}

#[test]
fn connection_limit_refuses_with_53300() {
    let proxy = plain_proxy("max_connections = 2");
    let a = raw_session(proxy.addr);
    let b = raw_session(proxy.addr);
    let out = psql_raw(
        &proxy.url(APP_USER, "postgres"),
        &["-c", "SELECT 1"],
        None,
        &[],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("sorry, too many clients already"), "{err}");
    drop((a, b));
    // Freed slots are reused once the proxy notices the sessions ended.
    eventually("a slot to free up", Duration::from_secs(20), || {
        psql_raw(
            &proxy.url(APP_USER, "postgres"),
            &["-c", "SELECT 1"],
            None,
            &[],
        )
        .status
        .success()
    });
}

fn send_query(s: &mut TcpStream, sql: &str) -> Vec<u8> {
    let mut msg = vec![b'Q'];
    msg.extend_from_slice(&((sql.len() + 5) as u32).to_be_bytes());
    msg.extend_from_slice(sql.as_bytes());
    msg.push(0);
    s.write_all(&msg).unwrap();
    // Read up to and including ReadyForQuery.
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !(seen.len() >= 6 && seen[seen.len() - 6..seen.len() - 1] == [b'Z', 0, 0, 0, 5]) {
        let n = s.read(&mut buf).unwrap();
        assert!(
            n > 0,
            "connection closed while waiting for ReadyForQuery; got {:?}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buf[..n]);
    }
    seen
}

#[test]
fn sigterm_drains_open_transactions_then_exits() {
    let mut proxy = plain_proxy("shutdown_timeout = \"60s\"");
    let pg_url = pg().url("postgres");
    psql(
        &pg_url,
        &[
            "-c",
            "DROP TABLE IF EXISTS drain_t; CREATE TABLE drain_t (id int)",
        ],
        None,
    );
    let mut idle = raw_session(proxy.addr);
    let mut busy = raw_session(proxy.addr);
    send_query(&mut busy, "BEGIN; INSERT INTO drain_t VALUES (1);");
    proxy.signal(libc::SIGTERM);
    // New clients are refused at once, the idle session is told to go.
    eventually("the listener to close", Duration::from_secs(20), || {
        TcpStream::connect(proxy.addr).is_err()
    });
    assert_fatal(
        &read_to_close(&mut idle),
        "57P01",
        "meridian is shutting down",
    );
    // The open transaction may still finish; the session closes right after it.
    let mut msg = b"Q".to_vec();
    let sql = "INSERT INTO drain_t VALUES (2); COMMIT;";
    msg.extend_from_slice(&((sql.len() + 5) as u32).to_be_bytes());
    msg.extend_from_slice(sql.as_bytes());
    msg.push(0);
    busy.write_all(&msg).unwrap();
    let reply = read_to_close(&mut busy);
    let ready = reply
        .windows(6)
        .position(|w| w == b"Z\x00\x00\x00\x05I")
        .expect("COMMIT acknowledged with ReadyForQuery(I)");
    assert!(
        String::from_utf8_lossy(&reply[..ready]).contains("COMMIT"),
        "{reply:?}"
    );
    assert_fatal(&reply[ready + 6..], "57P01", "meridian is shutting down");
    let status = wait_exit(&mut proxy.child);
    assert!(status.success(), "{status}");
    let (out, _) = psql(
        &pg_url,
        &["-At", "-c", "SELECT count(*) FROM drain_t"],
        None,
    );
    assert_eq!(
        out.trim(),
        "2",
        "both inserts of the drained transaction committed"
    );
}

#[test]
fn sigterm_cuts_a_transaction_that_outlives_the_shutdown_timeout() {
    let mut proxy = plain_proxy("shutdown_timeout = \"1s\"");
    let mut busy = raw_session(proxy.addr);
    send_query(&mut busy, "BEGIN;");
    proxy.signal(libc::SIGTERM);
    assert_fatal(
        &read_to_close(&mut busy),
        "57P01",
        "meridian is shutting down",
    );
    assert!(wait_exit(&mut proxy.child).success());
}

#[test]
fn sigint_exits_at_once_and_rolls_back_open_transactions() {
    let mut proxy = plain_proxy("shutdown_timeout = \"600s\"");
    let pg_url = pg().url("postgres");
    psql(
        &pg_url,
        &[
            "-c",
            "DROP TABLE IF EXISTS sigint_t; CREATE TABLE sigint_t (id int)",
        ],
        None,
    );
    let mut busy = raw_session(proxy.addr);
    send_query(&mut busy, "BEGIN; INSERT INTO sigint_t VALUES (1);");
    proxy.signal(libc::SIGINT);
    assert_fatal(
        &read_to_close(&mut busy),
        "57P01",
        "meridian is shutting down",
    );
    assert!(wait_exit(&mut proxy.child).success());
    eventually(
        "the backend session to end",
        Duration::from_secs(20),
        || {
            let (out, _) = psql(&pg_url, &["-At", "-c", "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%sigint_t%' AND pid <> pg_backend_pid()"], None);
            out.trim() == "0"
        },
    );
    let (out, _) = psql(
        &pg_url,
        &["-At", "-c", "SELECT count(*) FROM sigint_t"],
        None,
    );
    assert_eq!(out.trim(), "0", "the open transaction was rolled back");
}
