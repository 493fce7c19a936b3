//! No way around capture: an ordinary application role (not a superuser,
//! granted only on its tables) tries every path by which a session could
//! write without its changes being replicated or choose its own version,
//! through the proxy and straight against Postgres. Each is refused with a
//! clear error, or captured and replicated like any write; afterwards
//! `meridian verify` reports the two regions identical.

mod support;

use std::time::Duration;

use meridian::cluster::postgres::free_port;
use support::*;
use tokio_postgres::error::SqlState;
use tokio_postgres::NoTls;

const SECRET: &str = "correct horse battery staple";
const SCHEMA: &str = "CREATE TABLE acct (id int PRIMARY KEY, v text);";
const APP: &str = "app_writer";

/// Regions 1 and 2 shipping to each other, each knowing the other's
/// database (for `meridian verify`).
fn pair(prefix: &str) -> (Region, Region) {
    let (pa, pb) = (free_port().unwrap(), free_port().unwrap());
    let (da, db) = (format!("{prefix}_a"), format!("{prefix}_b"));
    let extra = |listen: u16, peer: u16, peer_id: u16, peer_db: &str| {
        format!(
            "listen = \"127.0.0.1:{listen}\"\nsecret = \"{SECRET}\"\n\n\
             [[replication.peers]]\nname = \"{}\"\nid = {peer_id}\naddress = \"127.0.0.1:{peer}\"\n\
             postgres = \"{}\"\n",
            peer_db.replace('_', "-"),
            pg().socket_conninfo(peer_db)
        )
    };
    let mut regions = Vec::new();
    for (db, id, listen, peer, peer_id, peer_db) in
        [(&da, 1, pa, pb, 2, &db), (&db, 2, pb, pa, 1, &da)]
    {
        let (mut r, out) =
            Region::prepare_as(db, id, SCHEMA, &[], &extra(listen, peer, peer_id, peer_db));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        psql(
            &r.direct(),
            &[
                "-c",
                &format!(
                    "DO $$BEGIN CREATE ROLE {APP} LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END$$"
                ),
                "-c",
                &format!("GRANT SELECT, INSERT, UPDATE, DELETE ON acct TO {APP}; GRANT CREATE ON SCHEMA public TO {APP}; \
                          GRANT {APP} TO {REGION_OWNER}, {REGION_APPLIER}"),
            ],
            None,
        );
        r.proxy = Some(Proxy::start_with_config(&r.config));
        regions.push(r);
    }
    let b = regions.pop().unwrap();
    (regions.pop().unwrap(), b)
}

/// The application role's connection string, straight to Postgres.
fn app_direct(r: &Region) -> String {
    pg().socket_conninfo(&r.db).replace(
        &format!("user={}", pg().superuser()),
        &format!("user={APP}"),
    )
}

async fn connect(url: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, conn) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(conn);
    Ok(client)
}

fn code(e: &tokio_postgres::Error) -> Option<&SqlState> {
    e.code()
}

/// Runs `sql` as the application role straight against Postgres; must succeed.
fn direct(r: &Region, sql: &str) {
    psql(&app_direct(r), &["-v", "ON_ERROR_STOP=1", "-c", sql], None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_application_role_can_write_around_capture_through_the_proxy_or_directly() {
    let (a, b) = pair("priv");
    let proxy = a.proxy().url(APP, &a.db);

    // Through the proxy: every visible way to set one of meridian's settings
    // or take a replication origin ends the session with 42501, saying why.
    for (sql, names) in [
        ("SET meridian.applying = on", "meridian.applying"),
        (
            "BEGIN; SET LOCAL meridian.applying = on; COMMIT",
            "meridian.applying",
        ),
        ("RESET meridian.in_capture", "meridian.in_capture"),
        (
            "SELECT set_config('meridian.in_capture', 'on', false)",
            "meridian.in_capture",
        ),
        (
            "INSERT INTO acct SELECT 99, set_config('meridian.applying', 'on', true)",
            "meridian.applying",
        ),
        (
            &format!("ALTER ROLE {APP} SET meridian.applying = on"),
            "meridian.applying",
        ),
        (
            "SELECT pg_replication_origin_session_setup('meridian_1')",
            "pg_replication_origin_session_setup",
        ),
    ] {
        let client = connect(&proxy).await.unwrap();
        let e = client.batch_execute(sql).await.expect_err(sql);
        assert_eq!(
            code(&e),
            Some(&SqlState::INSUFFICIENT_PRIVILEGE),
            "{sql}: {e:?}"
        );
        let message = e.as_db_error().unwrap().message().to_string();
        assert!(
            message.contains(names) && message.contains("meridian refuses"),
            "{sql}: {message}"
        );
    }
    // The extended protocol: refused at Parse.
    let client = connect(&proxy).await.unwrap();
    let e = client
        .prepare("SELECT set_config('meridian.applying', $1, false)")
        .await
        .unwrap_err();
    assert_eq!(code(&e), Some(&SqlState::INSUFFICIENT_PRIVILEGE), "{e:?}");
    // Startup options.
    let e = connect(&format!("{proxy}&options=-c%20meridian.applying%3Don"))
        .await
        .unwrap_err();
    assert_eq!(code(&e), Some(&SqlState::INSUFFICIENT_PRIVILEGE), "{e:?}");
    assert_eq!(a.query("SELECT count(*) FROM acct WHERE id = 99"), ["0"]);
    // An ordinary session through the proxy is not disturbed.
    connect(&proxy)
        .await
        .unwrap()
        .batch_execute("INSERT INTO acct VALUES (1, 'proxy')")
        .await
        .unwrap();

    // Straight to Postgres: Postgres refuses what needs privileges...
    let app = connect(&app_direct(&a)).await.unwrap();
    for sql in [
        "SET session_replication_role = replica",
        "SELECT pg_replication_origin_session_setup('meridian_1')",
        "SELECT meridian.apply_session_setup()",
        "INSERT INTO meridian.row_version (tbl, pk, hlc, origin) VALUES ('public.acct', '{\"id\": 5}', 1, 1)",
        "DELETE FROM meridian.session_mark",
    ] {
        let e = app.batch_execute(sql).await.expect_err(sql);
        assert_eq!(code(&e), Some(&SqlState::INSUFFICIENT_PRIVILEGE), "{sql}: {e:?}");
    }
    // ...and meridian's settings mean nothing: each of these writes is captured.
    direct(
        &a,
        "SET meridian.applying = on; INSERT INTO acct VALUES (2, 'set')",
    );
    direct(&a, "SELECT set_config('meridian.applying', 'on', false); INSERT INTO acct VALUES (3, 'set_config')");
    direct(
        &a,
        "BEGIN; SET LOCAL meridian.in_capture = on; CREATE TABLE sneaky (id int PRIMARY KEY); \
         INSERT INTO sneaky VALUES (1); COMMIT",
    );
    // Startup options; and a role's defaults, where Postgres 15 lets only a
    // superuser put an unknown setting.
    let with_options = format!("{} options='-c meridian.in_capture=on'", app_direct(&a));
    connect(&with_options)
        .await
        .unwrap()
        .batch_execute(
            "INSERT INTO acct VALUES (5, 'options'); CREATE TABLE sneaky_options (id int PRIMARY KEY); \
             INSERT INTO sneaky_options VALUES (1)",
        )
        .await
        .unwrap();
    let e = app
        .batch_execute(&format!("ALTER ROLE {APP} SET meridian.in_capture = on"))
        .await
        .unwrap_err();
    assert_eq!(code(&e), Some(&SqlState::INSUFFICIENT_PRIVILEGE), "{e:?}");
    direct(&a, "INSERT INTO acct VALUES (4, 'after')");
    // A function that sets it with a name the proxy cannot see, then a table
    // created through the proxy.
    direct(
        &a,
        "CREATE FUNCTION sneak() RETURNS void LANGUAGE plpgsql AS \
         $$BEGIN PERFORM set_config('meridian.' || 'in_capture', 'on', false); END$$",
    );
    connect(&proxy)
        .await
        .unwrap()
        .batch_execute("SELECT sneak(); CREATE TABLE sneaky_fn (id int PRIMARY KEY); INSERT INTO sneaky_fn VALUES (1)")
        .await
        .unwrap();
    // A forged statement-position cache for a query of several statements:
    // it would ship the second CREATE TABLE's text as the first one's.
    let tail =
        "CREATE TABLE forged_a (id int PRIMARY KEY); CREATE TABLE forged_b (id int PRIMARY KEY)";
    let head = "SELECT set_config('meridian.ddl_statements', md5(current_query()) || '@' || statement_timestamp()::text || '|0|false|BS|BE', false); ";
    let at = head.len() + tail.find("CREATE TABLE forged_b").unwrap();
    let query = format!("{head}{tail}");
    let query = query.replace(
        "BS|BE",
        &format!("{at},{at}|{},{}", query.len(), query.len()),
    );
    direct(&a, &query);
    // A forged stamp for the rows a table holds when it gets its key.
    direct(
        &a,
        "CREATE TABLE late_key (id int, v text); INSERT INTO late_key VALUES (1, 'x'), (2, 'y')",
    );
    direct(
        &a,
        "BEGIN; SELECT set_config('meridian.tx_stamp', 'B1', true); \
         ALTER TABLE late_key ADD PRIMARY KEY (id); COMMIT",
    );
    // A forged note that a replicated object was dropped.
    direct(&a, "CREATE TEMP TABLE scratch (x int); SET meridian.dropped_replicated = on; DROP TABLE scratch");

    // Everything arrived in region 2.
    let tables = [
        "sneaky",
        "sneaky_options",
        "sneaky_fn",
        "forged_a",
        "forged_b",
    ];
    let state = |r: &Region| {
        let mut rows = r.query("SELECT string_agg(id::text, ',' ORDER BY id) FROM acct");
        for t in tables.iter().chain(&["late_key"]) {
            rows.extend(r.query(&format!("SELECT '{t} ' || count(*) FROM {t}")));
        }
        rows
    };
    let want = state(&a);
    assert_eq!(want[0], "1,2,3,4,5");
    let mut got = Vec::new();
    let arrived = (0..600).any(|_| {
        got = state(&b);
        got == want || {
            std::thread::sleep(Duration::from_millis(100));
            false
        }
    });
    assert!(
        arrived,
        "region 2 has {got:?}, region 1 {want:?}; held there: {:?}",
        b.query("SELECT tbl || ': ' || error FROM meridian.held")
    );
    assert_eq!(
        a.query("SELECT bool_and(hlc > 1::int8 << 40) FROM meridian.row_version WHERE tbl = 'public.late_key'"),
        ["t"],
        "capture chose the stamp of the rows captured with the key, not the session"
    );
    assert_eq!(
        b.query("SELECT count(*) FROM meridian.held"),
        ["0"],
        "nothing bogus was shipped"
    );
    let text = verified_identical(&a.config);
    for t in ["acct", "sneaky", "forged_a", "forged_b", "late_key"] {
        assert!(text.contains(&format!("public.{t}:")), "{t}: {text}");
    }
    let refused = http_get(&a.proxy().admin.to_string(), "/status");
    assert!(refused.contains("\"refused\":9"), "{refused}");
}

/// A Postgres that accepts TCP only over TLS, with a certificate for
/// 127.0.0.1 from a test CA; returns the server and the CA's file.
fn postgres_with_tls() -> (meridian::cluster::postgres::PgServer, std::path::PathBuf) {
    use meridian::cluster::postgres::{PgOptions, PgServer};
    let certs = scratch_dir("backend_tls_certs");
    let issued = meridian::cluster::certs::issue(&certs, &["127.0.0.1"]).unwrap();
    let (cert, key) = (&issued[0].cert, &issued[0].key);
    // Postgres wants its key private to the user it runs as.
    std::fs::set_permissions(key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    if unsafe { libc::geteuid() } == 0 {
        for f in [cert, key] {
            let out = std::process::Command::new("chown")
                .arg("postgres")
                .arg(f)
                .output()
                .unwrap();
            assert!(out.status.success(), "{out:?}");
        }
        let out = std::process::Command::new("chmod")
            .args(["755"])
            .arg(&certs)
            .output()
            .unwrap();
        assert!(out.status.success());
    }
    let opts = PgOptions {
        settings: vec![
            ("ssl".into(), "on".into()),
            ("ssl_cert_file".into(), cert.display().to_string()),
            ("ssl_key_file".into(), key.display().to_string()),
        ],
        hba_first: vec![
            "hostssl all all 127.0.0.1/32 trust".into(),
            "hostnossl all all 127.0.0.1/32 reject".into(),
        ],
        ..PgOptions::default()
    };
    let server =
        PgServer::start(&scratch_dir("backend_tls_pg"), &opts).expect("start PostgreSQL with TLS");
    (server, issued[0].ca.clone())
}

fn tls_region_config(
    dir: &std::path::Path,
    name: &str,
    pg: &meridian::cluster::postgres::PgServer,
    tls: &str,
) -> std::path::PathBuf {
    let (port, admin) = (free_port().unwrap(), free_port().unwrap());
    let config = dir.join(format!("{name}.toml"));
    std::fs::write(
        &config,
        format!(
            "[region]\nname = \"tls-region\"\nid = 1\n\n[proxy]\nlisten = \"127.0.0.1:{port}\"\n\n\
             [backend]\nhost = \"127.0.0.1\"\nport = {}\nuser = \"{}\"\ndatabase = \"postgres\"\n{tls}\n\n\
             [auth]\nmethod = \"trust\"\n\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n",
            pg.port,
            pg.superuser()
        ),
    )
    .unwrap();
    config
}

fn migrate(config: &std::path::Path) -> std::process::Output {
    migrate_as(config, None)
}

/// `meridian verify` from the region of `config`; asserts it found every
/// region identical and returns its report.
fn verified_identical(config: &std::path::Path) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_meridian"))
        .args(["verify", "--settle", "30s", "--config"])
        .arg(config)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// `backend.tls = "verify-full"` against a Postgres that refuses plain TCP:
/// migrate, client sessions and capture's slot all reach it over TLS; a CA
/// that did not sign its certificate is refused, saying so.
#[test]
fn the_proxy_reaches_postgres_over_verified_tls_and_refuses_a_wrong_ca() {
    let (pg, ca) = postgres_with_tls();
    let dir = scratch_dir("backend_tls_cfg");
    let wrong = meridian::cluster::certs::issue(&dir.join("wrong"), &["127.0.0.1"]).unwrap();
    let bad = tls_region_config(
        &dir,
        "wrong-ca",
        &pg,
        &format!(
            "tls = \"verify-full\"\ntls_ca = \"{}\"",
            wrong[0].ca.display()
        ),
    );
    let out = migrate(&bad);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("invalid peer certificate") && err.contains("backend.tls_ca"),
        "{err}"
    );

    // `require` encrypts without checking the certificate (libpq's sslmode=require).
    let unchecked = tls_region_config(&dir, "unchecked", &pg, "tls = \"require\"");
    let out = migrate(&unchecked);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let config = tls_region_config(
        &dir,
        "verified",
        &pg,
        &format!("tls = \"verify-full\"\ntls_ca = \"{}\"", ca.display()),
    );
    let out = migrate(&config);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    psql(
        &pg.socket_conninfo("postgres"),
        &["-c", "CREATE TABLE tls_kv (k int PRIMARY KEY, v text)"],
        None,
    );
    let proxy = Proxy::start_with_config(&config);
    let url = proxy.url(pg.superuser(), "postgres");
    let (out, _) = psql(
        &url,
        &[
            "-At",
            "-c",
            "INSERT INTO tls_kv VALUES (1, 'over tls')",
            "-c",
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
        ],
        None,
    );
    assert_eq!(
        out.lines().last(),
        Some("t"),
        "the session's backend leg is TLS: {out}"
    );
    // Capture read the insert from the slot, whose connection is TLS too.
    let direct = pg.socket_conninfo("postgres");
    eventually(
        "capture recorded the insert",
        Duration::from_secs(60),
        || {
            psql(
                &direct,
                &[
                    "-At",
                    "-c",
                    "SELECT count(*) FROM meridian.change WHERE tbl = 'public.tls_kv'",
                ],
                None,
            )
            .0
            .trim()
                == "1"
        },
    );
    let (ssl, _) = psql(
        &direct,
        &["-At", "-c", "SELECT bool_and(s.ssl) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) WHERE a.client_addr IS NOT NULL"],
        None,
    );
    assert_eq!(ssl.trim(), "t", "every TCP connection to Postgres is TLS");
}

const OWNER: &str = "meridian_owner";
const APPLIER: &str = "meridian_apply";
const TABLE_OWNER: &str = "priv_app_owner";

/// A region whose database and tables belong to an ordinary application
/// role, and whose meridian runs as `backend.user = meridian_apply` with
/// `backend.owner = meridian_owner`.
fn least_privilege_region(db: &str, id: u16, listen: u16, peer: u16, peer_db: &str) -> Region {
    let super_conn = pg().socket_conninfo("postgres");
    psql(
        &super_conn,
        &[
            "-c",
            &format!("DO $$BEGIN CREATE ROLE {TABLE_OWNER} LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END$$"),
            "-c",
            &format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"),
            "-c",
            &format!("CREATE DATABASE {db} OWNER {TABLE_OWNER}"),
        ],
        None,
    );
    let as_owner = pg().socket_conninfo(db).replace(
        &format!("user={}", pg().superuser()),
        &format!("user={TABLE_OWNER}"),
    );
    psql(&as_owner, &["-c", SCHEMA], None);
    let dir = scratch_dir(db);
    std::fs::create_dir_all(dir.join("rules")).unwrap();
    let (port, admin) = (free_port().unwrap(), free_port().unwrap());
    let config = dir.join("meridian.toml");
    std::fs::write(
        &config,
        format!(
            "[region]\nname = \"{}\"\nid = {id}\n\n[proxy]\nlisten = \"127.0.0.1:{port}\"\n\n\
             [backend]\nhost = \"{}\"\nport = {}\nuser = \"{APPLIER}\"\nowner = \"{OWNER}\"\ndatabase = \"{db}\"\n\n\
             [auth]\nmethod = \"trust\"\n\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n\n\
             [replication]\nrules = \"rules\"\nlisten = \"127.0.0.1:{listen}\"\nsecret = \"{SECRET}\"\n\n\
             [[replication.peers]]\nname = \"{}\"\nid = {}\naddress = \"127.0.0.1:{peer}\"\npostgres = \"{}\"\n",
            db.replace('_', "-"),
            pg().socket_dir().display(),
            pg().port,
            peer_db.replace('_', "-"),
            3 - id,
            pg().socket_conninfo(peer_db),
        ),
    )
    .unwrap();
    Region {
        db: db.into(),
        config,
        proxy: None,
    }
}

fn migrate_as(config: &std::path::Path, role: Option<&str>) -> std::process::Output {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_meridian"));
    cmd.args(["migrate", "--config"]).arg(config);
    if let Some(role) = role {
        cmd.args(["--as", role]);
    }
    cmd.output().unwrap()
}

/// meridian with two roles, neither a superuser: a superuser runs
/// `migrate --as` once (roles, grants only a superuser may give, event
/// triggers); after that the owner migrates, the apply role runs, and two
/// regions replicate rows and schema changes written by the application's
/// own role, and end identical.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_regions_replicate_with_meridians_roles_not_superusers() {
    let (pa, pb) = (free_port().unwrap(), free_port().unwrap());
    let mut a = least_privilege_region("lp_a", 1, pa, pb, "lp_b");
    let mut b = least_privilege_region("lp_b", 2, pb, pa, "lp_a");
    for r in [&a, &b] {
        let out = migrate_as(&r.config, Some(pg().superuser()));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = migrate_as(&r.config, None);
        assert!(
            out.status.success(),
            "as the owner: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(
        a.query(&format!("SELECT string_agg(rolname || ':' || rolsuper, ',' ORDER BY rolname) FROM pg_roles WHERE rolname IN ('{OWNER}', '{APPLIER}')")),
        [format!("{APPLIER}:false,{OWNER}:false")]
    );
    assert_eq!(
        a.query("SELECT nspowner::regrole::text FROM pg_namespace WHERE nspname = 'meridian'"),
        [OWNER]
    );
    // A missing event trigger is a step only a superuser can take: the
    // owner's migrate says so.
    psql(
        &a.direct(),
        &["-c", "DROP EVENT TRIGGER meridian_note_drop"],
        None,
    );
    let out = migrate_as(&a.config, None);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("only a superuser may create event triggers")
            && err.contains("--as"),
        "{err}"
    );
    let out = migrate_as(&a.config, Some(pg().superuser()));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    a.proxy = Some(Proxy::start_with_config(&a.config));
    b.proxy = Some(Proxy::start_with_config(&b.config));
    let (ua, ub) = (
        a.proxy().url(TABLE_OWNER, &a.db),
        b.proxy().url(TABLE_OWNER, &b.db),
    );
    psql(
        &ua,
        &[
            "-c",
            "INSERT INTO acct VALUES (1, 'a'), (2, 'a')",
            "-c",
            "CREATE TABLE later (id int PRIMARY KEY, n int)",
            "-c",
            "INSERT INTO later VALUES (1, 1)",
        ],
        None,
    );
    eventually("row 1 reached region 2", Duration::from_secs(60), || {
        b.query("SELECT count(*) FROM acct WHERE id = 1") == ["1"]
    });
    psql(
        &ub,
        &[
            "-c",
            "INSERT INTO acct VALUES (3, 'b')",
            "-c",
            "UPDATE acct SET v = 'b' WHERE id = 1",
        ],
        None,
    );
    let state = |r: &Region| {
        r.query("SELECT string_agg(id || '=' || v, ',' ORDER BY id) FROM acct")
            .into_iter()
            .chain(r.query("SELECT count(*) FROM pg_class WHERE relname = 'later'"))
            .collect::<Vec<_>>()
    };
    let arrived = (0..300).any(|_| {
        state(&a) == ["1=b,2=a,3=b", "1"] && state(&b) == state(&a) || {
            std::thread::sleep(Duration::from_millis(100));
            false
        }
    });
    let problems = |r: &Region| -> String {
        r.proxy()
            .log()
            .lines()
            .filter(|l| l.contains("WARN") || l.contains("ERROR"))
            .take(8)
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert!(
        arrived,
        "a: {:?} b: {:?}\na: {}\nb: {}",
        state(&a),
        state(&b),
        problems(&a),
        problems(&b)
    );
    eventually(
        "the new table's row arrived",
        Duration::from_secs(60),
        || b.query("SELECT count(*) FROM later") == ["1"],
    );
    psql(
        &ub,
        &[
            "-c",
            "DELETE FROM acct WHERE id = 2",
            "-c",
            "INSERT INTO later VALUES (2, 2)",
        ],
        None,
    );
    eventually(
        "writes to the replicated table arrive back",
        Duration::from_secs(60),
        || {
            a.query("SELECT count(*) FROM later") == ["2"]
                && a.query("SELECT count(*) FROM acct") == ["2"]
        },
    );
    verified_identical(&a.config);
    assert_eq!(b.query("SELECT count(*) FROM meridian.held"), ["0"]);
}
