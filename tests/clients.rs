//! Real clients that meridian did not write (psql, pgbench, tokio-postgres,
//! psycopg 3, asyncpg) through a `meridian run` proxy that authenticates with
//! SCRAM-SHA-256 and speaks TLS, against a real PostgreSQL.

mod support;

use std::sync::Arc;
use std::time::Instant;

use futures_util::{SinkExt, StreamExt};
use support::*;
use tokio_postgres::AsyncMessage;

fn tls_connector() -> tokio_postgres_rustls::MakeRustlsConnect {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from(
            tls_files().cert_der.clone(),
        ))
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    tokio_postgres_rustls::MakeRustlsConnect::new(config)
}

async fn connect(proxy: &Proxy) -> (tokio_postgres::Client, tokio::task::JoinHandle<()>) {
    let url = format!(
        "host=localhost hostaddr=127.0.0.1 port={} user={APP_USER} password='{APP_PASSWORD}' dbname=postgres sslmode=require",
        proxy.addr.port()
    );
    let (client, conn) = tokio_postgres::connect(&url, tls_connector())
        .await
        .expect("connect through meridian");
    (
        client,
        tokio::spawn(async move {
            let _ = conn.await;
        }),
    )
}

#[test]
fn psql_simple_queries_copy_notices_notify_and_errors_over_tls_on_epoll_and_plain_on_io_uring() {
    over_tls_on_epoll_and_plain_on_io_uring(psql_session);
}

fn psql_session(proxy: &Proxy) {
    let url = proxy.url(APP_USER, "postgres");
    let (out, _) = psql(
        &url,
        &["-At", "-c", "SELECT current_user", "-c", "\\conninfo"],
        None,
    );
    assert!(
        out.starts_with("app\n"),
        "the session runs as the startup user: {out}"
    );
    assert_eq!(
        out.contains("SSL connection (protocol: TLSv1.3"),
        proxy.tls,
        "the client leg is TLS exactly when the proxy has it: {out}"
    );
    let script = r"
DROP TABLE IF EXISTS psql_items;
CREATE TABLE psql_items (id int PRIMARY KEY, name text);
COPY psql_items FROM STDIN;
1	one
2	two
3	three
\.
\copy psql_items TO STDOUT
DO $$ BEGIN RAISE NOTICE 'hello from plpgsql'; END $$;
LISTEN chan;
NOTIFY chan, 'payload-1';
SELECT count(*) AS n FROM psql_items;
";
    let (out, err) = psql(&url, &["-At"], Some(script));
    assert!(
        out.contains("1\tone\n2\ttwo\n3\tthree"),
        "COPY out returned the rows copied in: {out}"
    );
    assert!(
        err.contains("NOTICE:  hello from plpgsql"),
        "notice passed through: {err}"
    );
    assert!(
        out.contains("Asynchronous notification \"chan\" with payload \"payload-1\""),
        "notification passed through: {out}"
    );
    assert!(out.trim_end().ends_with('3'), "{out}");
    // An error leaves the session usable; psql continues without ON_ERROR_STOP.
    let out = psql_raw(
        &url,
        &["-At", "-v", "ON_ERROR_STOP=0"],
        Some("SELECT 1/0;\nSELECT 'still here';\n"),
        &[],
    );
    let (o, e) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(e.contains("division by zero"), "{e}");
    assert!(o.contains("still here"), "{o}");
}

/// `channel_binding=require` through the proxy: psql verifies the proxy's
/// certificate (verify-full against it as the root) and binds the SCRAM
/// exchange to it (SCRAM-SHA-256-PLUS, tls-server-end-point). Over plain
/// text there is nothing to bind to, and libpq refuses.
#[test]
fn psql_with_verify_full_and_channel_binding_required_authenticates_by_scram_plus() {
    let proxy = Proxy::start(ProxySpec::default());
    let port = proxy.addr.port();
    let root = tls_files().cert.display().to_string();
    let url = |mode: &str| {
        format!(
            "postgres://{APP_USER}:{}@localhost:{port}/postgres?sslmode={mode}&sslrootcert={}&channel_binding=require",
            urlencode(APP_PASSWORD),
            urlencode(&root)
        )
    };
    let (out, _) = psql(
        &url("verify-full"),
        &[
            "-At",
            "-c",
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
        ],
        None,
    );
    // The backend leg is the proxy's own (not TLS here); the client leg
    // authenticated with binding, or libpq would have refused.
    assert_eq!(out.trim(), "f");
    let wrong = format!(
        "postgres://{APP_USER}:wrong@localhost:{port}/postgres?sslmode=verify-full&sslrootcert={}&channel_binding=require",
        urlencode(&root)
    );
    let out = psql_raw(&wrong, &["-c", "SELECT 1"], None, &[]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("password authentication failed"));
    let out = psql_raw(&url("disable"), &["-c", "SELECT 1"], None, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("channel binding"),
        "{err}"
    );
}

#[test]
fn scram_rejects_wrong_password_and_unknown_user() {
    let proxy = Proxy::start(ProxySpec::default());
    let port = proxy.addr.port();
    for (user, password) in [(APP_USER, "wrong"), ("nobody", APP_PASSWORD)] {
        let url = format!("postgres://{user}:{password}@127.0.0.1:{port}/postgres?sslmode=require");
        let out = psql_raw(&url, &["-c", "SELECT 1"], None, &[]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(
            err.contains(&format!(
                "password authentication failed for user \"{user}\""
            )),
            "{err}"
        );
    }
    // TLS is offered, not required: a plain-text client still authenticates by SCRAM.
    let url = format!(
        "postgres://{APP_USER}:{}@127.0.0.1:{port}/postgres?sslmode=disable",
        urlencode(APP_PASSWORD)
    );
    assert_eq!(psql(&url, &["-At", "-c", "SELECT 42"], None).0.trim(), "42");
}

#[test]
fn backend_authentication_by_scram_and_md5() {
    for role in [SCRAM_ROLE, MD5_ROLE] {
        let proxy = Proxy::start(ProxySpec {
            backend_role_password: true,
            ..ProxySpec::default()
        });
        let (out, _) = psql(
            &proxy.url(role, "postgres"),
            &["-At", "-c", "SELECT current_user"],
            None,
        );
        assert_eq!(out.trim(), role);
    }
    // A backend that wants a password the proxy does not have: a clear error, not a hang.
    let proxy = Proxy::start(ProxySpec::default());
    let cfg = std::fs::read_to_string(&proxy.config_path).unwrap();
    drop(proxy);
    let pg = pg();
    let cfg = cfg.replace(
        &format!("host = \"{}\"", pg.socket_dir().display()),
        "host = \"127.0.0.1\"",
    );
    let dir = scratch_dir("nopw");
    let path = dir.join("meridian.toml");
    std::fs::write(&path, cfg).unwrap();
    let proxy = Proxy::start_with_config(&path);
    let out = psql_raw(
        &proxy.url(SCRAM_ROLE, "postgres"),
        &["-c", "SELECT 1"],
        None,
        &[],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("backend.password is not configured"), "{err}");
}

#[test]
fn verifiers_interoperate_with_postgres_in_both_directions() {
    // A verifier Postgres made (pg_authid.rolpassword) authenticates clients at the proxy.
    let (pg_made, _) = psql(
        &pg().url("postgres"),
        &[
            "-At",
            "-c",
            &format!("SELECT rolpassword FROM pg_authid WHERE rolname = '{SCRAM_ROLE}'"),
        ],
        None,
    );
    let pg_made = pg_made.trim();
    assert!(pg_made.starts_with("SCRAM-SHA-256$"), "{pg_made}");
    let proxy = Proxy::start(ProxySpec::default());
    let cfg = std::fs::read_to_string(&proxy.config_path).unwrap();
    drop(proxy);
    let mut lines: Vec<String> = cfg.lines().map(str::to_owned).collect();
    let at = lines
        .iter()
        .position(|l| l == &format!("name = \"{SCRAM_ROLE}\""))
        .unwrap();
    lines[at + 1] = format!("verifier = \"{pg_made}\"");
    let dir = scratch_dir("pgverifier");
    let path = dir.join("meridian.toml");
    std::fs::write(&path, lines.join("\n")).unwrap();
    let proxy = Proxy::start_with_config(&path);
    let url = format!(
        "postgres://{SCRAM_ROLE}:{ROLE_PASSWORD}@127.0.0.1:{}/postgres?sslmode=require",
        proxy.addr.port()
    );
    assert_eq!(
        psql(&url, &["-At", "-c", "SELECT current_user"], None)
            .0
            .trim(),
        SCRAM_ROLE
    );
    // A verifier meridian made is accepted by Postgres as a stored password.
    let ours = meridian::wire::scram::Verifier::generate("made-by-meridian");
    psql(
        &pg().url("postgres"),
        &[
            "-c",
            &format!("CREATE ROLE {MERIDIAN_MADE_ROLE} LOGIN PASSWORD '{ours}'"),
        ],
        None,
    );
    // pg_hba makes Postgres demand SCRAM from this role over TCP.
    let direct = format!(
        "postgres://{MERIDIAN_MADE_ROLE}:made-by-meridian@127.0.0.1:{}/postgres",
        pg().port
    );
    assert_eq!(
        psql(&direct, &["-At", "-c", "SELECT current_user"], None)
            .0
            .trim(),
        MERIDIAN_MADE_ROLE
    );
    let wrong = format!(
        "postgres://{MERIDIAN_MADE_ROLE}:other@127.0.0.1:{}/postgres",
        pg().port
    );
    assert!(!psql_raw(&wrong, &["-c", "SELECT 1"], None, &[])
        .status
        .success());
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_postgres_extended_protocol_pipelining_copy_notify_and_errors() {
    let proxy = Proxy::start(ProxySpec::default());
    let (client, _conn) = connect(&proxy).await;
    client
        .batch_execute(
            "DROP TABLE IF EXISTS tp_items; CREATE TABLE tp_items (id int PRIMARY KEY, v text)",
        )
        .await
        .unwrap();
    // Named prepared statement, used many times.
    let insert = client
        .prepare("INSERT INTO tp_items VALUES ($1, $2)")
        .await
        .unwrap();
    for i in 0..20 {
        client
            .execute(&insert, &[&i, &format!("v{i}")])
            .await
            .unwrap();
    }
    // Pipelining: tokio-postgres sends all of these before reading any reply.
    let select = client
        .prepare("SELECT v FROM tp_items WHERE id = $1")
        .await
        .unwrap();
    let futures = (0..20).map(|i| {
        let (client, select) = (&client, &select);
        async move {
            client
                .query_one(select, &[&i])
                .await
                .map(|r| r.get::<_, String>(0))
        }
    });
    let values: Vec<String> = futures_util::future::try_join_all(futures).await.unwrap();
    assert_eq!(values, (0..20).map(|i| format!("v{i}")).collect::<Vec<_>>());
    // Errors come back with their SQLSTATE and leave the session usable.
    let err = client
        .query("SELECT * FROM no_such_table", &[])
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE)
    );
    // COPY in and out.
    let sink = client.copy_in("COPY tp_items FROM STDIN").await.unwrap();
    futures_util::pin_mut!(sink);
    sink.send(bytes::Bytes::from_static(
        b"100\thundred\n101\thundred-one\n",
    ))
    .await
    .unwrap();
    assert_eq!(sink.finish().await.unwrap(), 2);
    let stream = client
        .copy_out("COPY (SELECT id FROM tp_items WHERE id >= 100 ORDER BY id) TO STDOUT")
        .await
        .unwrap();
    let chunks: Vec<bytes::Bytes> = stream.map(Result::unwrap).collect().await;
    assert_eq!(chunks.concat(), b"100\n101\n");
    // A transaction.
    let mut client = client;
    let tx = client.transaction().await.unwrap();
    tx.execute("UPDATE tp_items SET v = 'changed' WHERE id = 1", &[])
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    let v: String = client
        .query_one("SELECT v FROM tp_items WHERE id = 1", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(v, "v1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_notify_across_sessions() {
    let proxy = Proxy::start(ProxySpec::default());
    let url = format!(
        "host=localhost hostaddr=127.0.0.1 port={} user={APP_USER} password='{APP_PASSWORD}' dbname=postgres sslmode=require",
        proxy.addr.port()
    );
    let (listener, mut conn) = tokio_postgres::connect(&url, tls_connector())
        .await
        .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(Ok(m)) = messages.next().await {
            if let AsyncMessage::Notification(n) = m {
                let _ = tx
                    .send((n.channel().to_string(), n.payload().to_string()))
                    .await;
            }
        }
    });
    listener.batch_execute("LISTEN orders").await.unwrap();
    let (sender, _c) = connect(&proxy).await;
    sender
        .batch_execute("NOTIFY orders, 'order-7'")
        .await
        .unwrap();
    let got = tokio::time::timeout(std::time::Duration::from_secs(30), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, ("orders".to_string(), "order-7".to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_request_stops_a_long_query() {
    let proxy = Proxy::start(ProxySpec::default());
    let (client, _conn) = connect(&proxy).await;
    let token = client.cancel_token();
    let started = Instant::now();
    let query = tokio::spawn(async move { client.simple_query("SELECT pg_sleep(30)").await });
    // Cancel once the backend is actually running the sleep.
    let (watcher, _c2) = connect(&proxy).await;
    loop {
        let n: i64 = watcher
            .query_one("SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(30)' AND state = 'active'", &[])
            .await
            .unwrap()
            .get(0);
        if n == 1 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    token
        .cancel_query(tls_connector())
        .await
        .expect("cancel through meridian");
    let err = query
        .await
        .unwrap()
        .expect_err("the sleep must be cancelled");
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::QUERY_CANCELED)
    );
    eprintln!("pg_sleep(30) cancelled after {:?}", started.elapsed());
}

fn pgbench_through(proxy: &Proxy) {
    let url = proxy.url(APP_USER, "postgres");
    pgbench(&url, &["-i", "-q", "-s", "1"]);
    for builtin in [&["-S"][..], &[][..]] {
        for mode in ["simple", "extended", "prepared"] {
            let mut args = vec!["-M", mode, "-c", "8", "-j", "2", "-t", "60", "-n"];
            args.extend_from_slice(builtin);
            let out = pgbench(&url, &args);
            assert!(
                out.contains("number of transactions actually processed: 480/480"),
                "{args:?}: {out}"
            );
            assert!(
                out.contains("number of failed transactions: 0 (0.000%)"),
                "{args:?}: {out}"
            );
        }
    }
}

/// Sessions the proxy relayed (io_uring, epoll), from its /status.
fn relayed(proxy: &Proxy) -> (u64, u64) {
    let status = http_get(&proxy.admin.to_string(), "/status");
    let json: serde_json::Value =
        serde_json::from_str(status.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    let r = &json["sessions"]["relayed"];
    (
        r["io_uring"].as_u64().unwrap(),
        r["epoll"].as_u64().unwrap(),
    )
}

/// Runs `client` against a proxy over TLS and one without: TLS sessions
/// are relayed by tokio on epoll, plain ones by the io_uring thread (the
/// default `proxy.relay = "auto"` on a kernel that has it), and each
/// proxy's counters say so.
fn over_tls_on_epoll_and_plain_on_io_uring(client: impl Fn(&Proxy)) {
    for tls in [true, false] {
        let proxy = Proxy::start(ProxySpec {
            tls,
            ..ProxySpec::default()
        });
        client(&proxy);
        let (io_uring, epoll) = relayed(&proxy);
        if tls {
            assert!(epoll > 0 && io_uring == 0, "TLS: {io_uring} / {epoll}");
        } else {
            assert!(io_uring > 0 && epoll == 0, "plain: {io_uring} / {epoll}");
        }
    }
}

#[test]
fn pgbench_select_only_and_tpcb_in_all_query_modes_over_tls_on_epoll_and_plain_on_io_uring() {
    over_tls_on_epoll_and_plain_on_io_uring(pgbench_through);
}

#[test]
fn psycopg3_including_pipeline_mode_over_tls_on_epoll_and_plain_on_io_uring() {
    over_tls_on_epoll_and_plain_on_io_uring(|proxy| {
        let out = run_python("psycopg_client.py", &proxy.url(APP_USER, "postgres"));
        assert!(out.contains("psycopg ok"), "{out}");
    });
}

#[test]
fn asyncpg_prepared_copy_and_transactions_over_tls_on_epoll_and_plain_on_io_uring() {
    over_tls_on_epoll_and_plain_on_io_uring(|proxy| {
        let out = run_python("asyncpg_client.py", &proxy.url(APP_USER, "postgres"));
        assert!(out.contains("asyncpg ok"), "{out}");
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_are_classified_once_per_prepare_and_counted_per_execution() {
    let proxy = Proxy::start(ProxySpec {
        scram: false,
        tls: false,
        ..ProxySpec::default()
    });
    let url = proxy.url(APP_USER, "postgres");
    psql(
        &url,
        &[
            "-c",
            "DROP TABLE IF EXISTS st_t; CREATE TABLE st_t (id int PRIMARY KEY, v int)",
        ],
        None,
    );
    psql(
        &url,
        &[
            "-c",
            "BEGIN; INSERT INTO st_t VALUES (1, 1); SELECT * FROM st_t; COMMIT",
        ],
        None,
    );
    let (client, conn) = tokio_postgres::connect(
        &format!(
            "host=127.0.0.1 port={} user={APP_USER} dbname=postgres",
            proxy.addr.port()
        ),
        tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let update = client
        .prepare("UPDATE st_t SET v = v + 1 WHERE id = $1")
        .await
        .unwrap();
    for _ in 0..5 {
        client.execute(&update, &[&1i32]).await.unwrap();
    }
    let status = http_get(&proxy.admin.to_string(), "/status");
    let json: serde_json::Value =
        serde_json::from_str(status.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    let s = &json["statements"];
    assert_eq!(s["ddl"], 2, "DROP and CREATE: {s}");
    assert_eq!(s["transaction"], 2, "BEGIN and COMMIT: {s}");
    assert_eq!(
        s["write"],
        1 + 5,
        "one INSERT, five executions of the prepared UPDATE: {s}"
    );
    assert_eq!(s["read"], 1, "{s}");
    assert_eq!(s["may_write"], 0, "{s}");
}
