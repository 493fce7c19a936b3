//! `meridian verify --config FILE`: are all regions' replicated tables
//! identical? Compares every table this region captures, in this region's
//! database and in each peer's (`replication.peers[].postgres`):
//!
//! 1. per table, each region's rows are hashed into 1024 buckets by key
//!    (primary key; the whole row for tables without one), and each bucket
//!    summarised by its row count and the sum of its rows' hashes. All
//!    regions are read at once, so a quiet table is compared as of one
//!    moment;
//! 2. buckets whose summaries differ are read key by key, which names the
//!    keys that differ (missing in a region, or with other values);
//! 3. on a live cluster a key may differ only because a change is still on
//!    its way: differing keys are read again every half second until they
//!    agree or `settle` has passed. What still differs is reported.
//!
//! Rows are compared as `to_jsonb(row)::text`, so every region needs the
//! same columns (DDL replicates; a column added in one region only shows as
//! a difference in every row).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use tokio_postgres::{Client, NoTls};

use crate::capture;
use crate::config::Config;

/// Buckets per table (a power of two: the key hash is masked).
const BUCKETS: i64 = 1024;

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("replication.peers[{index}].postgres is not set: meridian verify needs a connection string for each peer's database (peer {name})")]
    NoPeerDatabase { index: usize, name: String },
    #[error("cannot connect to {region}'s database: {source}")]
    Connect {
        region: String,
        source: tokio_postgres::Error,
    },
    #[error("{region}: {context}: {source}")]
    Query {
        region: String,
        context: String,
        source: tokio_postgres::Error,
    },
    #[error(transparent)]
    Capture(#[from] capture::CaptureError),
}

/// One key whose row is not the same in every region.
#[derive(Debug, Clone, PartialEq)]
pub struct Difference {
    pub table: String,
    /// The key as a JSON object of the primary key's columns (the whole row
    /// for tables without a key).
    pub key: String,
    /// Per region (in [`Report::regions`] order): the row as JSON text, or
    /// None where the key is missing.
    pub rows: Vec<Option<String>>,
}

#[derive(Debug, Clone, Default)]
pub struct Report {
    pub regions: Vec<String>,
    pub tables: Vec<(String, Vec<i64>)>,
    pub differences: Vec<Difference>,
}

impl Report {
    pub fn identical(&self) -> bool {
        self.differences.is_empty()
    }

    /// The report as text for a person.
    pub fn render(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        for (table, counts) in &self.tables {
            let counts: Vec<String> = self
                .regions
                .iter()
                .zip(counts)
                .map(|(r, n)| format!("{r} {n}"))
                .collect();
            let _ = writeln!(out, "{table}: {} rows", counts.join(", "));
        }
        for d in &self.differences {
            let _ = writeln!(out, "DIFFERS {} key {}:", d.table, d.key);
            for (region, row) in self.regions.iter().zip(&d.rows) {
                let _ = writeln!(
                    out,
                    "    {region:<16} {}",
                    row.as_deref().unwrap_or("(missing)")
                );
            }
        }
        let _ = writeln!(
            out,
            "{}: {} table(s) in {} region(s), {} key(s) differ",
            if self.identical() {
                "identical"
            } else {
                "NOT identical"
            },
            self.tables.len(),
            self.regions.len(),
            self.differences.len()
        );
        out
    }
}

struct Region {
    name: String,
    client: Client,
}

/// Compares every replicated table across this region and its peers.
/// `progress` gets a line per step (the CLI prints them on stderr).
pub async fn verify(
    config: &Config,
    settle: Duration,
    mut progress: impl FnMut(&str),
) -> Result<Report, VerifyError> {
    let mut regions = vec![Region {
        name: config.region.name.clone(),
        client: capture::connect(config).await?,
    }];
    for (index, p) in config.replication.peers.iter().enumerate() {
        let conninfo = p
            .postgres
            .as_ref()
            .ok_or_else(|| VerifyError::NoPeerDatabase {
                index,
                name: p.name.clone(),
            })?;
        let (client, conn) = tokio_postgres::connect(conninfo, NoTls)
            .await
            .map_err(|source| VerifyError::Connect {
                region: p.name.clone(),
                source,
            })?;
        tokio::spawn(conn);
        regions.push(Region {
            name: p.name.clone(),
            client,
        });
    }
    let local = &regions[0];
    let tables: Vec<String> = local
        .client
        .query(
            "SELECT tbl FROM meridian.replicated_table
              WHERE captured AND to_regclass(tbl) IS NOT NULL ORDER BY tbl",
            &[],
        )
        .await
        .map_err(query(&local.name, "listing replicated tables"))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut report = Report {
        regions: regions.iter().map(|r| r.name.clone()).collect(),
        ..Report::default()
    };
    for (i, table) in tables.iter().enumerate() {
        // A table created here may not have reached every region yet.
        let deadline = Instant::now() + settle;
        let missing = loop {
            let mut missing = Vec::new();
            for r in &regions {
                let exists: bool = r
                    .client
                    .query_one("SELECT to_regclass($1) IS NOT NULL", &[table])
                    .await
                    .map_err(query(&r.name, format!("looking for {table}")))?
                    .get(0);
                missing.push(!exists);
            }
            if !missing.contains(&true) || Instant::now() >= deadline {
                break missing;
            }
            progress(&format!(
                "verify: {table} is not in every region yet; waiting"
            ));
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        if missing.contains(&true) {
            progress(&format!(
                "verify: [{}/{}] {table}: missing in some region",
                i + 1,
                tables.len()
            ));
            report.tables.push((table.clone(), vec![0; regions.len()]));
            report.differences.push(Difference {
                table: table.clone(),
                key: "(the whole table)".into(),
                rows: missing
                    .iter()
                    .map(|&m| (!m).then(|| "(table exists)".to_string()))
                    .collect(),
            });
            continue;
        }
        let key = primary_key(&local.client, table)
            .await
            .map_err(query(&local.name, format!("reading the key of {table}")))?;
        // Keyed tables: one row per key. Without a key, identical rows are
        // one entry, with their number of copies.
        let rows = match key {
            Some(cols) => format!(
                "SELECT jsonb_build_object({cols})::text AS k, to_jsonb(t)::text AS r FROM {table} t"
            ),
            None => format!(
                "SELECT to_jsonb(t)::text AS k, to_jsonb(t)::text || ' (' || count(*) || ' copies)' AS r
                   FROM {table} t GROUP BY to_jsonb(t)"
            ),
        };
        // 1. Bucket summaries, read in every region at once.
        let summary = format!(
            "SELECT hashtextextended(k, 0) & {mask} AS b, count(*), sum(hashtextextended(r, 1)::numeric)::text
               FROM ({rows}) x GROUP BY 1",
            mask = BUCKETS - 1
        );
        let summaries = futures_util::future::join_all(regions.iter().map(|r| async {
            r.client
                .query(&summary, &[])
                .await
                .map_err(query(&r.name, format!("summarising {table}")))
        }))
        .await;
        let mut per_region: Vec<BTreeMap<i64, (i64, String)>> = Vec::new();
        for s in summaries {
            per_region.push(
                s?.iter()
                    .map(|r| (r.get(0), (r.get(1), r.get(2))))
                    .collect(),
            );
        }
        let counts: Vec<i64> = per_region
            .iter()
            .map(|m| m.values().map(|(n, _)| n).sum())
            .collect();
        let all_buckets: BTreeSet<i64> =
            per_region.iter().flat_map(|m| m.keys().copied()).collect();
        let differing: Vec<i64> = all_buckets
            .into_iter()
            .filter(|b| {
                let first = per_region[0].get(b);
                per_region[1..].iter().any(|m| m.get(b) != first)
            })
            .collect();
        progress(&format!(
            "verify: [{}/{}] {table}: {} rows here, {} of {BUCKETS} buckets differ",
            i + 1,
            tables.len(),
            counts[0],
            differing.len()
        ));
        if differing.is_empty() {
            report.tables.push((table.clone(), counts));
            continue;
        }
        // 2. The keys of the differing buckets.
        let in_buckets = format!(
            "SELECT k, r FROM ({rows}) x WHERE hashtextextended(k, 0) & {mask} = ANY($1)",
            mask = BUCKETS - 1
        );
        let mut suspects = read_keys(&regions, &in_buckets, &differing, table).await?;
        // 3. Settle: read the suspects again until they agree or time is up.
        let by_key = format!("SELECT k, r FROM ({rows}) x WHERE k = ANY($1)");
        let deadline = Instant::now() + settle;
        while !suspects.is_empty() && Instant::now() < deadline {
            progress(&format!(
                "verify: {table}: {} key(s) differ; reading them again (changes may be in flight)",
                suspects.len()
            ));
            tokio::time::sleep(Duration::from_millis(500)).await;
            let keys: Vec<String> = suspects.keys().cloned().collect();
            suspects = read_keys(&regions, &by_key, &keys, table).await?;
        }
        // The counts as of now, after settling.
        let mut counts = Vec::new();
        for r in &regions {
            counts.push(
                r.client
                    .query_one(&format!("SELECT count(*) FROM ({rows}) x"), &[])
                    .await
                    .map_err(query(&r.name, format!("counting {table}")))?
                    .get::<_, i64>(0),
            );
        }
        report.tables.push((table.clone(), counts));
        report
            .differences
            .extend(suspects.into_iter().map(|(key, rows)| Difference {
                table: table.clone(),
                key,
                rows,
            }));
    }
    Ok(report)
}

/// Reads `sql` (rows `k, r`, with `$1` bound to `arg`) in every region and
/// keeps the keys whose rows are not the same everywhere.
async fn read_keys<T: tokio_postgres::types::ToSql + Sync>(
    regions: &[Region],
    sql: &str,
    arg: &T,
    table: &str,
) -> Result<BTreeMap<String, Vec<Option<String>>>, VerifyError> {
    let reads = futures_util::future::join_all(regions.iter().map(|r| async {
        r.client
            .query(sql, &[arg])
            .await
            .map_err(query(&r.name, format!("reading keys of {table}")))
    }))
    .await;
    let mut rows: BTreeMap<String, Vec<Option<String>>> = BTreeMap::new();
    for (i, read) in reads.into_iter().enumerate() {
        for r in read? {
            rows.entry(r.get(0))
                .or_insert_with(|| vec![None; regions.len()])[i] = Some(r.get(1));
        }
    }
    rows.retain(|_, v| v.iter().any(|r| r != &v[0]));
    Ok(rows)
}

/// The primary key's columns of `table` over alias `t`, as arguments of
/// jsonb_build_object (None without a primary key).
async fn primary_key(
    client: &Client,
    table: &str,
) -> Result<Option<String>, tokio_postgres::Error> {
    let cols: Option<String> = client
        .query_one(
            "SELECT string_agg(format('%L, t.%I', a.attname, a.attname), ', ' ORDER BY k.ord)
               FROM pg_index i
               CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
               JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
              WHERE i.indrelid = $1::text::regclass AND i.indisprimary",
            &[&table],
        )
        .await?
        .get(0);
    Ok(cols)
}

fn query(
    region: &str,
    context: impl Into<String>,
) -> impl FnOnce(tokio_postgres::Error) -> VerifyError {
    let (region, context) = (region.to_string(), context.into());
    move |source| VerifyError::Query {
        region,
        context,
        source,
    }
}
