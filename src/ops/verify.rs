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
//! Before the rows, every table's presence is checked in every region at
//! once (tables missing somewhere get one `settle` period in all to arrive,
//! not one each), and each table's shape is compared (`ops::schema`:
//! columns, keys, constraints, indexes; each differing item is named).
//! Rows are compared as JSON objects of the columns every region has, so a
//! column missing in one region is one schema difference, not a difference
//! in every row. The tables are those any region captures.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use tokio_postgres::{Client, NoTls};

use super::schema::{self, Shape};
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
    /// Per table, its row count in each region (None: the table is missing there).
    pub tables: Vec<(String, Vec<Option<i64>>)>,
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
                .map(|(r, n)| match n {
                    Some(n) => format!("{r} {n}"),
                    None => format!("{r} (missing)"),
                })
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
    let regions = connect(config).await?;
    let tables = replicated_tables(&regions).await?;
    // Tables and schema changes still on their way get one settle period in
    // all, counted from here.
    let deadline = Instant::now() + settle;
    let presence = wait_present(&regions, &tables, deadline, &mut progress).await?;
    let mut report = Report {
        regions: regions.iter().map(|r| r.name.clone()).collect(),
        ..Report::default()
    };
    for (i, table) in tables.iter().enumerate() {
        let step = format!("verify: [{}/{}] {table}", i + 1, tables.len());
        let present = &presence[table];
        if present.contains(&false) {
            progress(&format!("{step}: missing in some region"));
            let mut counts = Vec::new();
            for (r, &here) in regions.iter().zip(present) {
                counts.push(match here {
                    true => Some(count(r, table, &format!("SELECT 1 FROM {table}")).await?),
                    false => None,
                });
            }
            report.tables.push((table.clone(), counts));
            report.differences.push(Difference {
                table: table.clone(),
                key: "(the whole table)".into(),
                rows: present
                    .iter()
                    .map(|&here| here.then(|| "(table exists)".to_string()))
                    .collect(),
            });
            continue;
        }
        let shapes = settled_shapes(&regions, table, deadline, &mut progress).await?;
        for (item, definitions) in schema::differences(&shapes) {
            report.differences.push(Difference {
                table: table.clone(),
                key: format!("(schema) {item}"),
                rows: definitions,
            });
        }
        let columns = schema::common_columns(&shapes);
        let (counts, differences) =
            compare_rows(&regions, table, &columns, settle, &step, &mut progress).await?;
        report
            .tables
            .push((table.clone(), counts.into_iter().map(Some).collect()));
        report.differences.extend(differences);
    }
    Ok(report)
}

/// This region's database and every peer's.
async fn connect(config: &Config) -> Result<Vec<Region>, VerifyError> {
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
    Ok(regions)
}

/// The tables any region captures (a table only one region has is a
/// difference too).
async fn replicated_tables(regions: &[Region]) -> Result<Vec<String>, VerifyError> {
    let mut tables = BTreeSet::new();
    for r in regions {
        let rows = r
            .client
            .query(
                "SELECT tbl FROM meridian.replicated_table
                  WHERE captured AND to_regclass(tbl) IS NOT NULL",
                &[],
            )
            .await
            .map_err(query(&r.name, "listing replicated tables"))?;
        tables.extend(rows.iter().map(|row| row.get::<_, String>(0)));
    }
    Ok(tables.into_iter().collect())
}

/// Which regions have each table, read in every region with one query; a
/// table missing somewhere is looked for again every half second until the
/// deadline.
async fn wait_present(
    regions: &[Region],
    tables: &[String],
    deadline: Instant,
    progress: &mut impl FnMut(&str),
) -> Result<BTreeMap<String, Vec<bool>>, VerifyError> {
    loop {
        let mut presence: BTreeMap<String, Vec<bool>> = BTreeMap::new();
        for r in regions {
            let rows = r
                .client
                .query(
                    "SELECT t, to_regclass(t) IS NOT NULL FROM unnest($1::text[]) t",
                    &[&tables],
                )
                .await
                .map_err(query(&r.name, "looking for the replicated tables"))?;
            for row in rows {
                presence.entry(row.get(0)).or_default().push(row.get(1));
            }
        }
        let missing = presence.values().filter(|p| p.contains(&false)).count();
        if missing == 0 || Instant::now() >= deadline {
            return Ok(presence);
        }
        progress(&format!(
            "verify: {missing} table(s) not in every region yet; waiting"
        ));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Every region's shape of `table`, read again until they agree or the
/// deadline passes (a schema change may be on its way).
async fn settled_shapes(
    regions: &[Region],
    table: &str,
    deadline: Instant,
    progress: &mut impl FnMut(&str),
) -> Result<Vec<Shape>, VerifyError> {
    loop {
        let mut shapes = Vec::new();
        for r in regions {
            shapes.push(
                schema::read(&r.client, table)
                    .await
                    .map_err(query(&r.name, format!("reading the shape of {table}")))?,
            );
        }
        let differing = schema::differences(&shapes).len();
        if differing == 0 || Instant::now() >= deadline {
            return Ok(shapes);
        }
        progress(&format!(
            "verify: {table}: {differing} schema item(s) differ; reading again"
        ));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn count(r: &Region, table: &str, rows: &str) -> Result<i64, VerifyError> {
    Ok(r.client
        .query_one(&format!("SELECT count(*) FROM ({rows}) x"), &[])
        .await
        .map_err(query(&r.name, format!("counting {table}")))?
        .get(0))
}

/// Steps 1-3 of the module header for one table present everywhere, on
/// `columns`: the row counts per region (after settling) and the keys whose
/// rows differ.
async fn compare_rows(
    regions: &[Region],
    table: &str,
    columns: &[String],
    settle: Duration,
    step: &str,
    progress: &mut impl FnMut(&str),
) -> Result<(Vec<i64>, Vec<Difference>), VerifyError> {
    let local = &regions[0];
    let key = primary_key(&local.client, table)
        .await
        .map_err(query(&local.name, format!("reading the key of {table}")))?;
    // Quoted by Postgres, as the key's columns are (primary_key).
    let row_args: String = local
        .client
        .query_one(
            "SELECT coalesce(string_agg(format('%L, t.%I', c, c), ', '), '') FROM unnest($1::text[]) c",
            &[&columns],
        )
        .await
        .map_err(query(&local.name, format!("quoting the columns of {table}")))?
        .get(0);
    let row = format!("jsonb_build_object({row_args})::text");
    // Keyed tables: one row per key. Without a key, identical rows are
    // one entry, with their number of copies.
    let rows = match key {
        Some(cols) => {
            format!("SELECT jsonb_build_object({cols})::text AS k, {row} AS r FROM {table} t")
        }
        None => format!(
            "SELECT {row} AS k, {row} || ' (' || count(*) || ' copies)' AS r
               FROM {table} t GROUP BY 1"
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
    let all_buckets: BTreeSet<i64> = per_region.iter().flat_map(|m| m.keys().copied()).collect();
    let differing: Vec<i64> = all_buckets
        .into_iter()
        .filter(|b| {
            let first = per_region[0].get(b);
            per_region[1..].iter().any(|m| m.get(b) != first)
        })
        .collect();
    progress(&format!(
        "{step}: {} rows here, {} of {BUCKETS} buckets differ",
        counts[0],
        differing.len()
    ));
    if differing.is_empty() {
        return Ok((counts, Vec::new()));
    }
    // 2. The keys of the differing buckets.
    let in_buckets = format!(
        "SELECT k, r FROM ({rows}) x WHERE hashtextextended(k, 0) & {mask} = ANY($1)",
        mask = BUCKETS - 1
    );
    let mut suspects = read_keys(regions, &in_buckets, &differing, table).await?;
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
        suspects = read_keys(regions, &by_key, &keys, table).await?;
    }
    // The counts as of now, after settling.
    let mut counts = Vec::new();
    for r in regions {
        counts.push(count(r, table, &rows).await?);
    }
    let differences = suspects
        .into_iter()
        .map(|(key, rows)| Difference {
            table: table.to_string(),
            key,
            rows,
        })
        .collect();
    Ok((counts, differences))
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
