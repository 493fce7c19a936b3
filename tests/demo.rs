//! `meridian demo` as a new user runs it: the binary, its printed lines,
//! real clients against every region, and a clean stop on SIGINT/SIGTERM.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use support::*;

#[test]
fn demo_runs_three_regions_serves_real_clients_and_cleans_up_on_sigint() {
    let dir = scratch_dir("demo");
    let data = dir.join("cluster");
    let schema = dir.join("schema.sql");
    std::fs::write(
        &schema,
        "CREATE TABLE accounts (id bigint PRIMARY KEY, owner text, balance numeric);\n",
    )
    .unwrap();
    let mut demo = start_demo(
        3,
        &[
            "--schema",
            schema.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
        ],
    );
    let names: Vec<&str> = demo.regions.iter().map(|r| r.0.as_str()).collect();
    assert_eq!(names, ["us-east", "eu-west", "ap-south"]);
    for (name, url, admin) in &demo.regions {
        let (out, _) = psql(
            url,
            &[
                "-At",
                "-c",
                "SELECT count(*) FROM accounts",
                "-c",
                "\\conninfo",
            ],
            None,
        );
        assert!(
            out.starts_with("0\n"),
            "{name}: the schema was applied: {out}"
        );
        let health = http_get(admin.strip_prefix("http://").unwrap(), "/health");
        assert!(
            health.starts_with("HTTP/1.0 200") && health.ends_with("ok\n"),
            "{name}: health: {health}"
        );
        assert!(data.join(name).join("data").is_dir());
    }
    // pgbench through the first region, in every query mode.
    let url = &demo.regions[0].1;
    pgbench(url, &["-i", "-q", "-s", "1"]);
    for mode in ["simple", "extended", "prepared"] {
        let out = pgbench(
            url,
            &["-S", "-M", mode, "-c", "8", "-j", "2", "-t", "50", "-n"],
        );
        assert!(
            out.contains("number of failed transactions: 0 (0.000%)"),
            "{out}"
        );
    }
    let out = run_python("psycopg_client.py", &demo.regions[1].1);
    assert!(out.contains("psycopg ok"));
    let status = demo.stop(libc::SIGINT);
    assert!(status.success(), "demo exits 0 on SIGINT: {status}");
    for (name, _, _) in [
        ("us-east", (), ()),
        ("eu-west", (), ()),
        ("ap-south", (), ()),
    ] {
        assert!(!data.join(name).exists(), "{name}'s files were removed");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn demo_keeps_its_files_with_keep_and_stops_on_sigterm() {
    let dir = scratch_dir("demo-keep");
    let data = dir.join("cluster");
    let mut demo = start_demo(
        1,
        &[
            "--data",
            data.to_str().unwrap(),
            "--keep",
            "--latency",
            "30ms",
            "--jitter",
            "5ms",
        ],
    );
    let (out, _) = psql(&demo.regions[0].1, &["-At", "-c", "SELECT 1"], None);
    assert_eq!(out.trim(), "1");
    assert!(demo.stop(libc::SIGTERM).success());
    assert!(
        data.join("us-east")
            .join("data")
            .join("PG_VERSION")
            .is_file(),
        "kept"
    );
    assert!(
        Path::new(&data.join("us-east.toml")).is_file(),
        "the region's config is kept for `meridian check`"
    );
    let check = Command::new(env!("CARGO_BIN_EXE_meridian"))
        .args(["check", "--config"])
        .arg(data.join("us-east.toml"))
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn demo_refuses_bad_flags_clearly() {
    let out = Command::new(env!("CARGO_BIN_EXE_meridian"))
        .args(["demo", "--regions", "0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--regions must be between 1 and 8"));
    let out = Command::new(env!("CARGO_BIN_EXE_meridian"))
        .args(["demo", "--rules", "/nonexistent/rules"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("--rules /nonexistent/rules: directory does not exist"));
}

/// Writes through one region reach the others over the demo's emulated
/// links; a partitioned region catches up once healed.
#[test]
fn demo_replicates_between_regions_and_heals_after_a_partition() {
    let dir = scratch_dir("demo-rep");
    let schema = dir.join("schema.sql");
    std::fs::write(
        &schema,
        "CREATE TABLE notes (id int PRIMARY KEY, body text);",
    )
    .unwrap();
    let mut demo = start_demo(
        3,
        &[
            "--schema",
            schema.to_str().unwrap(),
            "--latency",
            "20ms",
            "--jitter",
            "5ms",
        ],
    );
    let urls: Vec<String> = demo.regions.iter().map(|r| r.1.clone()).collect();
    let count = |url: &str| {
        let (out, _) = psql(url, &["-At", "-c", "SELECT count(*) FROM notes"], None);
        out.trim().to_string()
    };
    psql(
        &urls[0],
        &["-c", "INSERT INTO notes VALUES (1, 'from us-east')"],
        None,
    );
    psql(
        &urls[1],
        &["-c", "INSERT INTO notes VALUES (2, 'from eu-west')"],
        None,
    );
    for url in &urls {
        eventually("rows reach every region", Duration::from_secs(30), || {
            count(url) == "2"
        });
    }
    // The control API: admin of the first region is P+1000, links are at P+3000.
    let admin_port: u16 = demo.regions[0]
        .2
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let control = format!("127.0.0.1:{}", admin_port + 2000);
    let third = demo.regions[2].0.clone();
    let cut = http(&control, "POST", &format!("/partition?region={third}"));
    assert!(cut.starts_with("HTTP/1.0 200"), "{cut}");
    psql(
        &urls[0],
        &["-c", "INSERT INTO notes VALUES (3, 'during the partition')"],
        None,
    );
    eventually(
        "the connected region gets it",
        Duration::from_secs(30),
        || count(&urls[1]) == "3",
    );
    let healed = http(&control, "POST", &format!("/heal?region={third}"));
    assert!(healed.starts_with("HTTP/1.0 200"), "{healed}");
    eventually(
        "the healed region catches up",
        Duration::from_secs(30),
        || count(&urls[2]) == "3",
    );
    // One link, both directions: A-C cut, A-B and B-C up.
    let first = demo.regions[0].0.clone();
    let second = demo.regions[1].0.clone();
    let cut = http(&control, "POST", &format!("/cut?from={first}&to={third}"));
    assert!(cut.starts_with("HTTP/1.0 200"), "{cut}");
    let links = http(&control, "GET", "/links");
    let body = &links[links.find("\r\n\r\n").unwrap() + 4..];
    let links: serde_json::Value = serde_json::from_str(body).unwrap();
    for l in links.as_array().unwrap() {
        let pair = [l["from"].as_str().unwrap(), l["to"].as_str().unwrap()];
        let between = pair.contains(&first.as_str()) && pair.contains(&third.as_str());
        assert_eq!(l["partitioned"], between, "{l}");
    }
    for bad in [
        format!("/cut?from={first}&to=nowhere"),
        format!("/cut?from={first}&to={first}"),
        format!("/cut?region={first}&to={second}"),
        "/heal?region=nowhere".to_string(),
    ] {
        let refused = http(&control, "POST", &bad);
        assert!(refused.starts_with("HTTP/1.0 400"), "{bad}: {refused}");
    }
    psql(
        &urls[0],
        &["-c", "INSERT INTO notes VALUES (4, 'with one link cut')"],
        None,
    );
    let written = std::time::Instant::now();
    eventually(
        "the region behind an open link gets it",
        Duration::from_secs(30),
        || count(&urls[1]) == "4",
    );
    // The cut-off region gets it through the other one while its own link
    // to the origin is still cut.
    eventually(
        "the region behind the cut link gets it relayed",
        Duration::from_secs(30),
        || count(&urls[2]) == "4",
    );
    eprintln!(
        "relayed to the cut-off region {} ms after the commit",
        written.elapsed().as_millis()
    );
    let links = http(&control, "GET", "/links");
    assert!(links.contains("\"partitioned\":true"), "still cut: {links}");
    let second_admin = demo.regions[1].2.rsplit(':').next().unwrap();
    let status = http(&format!("127.0.0.1:{second_admin}"), "GET", "/status");
    let relayed = status
        .split("\"changes_relayed\":")
        .nth(1)
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse::<u64>().ok());
    assert!(relayed.is_some_and(|n| n >= 1), "{status}");
    let healed = http(&control, "POST", &format!("/heal?from={third}&to={first}"));
    assert!(healed.starts_with("HTTP/1.0 200"), "{healed}");
    psql(
        &urls[0],
        &["-c", "INSERT INTO notes VALUES (5, 'after the heal')"],
        None,
    );
    eventually(
        "every region has everything after the link heals",
        Duration::from_secs(30),
        || count(&urls[2]) == "5" && count(&urls[1]) == "5",
    );
    assert!(demo.stop(libc::SIGINT).success());
    std::fs::remove_dir_all(dir).unwrap();
}

/// The shipped example rules, through `meridian demo --rules`: three regions
/// writing at once over 20 ms links, with regions cut off to force conflicts.
#[test]
fn demo_with_the_example_rules_merges_concurrent_writes_in_three_regions() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("conflict-rules/examples");
    let demo = start_demo(
        3,
        &[
            "--schema",
            root.join("shop.sql").to_str().unwrap(),
            "--rules",
            root.to_str().unwrap(),
            "--latency",
            "20ms",
            "--jitter",
            "5ms",
        ],
    );
    let names: Vec<String> = demo.regions.iter().map(|r| r.0.clone()).collect();
    let urls: Vec<String> = demo.regions.iter().map(|r| r.1.clone()).collect();
    let admin_port: u16 = demo.regions[0]
        .2
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let control = format!("127.0.0.1:{}", admin_port + 2000);
    let query = |url: &str, sql: &str| {
        let (out, _) = psql(url, &["-At", "-c", sql], None);
        out.trim().to_string()
    };
    let everywhere = |what: &str, sql: &str, want: &str| {
        eventually_value(
            what,
            Duration::from_secs(60),
            || urls.iter().map(|u| query(u, sql)).collect::<Vec<_>>(),
            |got| got.iter().all(|g| g == want),
        );
    };
    psql(
        &urls[0],
        &[],
        Some(
            "INSERT INTO stock VALUES (1, 100);
             INSERT INTO orders VALUES (1, 'created', 0, 'new');
             INSERT INTO prices VALUES (1, 10);",
        ),
    );
    everywhere(
        "seed rows",
        "SELECT count(*) FROM stock NATURAL JOIN prices",
        "1",
    );
    everywhere("seed order", "SELECT status FROM orders", "created");

    // Counters: 3 regions x 30 concurrent single-row transactions.
    let writers: Vec<_> = urls
        .iter()
        .enumerate()
        .map(|(i, url)| {
            let (url, step) = (url.clone(), i + 1);
            std::thread::spawn(move || {
                let script: String = (0..30)
                    .map(|_| {
                        format!("UPDATE stock SET quantity = quantity + {step} WHERE item = 1;\n")
                    })
                    .collect();
                psql(&url, &["-v", "ON_ERROR_STOP=1", "-q"], Some(&script));
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    everywhere(
        "every increment counts once everywhere",
        "SELECT quantity FROM stock",
        &(100 + 30 * (1 + 2 + 3)).to_string(),
    );

    // Cut ap-south and eu-west off (each from everyone), write the same rows
    // in all three, then heal.
    for n in &names[1..] {
        let cut = http(&control, "POST", &format!("/partition?region={n}"));
        assert!(cut.starts_with("HTTP/1.0 200"), "{cut}");
    }
    psql(
        &urls[0],
        &[],
        Some(
            "UPDATE orders SET status = 'shipped', paid = paid + 10, note = 'us' WHERE id = 1;
             UPDATE prices SET price = 11 WHERE item = 1;
             INSERT INTO customers VALUES (7, 'first, from us-east');
             INSERT INTO customers VALUES (8, 'ann, from us-east', 'ann@example.com');",
        ),
    );
    std::thread::sleep(Duration::from_millis(20));
    psql(
        &urls[1],
        &[],
        Some(
            "UPDATE orders SET status = 'paid', paid = paid + 5, address = '1 rue Eu' WHERE id = 1;
             UPDATE prices SET price = 12 WHERE item = 1;
             INSERT INTO customers VALUES (7, 'second, from eu-west');
             INSERT INTO customers VALUES (9, 'ann, from eu-west', 'ann@example.com');",
        ),
    );
    psql(
        &urls[2],
        &["-c", "UPDATE prices SET price = 13 WHERE item = 1"],
        None,
    );
    for n in &names[1..] {
        http(&control, "POST", &format!("/heal?region={n}"));
    }
    // Ordered state: furthest; counter: both payments; the rest: last writer.
    // Concurrent edits of different columns: us-east's note and eu-west's
    // address both survive.
    everywhere(
        "the order merges",
        "SELECT format('%s %s %s %s', status, paid, note, address) FROM orders",
        "shipped 15 us 1 rue Eu",
    );
    // A unique e-mail created in two regions: the first customer keeps it
    // everywhere; the other is gone and logged in every region.
    everywhere(
        "one customer with the e-mail",
        "SELECT string_agg(format('%s %s', id, name), ',') FROM customers WHERE email IS NOT NULL",
        "8 ann, from us-east",
    );
    everywhere(
        "the unique collision logged",
        "SELECT count(*) FROM meridian.conflict WHERE rule = 'unique public.customers_email_key'",
        "1",
    );
    // Region priority: eu-west's price, although ap-south wrote last.
    everywhere("eu-west's price stays", "SELECT price FROM prices", "12");
    // First writer wins: us-east created the customer first.
    everywhere(
        "the first customer stays",
        "SELECT name FROM customers WHERE id = 7",
        "first, from us-east",
    );
    // Every region logged conflicts, readable with SQL through the proxy.
    for url in &urls {
        let n: u64 = query(url, "SELECT count(*) FROM meridian.conflict")
            .parse()
            .unwrap();
        assert!(n > 0, "{url}: no conflicts logged");
    }
    assert_eq!(
        query(
            &urls[1],
            "SELECT rule FROM meridian.conflict WHERE tbl = 'public.prices' LIMIT 1"
        ),
        "region-priority"
    );
    drop(demo);
}

/// Rules for tables that do not exist yet (pgbench's), then `pgbench -i`
/// (tables created without keys, loaded, keys added last) and the TPC-B-like
/// script through one region: every region ends with the same rows and the
/// counters add up exactly (sum of balances = sum of history deltas).
#[test]
fn demo_with_rules_for_pgbench_tables_created_later_ends_exact_everywhere() {
    let rules = Path::new(env!("CARGO_MANIFEST_DIR")).join("conflict-rules/pgbench");
    let demo = start_demo(2, &["--rules", rules.to_str().unwrap(), "--latency", "5ms"]);
    let urls: Vec<String> = demo.regions.iter().map(|r| r.1.clone()).collect();
    pgbench(&urls[0], &["-i", "-s", "1", "-q"]);
    let out = pgbench(&urls[0], &["-n", "-c", "4", "-j", "2", "-t", "100"]);
    assert!(out.contains("processed: 400/400"), "{out}");
    let totals = "SELECT format('%s %s %s %s %s %s', (SELECT count(*) FROM pgbench_accounts),
                         (SELECT sum(abalance) FROM pgbench_accounts), (SELECT sum(bbalance) FROM pgbench_branches),
                         (SELECT sum(tbalance) FROM pgbench_tellers), (SELECT count(*) FROM pgbench_history),
                         (SELECT sum(delta) FROM pgbench_history))";
    let query = |url: &str| psql(url, &["-At", "-c", totals], None).0.trim().to_string();
    let here = query(&urls[0]);
    let parts: Vec<&str> = here.split(' ').collect();
    assert_eq!(parts[0], "100000", "{here}");
    assert!(
        parts[1..4]
            .iter()
            .chain([&parts[5]])
            .all(|p| *p == parts[1]),
        "{here}"
    );
    assert_eq!(parts[4], "400", "{here}");
    eventually_value(
        "every region has the same rows and totals",
        Duration::from_secs(120),
        || urls.iter().map(|u| query(u)).collect::<Vec<_>>(),
        |got| got.iter().all(|g| *g == here),
    );
    let digest = "SELECT md5(string_agg(format('%s %s', aid, abalance), ',' ORDER BY aid)) FROM pgbench_accounts";
    let digests: Vec<String> = urls
        .iter()
        .map(|u| psql(u, &["-At", "-c", digest], None).0)
        .collect();
    assert_eq!(digests[0], digests[1]);
}
