//! Two regions (two databases of the binary's PostgreSQL, each with its own
//! `meridian migrate` and `meridian run`) replicating through each other:
//! rows written in one are readable in the other, conflicts end the same way
//! in both, deletes stay deleted, a restarted region catches up without
//! applying anything twice, and a peer with the wrong secret is refused.

mod support;

use std::time::Duration;

use meridian::cluster::postgres::free_port;
use support::*;

const SECRET: &str = "correct horse battery staple";
const SCHEMA: &str = "CREATE TABLE kv (k int PRIMARY KEY, v text, n int NOT NULL DEFAULT 0);";

struct Pair {
    a: Region,
    b: Region,
}

/// Regions 1 and 2, each shipping to the other's replication port.
fn pair(prefix: &str) -> Pair {
    let (pa, pb) = (free_port().unwrap(), free_port().unwrap());
    let extra = |listen: u16, peer: u16, peer_id: u16| {
        format!(
            "listen = \"127.0.0.1:{listen}\"\nsecret = \"{SECRET}\"\n\
             [[replication.peers]]\nname = \"peer\"\nid = {peer_id}\naddress = \"127.0.0.1:{peer}\"\n"
        )
    };
    let (mut a, out) =
        Region::prepare_as(&format!("{prefix}_a"), 1, SCHEMA, &[], &extra(pa, pb, 2));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (mut b, out) =
        Region::prepare_as(&format!("{prefix}_b"), 2, SCHEMA, &[], &extra(pb, pa, 1));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    a.proxy = Some(Proxy::start_with_config(&a.config));
    b.proxy = Some(Proxy::start_with_config(&b.config));
    Pair { a, b }
}

fn table(r: &Region) -> Vec<String> {
    r.query("SELECT format('%s=%s/%s', k, v, n) FROM kv ORDER BY k")
}

fn converge(p: &Pair, what: &str) -> Vec<String> {
    let mut last = (Vec::new(), Vec::new());
    eventually(what, Duration::from_secs(30), || {
        last = (table(&p.a), table(&p.b));
        last.0 == last.1
    });
    last.0
}

#[test]
fn rows_written_in_either_region_reach_the_other_and_converge() {
    let p = pair("rep_basic");
    psql(
        &p.a.url(),
        &[
            "-c",
            "INSERT INTO kv (k, v) VALUES (1, 'from a'), (2, 'from a')",
        ],
        None,
    );
    psql(
        &p.b.url(),
        &["-c", "INSERT INTO kv (k, v) VALUES (3, 'from b')"],
        None,
    );
    assert_eq!(
        converge(&p, "inserts replicate both ways"),
        ["1=from a/0", "2=from a/0", "3=from b/0"]
    );
    // Update in B, delete in A.
    psql(
        &p.b.url(),
        &["-c", "UPDATE kv SET v = 'changed in b', n = 5 WHERE k = 1"],
        None,
    );
    psql(&p.a.url(), &["-c", "DELETE FROM kv WHERE k = 2"], None);
    assert_eq!(
        converge(&p, "update and delete replicate"),
        ["1=changed in b/5", "3=from b/0"]
    );
    // Applied changes were not captured again: each region's log holds only its own.
    assert_eq!(
        p.a.query("SELECT DISTINCT origin FROM meridian.change"),
        ["1"]
    );
    assert_eq!(
        p.b.query("SELECT DISTINCT origin FROM meridian.change"),
        ["2"]
    );
    // Concurrent writes to one key in both regions: both end with the same row.
    for i in 0..20 {
        psql(&p.a.url(), &["-c", &format!("INSERT INTO kv (k, v, n) VALUES (10, 'a', {i}) ON CONFLICT (k) DO UPDATE SET v = 'a', n = {i}")], None);
        psql(&p.b.url(), &["-c", &format!("INSERT INTO kv (k, v, n) VALUES (10, 'b', {i}) ON CONFLICT (k) DO UPDATE SET v = 'b', n = {i}")], None);
    }
    let end = converge(&p, "concurrent writes converge");
    assert!(end.iter().any(|r| r.starts_with("10=")), "{end:?}");
    // The winner is the row with the highest version in both.
    let versions = |r: &Region| {
        r.query("SELECT format('%s/%s', hlc, origin) FROM meridian.row_version WHERE pk = '{\"k\": 10}'")
    };
    eventually("versions agree", Duration::from_secs(30), || {
        versions(&p.a) == versions(&p.b)
    });
}

#[test]
fn a_delete_is_not_undone_by_an_older_update_arriving_late() {
    let p = pair("rep_tomb");
    psql(
        &p.a.url(),
        &["-c", "INSERT INTO kv (k, v) VALUES (1, 'x')"],
        None,
    );
    converge(&p, "insert replicates");
    // B deletes; an older update from A (stamped before the delete) must not
    // bring the row back. Make A's update older by applying it with an old
    // version straight through apply_batch, as a late batch would.
    psql(&p.b.url(), &["-c", "DELETE FROM kv WHERE k = 1"], None);
    converge(&p, "delete replicates");
    let old_hlc: i64 =
        p.b.query("SELECT hlc - 1000 FROM meridian.row_version WHERE pk = '{\"k\": 1}'")[0]
            .parse()
            .unwrap();
    let late = format!(
        "SELECT meridian.apply_batch(1, '[{{\"xid\": 999999, \"seq\": 1, \"hlc\": {old_hlc}, \"tx_hlc\": {old_hlc}, \"tbl\": \"public.kv\", \"op\": \"U\", \"pk\": {{\"k\": 1}}, \"row\": {{\"k\": 1, \"v\": \"zombie\", \"n\": 0}}, \"old\": null}}]')"
    );
    let (out, _) = psql(&p.b.direct(), &["-At", "-c", &late], None);
    assert!(out.contains("\"older\": 1"), "{out}");
    assert_eq!(
        table(&p.b),
        Vec::<String>::new(),
        "deleted row stays deleted"
    );
}

#[test]
fn a_region_restarted_after_missing_writes_catches_up_once() {
    let mut p = pair("rep_restart");
    psql(
        &p.a.url(),
        &[
            "-c",
            "INSERT INTO kv (k, v) SELECT g, 'first' FROM generate_series(1, 50) g",
        ],
        None,
    );
    converge(&p, "first rows");
    // B goes away (SIGKILL); A keeps taking writes.
    p.b.proxy.take();
    psql(
        &p.a.url(),
        &[
            "-c",
            "INSERT INTO kv (k, v) SELECT g, 'while b was down' FROM generate_series(51, 300) g",
        ],
        None,
    );
    psql(
        &p.a.url(),
        &["-c", "UPDATE kv SET n = n + 1 WHERE k <= 100"],
        None,
    );
    p.b.proxy = Some(Proxy::start_with_config(&p.b.config));
    let rows = converge(&p, "B catches up");
    assert_eq!(rows.len(), 300);
    // Applied exactly once: B's position counts every change A captured.
    let captured: i64 = p.a.query("SELECT count(*) FROM meridian.change")[0]
        .parse()
        .unwrap();
    eventually(
        "B applied every change once",
        Duration::from_secs(30),
        || {
            p.b.query("SELECT changes FROM meridian.applied WHERE origin = 1")
                == [captured.to_string()]
        },
    );
}

#[test]
fn a_peer_with_the_wrong_secret_is_refused_and_logged() {
    let p = pair("rep_auth");
    // A shipper that does not know the secret: a third config pointing at B.
    let (mut intruder, out) = Region::prepare_as(
        "rep_auth_x",
        1,
        SCHEMA,
        &[],
        &format!(
            "secret = \"not the cluster secret\"\n[[replication.peers]]\nname = \"b\"\nid = 2\naddress = \"{}\"\n",
            replication_address(&p.b)
        ),
    );
    assert!(out.status.success());
    intruder.proxy = Some(Proxy::start_with_config(&intruder.config));
    psql(
        &intruder.url(),
        &["-c", "INSERT INTO kv (k, v) VALUES (666, 'intruder')"],
        None,
    );
    eventually(
        "B refuses and logs the intruder",
        Duration::from_secs(30),
        || p.b.proxy().log().contains("wrong cluster secret"),
    );
    assert!(table(&p.b).iter().all(|r| !r.starts_with("666=")));
}

fn replication_address(r: &Region) -> String {
    let config = meridian::config::Config::load(&r.config).unwrap();
    config
        .replication
        .listen
        .expect("replication listen")
        .to_string()
}
