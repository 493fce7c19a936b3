//! Capture survives PostgreSQL crashing under it: a backend or the
//! postmaster itself killed with SIGKILL. A test binary of its own: the
//! crashes end every session of its server, which other tests would feel.

mod support;

use std::process::Command;
use std::time::Duration;

use support::*;
use tokio_postgres::NoTls;

const ITEMS: &str = "CREATE TABLE items (id int PRIMARY KEY, v text);";

/// Connects, retrying while the server recovers from a crash.
async fn connect(url: &str) -> tokio_postgres::Client {
    loop {
        if let Ok((client, conn)) = tokio_postgres::connect(url, NoTls).await {
            tokio::spawn(conn);
            if client.simple_query("SELECT 1").await.is_ok() {
                return client;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// SIGKILL of one Postgres process. Of a backend: the postmaster then ends
/// every session and recovers from the WAL, as after a crash of the whole
/// server. Of the postmaster itself: its sessions end, and the harness
/// starts it again on the same data, which recovers from the WAL.
/// Returns whether a process was killed.
async fn kill_one(url: &str, round: usize) -> bool {
    // In turn: the capture stream's walsender, a session of meridian (the
    // capture writer among them), a client's backend, and the postmaster.
    let filter = match round % 4 {
        0 => "application_name = 'meridian capture'",
        1 => "application_name = 'meridian' AND backend_type = 'client backend'",
        2 => "application_name = 'crash writer'",
        _ => {
            let restarted = tokio::task::spawn_blocking(|| pg().crash_and_restart()).await;
            if let Err(e) = restarted.unwrap() {
                panic!("PostgreSQL did not come back after its postmaster was killed: {e}");
            }
            return true;
        }
    };
    let client = connect(url).await;
    let rows = client
        .query(
            &format!("SELECT pid FROM pg_stat_activity WHERE {filter} ORDER BY random() LIMIT 1"),
            &[],
        )
        .await
        .unwrap_or_default();
    rows.first().is_some_and(|row| {
        let pid: i32 = row.get(0);
        Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status()
            .is_ok_and(|s| s.success())
    })
}

#[test]
fn postgres_crashing_at_any_point_loses_no_committed_change_and_records_none_twice() {
    let r = Region::start("crash_pg", ITEMS, &[]);
    // Commits acknowledged must survive a crash (the shared test server
    // runs with synchronous_commit off).
    let url = format!(
        "{} application_name='crash writer' options='-c synchronous_commit=on'",
        r.direct()
    );
    let admin_url = r.direct();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let writer = tokio::spawn(async move {
            let mut client = connect(&url).await;
            let mut failed = 0;
            for i in 0..400 {
                // The large transaction is retried until it commits (a crash
                // may roll it back; ON CONFLICT makes a retry after an
                // unanswered commit harmless).
                let (sql, until_done) = if i == 200 {
                    ("INSERT INTO items SELECT g, 'large' FROM generate_series(1000, 13000) g ON CONFLICT DO NOTHING".to_string(), true)
                } else {
                    (format!("INSERT INTO items VALUES ({i}, 'small')"), false)
                };
                // An error leaves it unknown whether the row committed; the
                // table says afterwards, and capture must agree with it.
                while client.batch_execute(&sql).await.is_err() {
                    failed += 1;
                    client = connect(&url).await;
                    if !until_done {
                        break;
                    }
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            failed
        });
        let mut killed = 0;
        for round in 0..8 {
            tokio::time::sleep(Duration::from_millis(300 + (round as u64 * 211) % 500)).await;
            killed += usize::from(kill_one(&admin_url, round).await);
        }
        let failed = writer.await.unwrap();
        assert!(
            killed >= 6 && failed >= 2,
            "{killed} kills, {failed} failed writes"
        );
        connect(&admin_url).await;
    });
    r.captured();
    let rows = r.query("SELECT count(*) FROM items");
    assert!(rows[0].parse::<i64>().unwrap() > 12_000, "{rows:?}");
    assert_eq!(
        r.query("SELECT count(*) || ' ' || count(DISTINCT key) FROM meridian.changes WHERE \"table\" = 'public.items'"),
        [format!("{0} {0}", rows[0])],
        "every committed row captured once"
    );
    assert_eq!(
        r.query(
            "SELECT count(*) FROM items i WHERE NOT EXISTS (SELECT 1 FROM meridian.change c
              WHERE c.tbl = 'public.items' AND (c.pk ->> 'id')::int = i.id)"
        ),
        ["0"],
        "and it is the committed rows that were captured"
    );
}
