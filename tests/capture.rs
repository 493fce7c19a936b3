//! The write path against real PostgreSQL: `meridian migrate`, capture of
//! every committed change with the transaction's stamp, the safe read order,
//! stamps that survive a restart with the clock set back, and real clients
//! (psql, pgbench, psycopg pipeline mode, asyncpg) writing through the proxy.
//!
//! Each test works in its own database of the binary's shared server, with
//! its own `meridian migrate` and `meridian run`.

mod support;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use meridian::capture::reader::{read_changes, Operation, Position};
use meridian::clock::physical_ms;
use support::*;

const ITEMS: &str = "CREATE TABLE items (id int PRIMARY KEY, v text);
     CREATE TABLE parent (id int PRIMARY KEY);
     CREATE TABLE child (id int PRIMARY KEY, parent_id int REFERENCES parent ON DELETE CASCADE);
     CREATE FUNCTION add_item(i int) RETURNS void LANGUAGE sql AS $$ INSERT INTO items VALUES (i, 'fn') $$;
     CREATE TABLE audit (id int PRIMARY KEY, what text);
     CREATE FUNCTION audit_parent() RETURNS trigger LANGUAGE plpgsql AS
       $$ BEGIN INSERT INTO audit VALUES (NEW.id, 'parent added'); RETURN NEW; END $$;
     CREATE TRIGGER parent_audit AFTER INSERT ON parent FOR EACH ROW EXECUTE FUNCTION audit_parent();";

#[test]
fn migrate_refuses_tables_without_a_key_and_is_idempotent() {
    let schema =
        "CREATE TABLE keyed (id int PRIMARY KEY); CREATE TABLE events (at timestamptz, what text);";
    let (region, out) = Region::prepare("cap_migrate", schema, &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("public.events"), "{err}");
    assert!(err.contains("ADD PRIMARY KEY"), "{err}");
    assert!(err.contains("insert_only = true"), "{err}");
    assert!(
        region.query("SELECT count(*) FROM meridian.replicated_table WHERE captured") == ["0"],
        "a refused run enables nothing"
    );
    // The way out by rule: declare the table insert-only.
    std::fs::write(
        region.config.parent().unwrap().join("rules/events.toml"),
        "[[table]]\nname = \"public.events\"\ninsert_only = true\n",
    )
    .unwrap();
    let first = region.migrate();
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let second = region.migrate();
    assert!(second.status.success());
    let second_out = String::from_utf8_lossy(&second.stdout);
    assert!(second_out.contains("schema up to date"), "{second_out}");
    assert!(second_out.contains("public.events"), "{second_out}");
    assert!(second_out.contains("public.keyed"), "{second_out}");
    assert_eq!(
        region.query("SELECT version FROM meridian.migration ORDER BY 1"),
        ["11", "12", "13", "14", "15"]
    );
    // A rule may name a table that does not exist yet: it is checked when
    // the table appears, and stays in force when the table is re-created.
    std::fs::write(
        region.config.parent().unwrap().join("rules/ghost.toml"),
        "[[table]]\nname = \"public.ghost\"\n[table.columns]\nscore = \"max\"\n",
    )
    .unwrap();
    let ghost = region.migrate();
    assert!(
        ghost.status.success(),
        "{}",
        String::from_utf8_lossy(&ghost.stderr)
    );
    let out = psql_raw(
        &region.app_direct(),
        &["-c", "CREATE TABLE ghost (id int PRIMARY KEY)"],
        None,
        &[],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains(
                "ghost.toml: table[0].columns.score: table public.ghost has no column score"
            ),
        "{err}"
    );
    for _ in 0..2 {
        psql(
            &region.app_direct(),
            &[
                "-c",
                "DROP TABLE IF EXISTS ghost",
                "-c",
                "CREATE TABLE ghost (id int PRIMARY KEY, score int)",
            ],
            None,
        );
        assert_eq!(
            region.query("SELECT format('%s %s', e.columns, r.captured) FROM meridian.engine_table e JOIN meridian.replicated_table r USING (tbl) WHERE tbl = 'public.ghost'"),
            ["{\"score\": \"max\"} t"]
        );
    }
    // So does a merge rule for a column the table does not have.
    std::fs::write(
        region.config.parent().unwrap().join("rules/ghost.toml"),
        "[[table]]\nname = \"public.keyed\"\n[table.columns]\nscore = \"max\"\n",
    )
    .unwrap();
    let ghost = region.migrate();
    assert!(!ghost.status.success());
    let err = String::from_utf8_lossy(&ghost.stderr);
    assert!(
        err.contains("ghost.toml: table[0].columns.score: table public.keyed has no column score"),
        "{err}"
    );
}

#[test]
fn migrate_applies_every_function_again_and_refuses_a_schema_from_before_its_baseline() {
    let (region, out) = Region::prepare(
        "cap_reapply",
        "CREATE TABLE keyed (id int PRIMARY KEY)",
        &[],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Every run applies the functions again: one changed by hand is back.
    psql(
        &region.direct(),
        &["-c", "CREATE OR REPLACE FUNCTION meridian.hlc_time(hlc bigint) RETURNS timestamptz LANGUAGE sql AS 'SELECT NULL::timestamptz'"],
        None,
    );
    assert!(region.migrate().status.success());
    assert_eq!(
        region.query("SELECT meridian.hlc_time(0) = '2024-01-01 00:00:00+00'"),
        ["t"]
    );
    // A database whose meridian schema stopped before the baseline is
    // refused, not half-upgraded.
    psql(
        &region.direct(),
        &["-c", "UPDATE meridian.migration SET version = version - 9"],
        None,
    );
    let old = region.migrate();
    let err = String::from_utf8_lossy(&old.stderr);
    assert!(
        !old.status.success() && err.contains("only up to 6"),
        "{err}"
    );
}

#[test]
fn every_kind_of_write_through_the_proxy_is_captured_once_with_one_stamp_per_transaction() {
    let mut r = Region::start("cap_kinds", ITEMS, &[]);
    let before_ms = meridian::clock::Clock::start(0, Duration::from_millis(500)).now_ms();
    let url = r.url();
    psql(
        &url,
        &[],
        Some(
            "INSERT INTO items VALUES (1, 'a'), (2, 'b'), (3, 'c');
             UPDATE items SET v = 'B' WHERE id = 2;
             DELETE FROM items WHERE id = 3;
             BEGIN; INSERT INTO items VALUES (4, 'd'); UPDATE items SET id = 40 WHERE id = 4; COMMIT;
             BEGIN; INSERT INTO items VALUES (5, 'rolled back'); ROLLBACK;
             SELECT add_item(6);
             INSERT INTO parent VALUES (1); INSERT INTO child VALUES (10, 1), (11, 1);
             DELETE FROM parent WHERE id = 1;
             COPY items FROM STDIN;
7\tcopied
8\tcopied
\\.
             ",
        ),
    );
    r.captured();
    let rows = r.query(
        "SELECT format('%s %s %s', \"table\", operation, key) FROM meridian.changes ORDER BY xid, seq",
    );
    let expected = [
        "public.items insert {\"id\": 1}",
        "public.items insert {\"id\": 2}",
        "public.items insert {\"id\": 3}",
        "public.items update {\"id\": 2}",
        "public.items delete {\"id\": 3}",
        "public.items insert {\"id\": 4}",
        "public.items delete {\"id\": 4}",
        "public.items insert {\"id\": 40}",
        "public.items insert {\"id\": 6}",
        "public.parent insert {\"id\": 1}",
        "public.audit insert {\"id\": 1}",
        "public.child insert {\"id\": 10}",
        "public.child insert {\"id\": 11}",
        "public.child delete {\"id\": 10}",
        "public.child delete {\"id\": 11}",
        "public.parent delete {\"id\": 1}",
        "public.items insert {\"id\": 7}",
        "public.items insert {\"id\": 8}",
    ];
    let mut got = rows.clone();
    let mut want: Vec<String> = expected.iter().map(|s| s.to_string()).collect();
    got.sort();
    want.sort();
    assert_eq!(got, want, "in capture order: {rows:#?}");
    // One stamp per transaction (nine committed ones wrote), a different
    // one for each, close to now.
    assert_eq!(
        r.query("SELECT count(DISTINCT tx_hlc) FROM meridian.change"),
        ["9"]
    );
    assert_eq!(
        r.query(
            "SELECT count(DISTINCT tx_hlc) FROM meridian.changes WHERE key->>'id' IN ('4', '40')"
        ),
        ["1"]
    );
    assert_eq!(
        r.query("SELECT count(DISTINCT tx_hlc) FROM meridian.changes WHERE operation = 'delete' AND \"table\" IN ('public.child', 'public.parent')"),
        ["1"]
    );
    for hlc in r.query("SELECT DISTINCT tx_hlc FROM meridian.change") {
        let ms = physical_ms(hlc.parse().unwrap()).unwrap();
        assert!(
            ms >= before_ms - 1000 && ms <= before_ms + 120_000,
            "stamp {hlc} ({ms} ms) is not from this test (started {before_ms})"
        );
    }
    // The new row image and the origin.
    assert_eq!(
        r.query("SELECT \"row\"->>'v' FROM meridian.changes WHERE key = '{\"id\": 2}' AND operation = 'update'"),
        ["B"]
    );
    assert_eq!(
        r.query("SELECT DISTINCT origin || ' ' || origin_name FROM meridian.changes"),
        ["3 cap-kinds"]
    );
    // TRUNCATE is captured as one change.
    psql(&url, &["-c", "TRUNCATE child"], None);
    r.captured();
    assert_eq!(
        r.query("SELECT count(*) FROM meridian.changes WHERE operation = 'truncate' AND \"table\" = 'public.child'"),
        ["1"]
    );
    // A write straight to Postgres is captured the same way: capture reads
    // the WAL, whatever session wrote.
    psql(
        &r.direct(),
        &["-c", "INSERT INTO items VALUES (100, 'cron job')"],
        None,
    );
    r.captured();
    let bypass: u64 = r.query("SELECT tx_hlc FROM meridian.changes WHERE key = '{\"id\": 100}'")[0]
        .parse()
        .unwrap();
    assert!(physical_ms(bypass).unwrap() >= before_ms - 1000);
    r.proxy.take();
}

#[test]
fn counter_columns_record_their_old_values() {
    let r = Region::start(
        "cap_counters",
        "CREATE TABLE accounts (id int PRIMARY KEY, balance numeric NOT NULL, owner text);",
        &[(
            "accounts.toml",
            "[[table]]\nname = \"public.accounts\"\n[table.columns]\nbalance = \"counter\"\n",
        )],
    );
    psql(
        &r.url(),
        &[],
        Some("INSERT INTO accounts VALUES (1, 100, 'ann'); UPDATE accounts SET balance = balance - 30 WHERE id = 1;"),
    );
    r.captured();
    assert_eq!(
        r.query("SELECT format('%s %s %s', operation, old, row->'balance') FROM meridian.changes ORDER BY xid, seq -- format() prints NULL as nothing"),
        ["insert  100", "update {\"balance\": 100} 70"]
    );
}

#[test]
fn a_renamed_table_keeps_its_rules_and_a_dropped_one_loses_its_capture_functions() {
    let r = Region::start(
        "cap_rename",
        "CREATE TABLE accounts (id int PRIMARY KEY, balance numeric NOT NULL);",
        &[(
            "accounts.toml",
            "[[table]]\nname = \"public.accounts\"\n[table.columns]\nbalance = \"counter\"\n",
        )],
    );
    let oid = r.query("SELECT 'public.accounts'::regclass::oid")[0].clone();
    psql(
        &r.url(),
        &[],
        Some("INSERT INTO accounts VALUES (1, 100); ALTER TABLE accounts RENAME TO ledger; UPDATE ledger SET balance = balance - 30;"),
    );
    r.captured();
    assert_eq!(
        r.query(
            "SELECT format('%s %s %s', tbl, counters, captured) FROM meridian.replicated_table"
        ),
        ["public.ledger {balance} t"]
    );
    assert_eq!(
        r.query("SELECT format('%s %s', \"table\", old) FROM meridian.changes WHERE operation = 'update'"),
        ["public.ledger {\"balance\": 100}"],
        "the update is captured under the new name, as a counter"
    );
    psql(&r.url(), &["-c", "DROP TABLE ledger"], None);
    assert_eq!(
        r.query(&format!(
            "SELECT count(*) FROM pg_proc WHERE proname IN ('capture_{oid}', 'capture_rows_{oid}')"
        )),
        ["0"]
    );
    assert_eq!(
        r.query("SELECT captured FROM meridian.replicated_table"),
        ["f"]
    );
}

/// Both apply paths add counter deltas whether or not the change wins the
/// rest of the row: the set-wise one (plain batches) and the change-by-change
/// one (batches holding a TRUNCATE or DDL).
#[test]
fn applied_updates_add_their_counter_deltas_on_both_apply_paths() {
    let r = Region::start(
        "cap_counter_apply",
        "CREATE TABLE accounts (id int PRIMARY KEY, balance numeric NOT NULL, owner text);
         CREATE TABLE other (id int PRIMARY KEY);",
        &[(
            "accounts.toml",
            "[[table]]\nname = \"public.accounts\"\n[table.columns]\nbalance = \"counter\"\n",
        )],
    );
    psql(
        &r.url(),
        &[],
        Some("INSERT INTO accounts VALUES (1, 70, 'ann'); INSERT INTO other VALUES (1);"),
    );
    // The local rows' versions are recorded before anything is applied.
    r.captured();
    let change = |seq: u32, hlc: u64, op: &str, tbl: &str, row: &str, old: &str| {
        format!(
            r#"{{"xid": 5, "seq": {seq}, "hlc": {hlc}, "tx_hlc": {hlc}, "tbl": "{tbl}", "op": "{op}", "pk": {{"id": 1}}, "row": {row}, "old": {old}}}"#
        )
    };
    let apply = |changes: Vec<String>| r.apply_changes(9, &format!("[{}]", changes.join(",")));
    // Older than the local row: owner stays, the deltas (+10, -5) count.
    apply(vec![
        change(
            1,
            1,
            "U",
            "public.accounts",
            r#"{"id": 1, "balance": 80, "owner": "old"}"#,
            r#"{"balance": 70}"#,
        ),
        change(
            2,
            2,
            "U",
            "public.accounts",
            r#"{"id": 1, "balance": 75, "owner": "old"}"#,
            r#"{"balance": 80}"#,
        ),
    ]);
    assert_eq!(
        r.query("SELECT format('%s %s', balance, owner) FROM accounts"),
        ["75 ann"]
    );
    // With a TRUNCATE in the batch (change by change), newer: owner changes, +100 counts.
    let newer = 1u64 << 62;
    apply(vec![
        change(3, newer, "T", "public.other", "null", "null"),
        change(
            4,
            newer + 1,
            "U",
            "public.accounts",
            r#"{"id": 1, "balance": 100, "owner": "bob"}"#,
            r#"{"balance": 0}"#,
        ),
    ]);
    assert_eq!(
        r.query("SELECT format('%s %s', balance, owner) FROM accounts"),
        ["175 bob"]
    );
    assert_eq!(r.query("SELECT count(*) FROM other"), ["0"]);
    // The set-wise path itself works (the apply falls back to change by
    // change when it fails, which is correct but much slower, and silent).
    let set_wise = r.apply_changes(
        9,
        &format!(
            "[{}]",
            change(
                5,
                newer + 3,
                "U",
                "public.accounts",
                r#"{"id": 1, "balance": 176, "owner": "bob"}"#,
                r#"{"balance": 175}"#
            )
        ),
    );
    assert!(set_wise.phases.is_some(), "{set_wise:?}");
    assert_eq!((set_wise.applied, set_wise.older), (1, 0));
    // A row captured before a column existed gets the column's default.
    psql(
        &r.app_direct(),
        &[
            "-c",
            "ALTER TABLE accounts ADD COLUMN tier text NOT NULL DEFAULT 'basic'",
        ],
        None,
    );
    let inserted = r.apply_changes(
        9,
        &format!(
            "[{}]",
            change(
                6,
                newer + 2,
                "I",
                "public.accounts",
                r#"{"id": 2, "balance": 1, "owner": "cy"}"#,
                "null"
            )
            .replace(r#""pk": {"id": 1}"#, r#""pk": {"id": 2}"#)
        ),
    );
    assert_eq!(inserted.applied, 1, "{inserted:?}");
    assert_eq!(r.query("SELECT tier FROM accounts WHERE id = 2"), ["basic"]);
    // The same batch again (a resend) changes nothing.
    apply(vec![change(
        4,
        newer + 1,
        "U",
        "public.accounts",
        r#"{"id": 1, "balance": 100, "owner": "bob"}"#,
        r#"{"balance": 0}"#,
    )]);
    assert_eq!(
        r.query("SELECT balance FROM accounts WHERE id = 1"),
        ["176"]
    );
}

/// The row's current version can be above this region's clock (a peer's
/// clock runs ahead, within the drift bound): a local write then gets the
/// row's version plus one, not its own (smaller) stamp.
#[test]
fn a_local_write_always_gets_a_larger_version_than_the_rows_current_one() {
    let r = Region::start("cap_versions", ITEMS, &[]);
    psql(&r.url(), &["-c", "INSERT INTO items VALUES (1, 'x')"], None);
    r.captured();
    let now = meridian::clock::Clock::start(0, Duration::from_millis(500)).now_ms();
    let ahead = meridian::clock::Clock::hlc_at(now + 30_000);
    let applied = r.apply_changes(
        9,
        &format!(
            r#"[{{"xid": 5, "seq": 1, "hlc": {ahead}, "tx_hlc": {ahead}, "tbl": "public.items", "op": "U", "pk": {{"id": 1}}, "row": {{"id": 1, "v": "from a peer"}}, "old": null}}]"#
        ),
    );
    assert_eq!(applied.applied, 1, "{applied:?}");
    psql(
        &r.url(),
        &["-c", "UPDATE items SET v = 'local' WHERE id = 1"],
        None,
    );
    r.captured();
    let local = r.query(
        "SELECT format('%s %s', hlc, tx_hlc) FROM meridian.changes WHERE row->>'v' = 'local'",
    );
    let (hlc, stamp) = local[0].split_once(' ').unwrap();
    let (hlc, stamp): (u64, u64) = (hlc.parse().unwrap(), stamp.parse().unwrap());
    assert!(stamp < ahead, "the local stamp is below the peer's version");
    assert!(hlc > ahead, "the local version is above it");
    assert_eq!(
        r.query("SELECT hlc FROM meridian.row_version WHERE pk = '{\"id\": 1}'"),
        [hlc.to_string()]
    );
}

/// 16 clients mixing long and short transactions (some rolled back) while a
/// reader follows the change stream: every committed change is read exactly
/// once, positions only grow, and nothing rolled back appears.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_concurrent_clients_every_committed_change_read_once_in_a_safe_order() {
    let r = Region::start("cap_order", ITEMS, &[]);
    let reader = r.direct_client().await;
    // Set once the writers are done: a transaction id after all of theirs.
    // The safe read order stops below the oldest running transaction of the
    // whole server (other tests' included), so an empty read means "done"
    // only once everything up to this id has finished.
    let done = std::sync::Arc::new(std::sync::atomic::AtomicI64::new(0));
    let follow = {
        let done = done.clone();
        tokio::spawn(async move {
            let mut pos = Position::default();
            let mut seen = Vec::new();
            loop {
                let horizon = done.load(std::sync::atomic::Ordering::Acquire);
                let batch = read_changes(&reader, pos, 50).await.unwrap();
                for c in &batch {
                    assert!(c.position() > pos, "read position went backwards");
                    pos = c.position();
                    seen.push(c.clone());
                }
                if batch.is_empty() {
                    if horizon > 0 {
                        let past: bool = reader
                            .query_one(
                                "SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint > $1",
                                &[&horizon],
                            )
                            .await
                            .unwrap()
                            .get(0);
                        if past {
                            return seen;
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        })
    };
    let mut writers = Vec::new();
    for w in 0..16 {
        let client = r.client().await;
        writers.push(tokio::spawn(async move {
            let mut committed = Vec::new();
            for t in 0..12 {
                let id = w * 1000 + t;
                let long = (w + t) % 4 == 0;
                let rollback = (w * 7 + t) % 5 == 0;
                client.batch_execute("BEGIN").await.unwrap();
                client
                    .execute("INSERT INTO items VALUES ($1, 'first')", &[&id])
                    .await
                    .unwrap();
                if long {
                    // Holds its xid while later transactions commit.
                    client.batch_execute("SELECT pg_sleep(0.05)").await.unwrap();
                }
                client
                    .execute("UPDATE items SET v = 'second' WHERE id = $1", &[&id])
                    .await
                    .unwrap();
                if rollback {
                    client.batch_execute("ROLLBACK").await.unwrap();
                } else {
                    client.batch_execute("COMMIT").await.unwrap();
                    committed.push(id);
                }
            }
            committed
        }));
    }
    let mut committed = BTreeSet::new();
    for w in writers {
        committed.extend(w.await.unwrap());
    }
    tokio::task::block_in_place(|| r.captured());
    let horizon: i64 = r
        .direct_client()
        .await
        .query_one("SELECT txid_current()", &[])
        .await
        .unwrap()
        .get(0);
    done.store(horizon, std::sync::atomic::Ordering::Release);
    let seen = follow.await.unwrap();
    // Exactly once: an insert and an update per committed id, nothing else.
    let mut per_id: BTreeMap<i64, Vec<Operation>> = BTreeMap::new();
    for c in &seen {
        let id = c.pk.as_ref().unwrap().to_value()["id"].as_i64().unwrap();
        per_id.entry(id).or_default().push(c.op);
    }
    let ids: BTreeSet<i32> = per_id.keys().map(|&i| i as i32).collect();
    assert_eq!(ids, committed, "read ids differ from committed ids");
    for (id, ops) in &per_id {
        assert_eq!(ops, &[Operation::Insert, Operation::Update], "id {id}");
    }
    let distinct: BTreeSet<Position> = seen.iter().map(|c| c.position()).collect();
    assert_eq!(distinct.len(), seen.len(), "a change was read twice");
}

#[test]
fn a_restart_with_the_clock_set_back_an_hour_still_issues_larger_stamps() {
    let mut r = Region::start("cap_restart", ITEMS, &[]);
    psql(
        &r.url(),
        &["-c", "INSERT INTO items VALUES (1, 'before')"],
        None,
    );
    r.captured();
    let before: u64 = r.query("SELECT max(tx_hlc) FROM meridian.change")[0]
        .parse()
        .unwrap();
    // SIGKILL: no orderly shutdown, only what the lease persisted.
    r.proxy.take();
    r.proxy = Some(Proxy::start_with_config_args(
        &r.config,
        &["--clock-offset-ms=-3600000"],
    ));
    psql(
        &r.url(),
        &["-c", "INSERT INTO items VALUES (2, 'after')"],
        None,
    );
    r.captured();
    let after: u64 = r.query("SELECT tx_hlc FROM meridian.change WHERE pk = '{\"id\": 2}'")[0]
        .parse()
        .unwrap();
    assert!(after > before, "stamp after restart {after} <= {before}");
}

/// The relay adds nothing to a session's traffic, reads or writes (capture
/// stamps each transaction from the WAL): read-only work captures nothing
/// and a writing transaction gets one stamp for all its changes.
#[test]
fn reads_pay_nothing_and_each_writing_transaction_is_stamped_once() {
    let r = Region::start("cap_reads", ITEMS, &[]);
    let url = r.url();
    psql(
        &url,
        &[],
        Some("SELECT 1; BEGIN; SELECT count(*) FROM items; COMMIT; SHOW work_mem; SELECT now();"),
    );
    r.captured();
    assert_eq!(r.query("SELECT count(*) FROM meridian.change"), ["0"]);
    psql(
        &url,
        &[],
        Some("BEGIN; INSERT INTO items VALUES (1, 'a'); INSERT INTO items VALUES (2, 'b'); UPDATE items SET v = 'c'; COMMIT;"),
    );
    r.captured();
    assert_eq!(
        r.query("SELECT count(*) || ' ' || count(DISTINCT tx_hlc) FROM meridian.change"),
        ["4 1"],
        "one stamp per transaction"
    );
}

#[test]
fn pgbench_tpcb_in_all_three_modes_captures_exactly_what_it_committed() {
    let r = Region::prepare("cap_pgbench", "", &[]).0;
    let direct_url = format!(
        "postgresql:///{}?host={}&port={}&user={}",
        r.db,
        pg().socket_dir().display(),
        pg().port,
        REGION_APP
    );
    pgbench(&direct_url, &["-i", "-s", "1", "-q"]);
    std::fs::write(
        r.config.parent().unwrap().join("rules/pgbench.toml"),
        "[[table]]\nname = \"public.pgbench_history\"\ninsert_only = true\n",
    )
    .unwrap();
    let out = r.migrate();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut r = r;
    r.proxy = Some(Proxy::start_with_config(&r.config));
    let url = r.url();
    r.captured();
    // pgbench -i ran straight against Postgres after migrate: its DDL was
    // captured as schema changes, and the rows it loaded before adding the
    // keys were captured as inserts when each key came.
    assert_eq!(
        r.query("SELECT string_agg(format('%s %s', tbl, n), ', ' ORDER BY tbl) FROM (SELECT tbl, count(*) AS n FROM meridian.change WHERE op <> 'S' GROUP BY tbl) x"),
        ["public.pgbench_accounts 100000, public.pgbench_branches 1, public.pgbench_tellers 10"]
    );
    assert!(r.query("SELECT count(*) FROM meridian.change WHERE op = 'S'")[0] != "0");
    for mode in ["simple", "extended", "prepared"] {
        let before: u64 = r.query("SELECT count(*) FROM meridian.change")[0]
            .parse()
            .unwrap();
        let out = pgbench(&url, &["-M", mode, "-c", "4", "-j", "2", "-t", "25", "-n"]);
        let processed: u64 = out
            .lines()
            .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
            .and_then(|v| v.split('/').next())
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no transaction count in: {out}"));
        assert_eq!(processed, 100, "{out}");
        r.captured();
        let after: u64 = r.query("SELECT count(*) FROM meridian.change")[0]
            .parse()
            .unwrap();
        // Per TPC-B-like transaction: 3 updates and 1 history insert.
        assert_eq!(after - before, 4 * processed, "mode {mode}");
    }
    // Each pgbench transaction (one history row each) has its own stamp,
    // shared by its four changes.
    assert_eq!(
        r.query("SELECT count(*) || ' ' || count(DISTINCT tx_hlc) FROM meridian.change WHERE tbl = 'public.pgbench_history'"),
        ["300 300"]
    );
    assert_eq!(
        r.query("SELECT count(*) FROM (SELECT tx_hlc FROM meridian.change
                  WHERE tx_hlc IN (SELECT tx_hlc FROM meridian.change WHERE tbl = 'public.pgbench_history')
                  GROUP BY tx_hlc HAVING count(*) <> 4) x"),
        ["0"],
        "every transaction has its own stamp"
    );
}

#[test]
fn psycopg_pipeline_and_asyncpg_writes_are_captured_with_one_stamp_per_transaction() {
    let r = Region::start(
        "cap_python",
        "CREATE TABLE notes (id int PRIMARY KEY, body text, n int NOT NULL DEFAULT 0);",
        &[],
    );
    let out = run_python("capture_writes.py", &r.url());
    assert!(out.contains("ok"), "{out}");
    r.captured();
    // psycopg: 20 inserts in an autocommit pipeline, a transaction of an
    // insert and an update in a pipeline; asyncpg: executemany of 25 rows in
    // one transaction, then 10 single updates.
    let txs: HashMap<String, String> = r
        .query("SELECT format('%s=%s', tx_hlc, count(*)) FROM meridian.change GROUP BY tx_hlc")
        .into_iter()
        .map(|l| {
            let (a, b) = l.split_once('=').unwrap();
            (a.to_string(), b.to_string())
        })
        .collect();
    assert_eq!(
        r.query("SELECT count(*) FROM meridian.change WHERE tbl = 'public.notes'"),
        ["57"]
    );
    // asyncpg's executemany ran in one transaction and its 10 updates in 10.
    assert!(txs.values().any(|n| n == "25"), "{txs:?}");
    // At least: the pipeline, the psycopg transaction, executemany, 10 updates.
    assert!(txs.len() >= 13, "{txs:?}");
}

#[test]
fn tables_created_through_the_proxy_get_capture_and_keys_are_region_disjoint() {
    let r = Region::start("cap_ddl", "", &[]);
    let url = r.url();
    let (_, stderr) = psql(
        &url,
        &[],
        Some(
            "CREATE TABLE orders (id bigserial PRIMARY KEY, what text);
             CREATE TABLE tickets (id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY, what text);
             CREATE TABLE loose (what text);
             INSERT INTO orders (what) VALUES ('a'), ('b');
             INSERT INTO tickets (what) VALUES ('a'), ('b');
             INSERT INTO loose VALUES ('not captured yet');
             ALTER TABLE loose ADD COLUMN id serial PRIMARY KEY;
             INSERT INTO loose (what) VALUES ('captured');",
        ),
    );
    assert!(
        stderr.contains("public.loose") && stderr.contains("primary key"),
        "a NOTICE names the table without a key: {stderr}"
    );
    r.captured();
    // loose's first row was written before it had a key: it is captured
    // when the key comes, so it is not left behind in this region.
    assert_eq!(
        r.query("SELECT \"table\" || ' ' || count(*) FROM meridian.changes WHERE operation <> 'schema' GROUP BY \"table\" ORDER BY 1"),
        ["public.loose 2", "public.orders 2", "public.tickets 2"]
    );
    // Region id 3, stride 64: every generated key is 3 modulo 64.
    for t in ["orders", "tickets"] {
        assert_eq!(
            r.query(&format!("SELECT DISTINCT id % 64 FROM {t}")),
            ["3"],
            "{t}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_in_an_aborted_transaction_gets_the_usual_error_and_the_session_survives() {
    let r = Region::start("cap_aborted", ITEMS, &[]);
    let client = r.client().await;
    let insert = client
        .prepare("INSERT INTO items VALUES ($1, 'x')")
        .await
        .unwrap();
    client.batch_execute("BEGIN").await.unwrap();
    assert!(client.batch_execute("SELECT 1/0").await.is_err());
    // Simple protocol: the statement gets 25P02, as from Postgres.
    let err = client
        .batch_execute("INSERT INTO items VALUES (1, 'x')")
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::IN_FAILED_SQL_TRANSACTION),
        "{err}"
    );
    // Extended protocol: the client's Bind fails first; Postgres skips the rest.
    let err = client.execute(&insert, &[&1i32]).await.unwrap_err();
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::IN_FAILED_SQL_TRANSACTION),
        "{err}"
    );
    client.batch_execute("ROLLBACK").await.unwrap();
    client.execute(&insert, &[&2i32]).await.unwrap();
    tokio::task::block_in_place(|| r.captured());
    assert_eq!(
        r.query("SELECT key->>'id' FROM meridian.changes"),
        ["2"],
        "{}",
        r.proxy().log()
    );
}

/// pgJDBC, postgres.js and psycopg's pipeline mode send ROLLBACK, COMMIT and
/// ROLLBACK TO SAVEPOINT after an error as Parse/Bind/Execute/Sync: Postgres
/// answers them as usual, and so must the proxy (nothing injected in front).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_control_after_an_error_in_the_extended_protocol_works_as_on_postgres() {
    let r = Region::start("cap_control", ITEMS, &[]);
    let client = r.client().await;
    for control in ["ROLLBACK", "COMMIT", "ABORT"] {
        client.execute("BEGIN", &[]).await.unwrap();
        client
            .execute("INSERT INTO items VALUES (10, 'rolled back')", &[])
            .await
            .unwrap();
        assert!(client.execute("SELECT 1/0", &[]).await.is_err());
        client
            .execute(control, &[])
            .await
            .unwrap_or_else(|e| panic!("{control} after an error: {e}"));
    }
    // Prepared (named) once and reused, as pgJDBC does after prepareThreshold.
    let rollback = client.prepare("ROLLBACK").await.unwrap();
    for _ in 0..2 {
        client.execute("BEGIN", &[]).await.unwrap();
        assert!(client.execute("SELECT 1/0", &[]).await.is_err());
        client.execute(&rollback, &[]).await.unwrap();
    }
    client.execute("BEGIN", &[]).await.unwrap();
    client
        .execute("INSERT INTO items VALUES (11, 'kept')", &[])
        .await
        .unwrap();
    client.execute("SAVEPOINT s", &[]).await.unwrap();
    assert!(client
        .execute("INSERT INTO items VALUES (11, 'duplicate')", &[])
        .await
        .is_err());
    client
        .execute("ROLLBACK TO SAVEPOINT s", &[])
        .await
        .unwrap();
    client
        .execute("INSERT INTO items VALUES (12, 'after the savepoint')", &[])
        .await
        .unwrap();
    client.execute("COMMIT", &[]).await.unwrap();
    tokio::task::block_in_place(|| r.captured());
    assert_eq!(
        r.query("SELECT string_agg(key->>'id', ',' ORDER BY seq) FROM meridian.changes"),
        ["11,12"],
        "{}",
        r.proxy().log()
    );
}

/// meridian is killed (SIGKILL) again and again while transactions commit,
/// one of them large enough to be recorded in parts: after the last restart
/// every committed change is recorded exactly once (capture's progress is
/// written with the changes, and the slot resends what came after it).
#[test]
fn killing_meridian_at_any_point_loses_no_committed_change_and_records_none_twice() {
    let mut r = Region::start("cap_crash", ITEMS, &[]);
    let direct = r.direct();
    let writer = std::thread::spawn(move || {
        let mut script = String::new();
        for i in 0..300 {
            script.push_str(&format!("INSERT INTO items VALUES ({i}, 'small');\n"));
            if i == 150 {
                script.push_str(
                    "INSERT INTO items SELECT g, 'large' FROM generate_series(1000, 13000) g;\n",
                );
            }
            script.push_str("SELECT pg_sleep(0.01);\n");
        }
        psql(&direct, &["-v", "ON_ERROR_STOP=1", "-q"], Some(&script));
    });
    for k in 0..8u64 {
        std::thread::sleep(Duration::from_millis(150 + (k * 173) % 400));
        r.proxy.take(); // SIGKILL
        r.proxy = Some(Proxy::start_with_config(&r.config));
    }
    writer.join().unwrap();
    r.captured();
    assert_eq!(
        r.query("SELECT count(*) || ' ' || count(DISTINCT key) FROM meridian.changes WHERE \"table\" = 'public.items'"),
        ["12301 12301"]
    );
    assert_eq!(r.query("SELECT count(*) FROM items"), ["12301"]);
}
