//! replication::rows: how the set-wise apply writes a table's rows. The
//! table's shape as the apply sees it (`meridian.apply_tables`), rows for
//! new keys by COPY, rows for keys that have one through a staging table,
//! the defaults of columns added since a row was written, and the JSON
//! statements for rows COPY text cannot carry (arrays, composites).

use std::borrow::Cow;

use serde_json::Value;

use crate::capture::image::Image;
use tokio_postgres::types::Json;
use tokio_postgres::Transaction;

use super::copy_text;

/// What `meridian.apply_tables` says of one table.
pub(super) struct TableShape {
    pub key_cols: Option<String>,
    pub t_keys: String,
    pub d_keys: String,
    pub all_cols: String,
    pub on_conflict: String,
    pub columns: Vec<String>,
    pub json: Vec<bool>,
    pub counters: Vec<String>,
    pub has_fk: bool,
}

/// The plain insert of the rows of `source` (a relation with the table's
/// columns), as written in their origin.
fn insert_from(tbl: &str, shape: &TableShape, source: &str) -> String {
    format!(
        "INSERT INTO {tbl} ({cols}) OVERRIDING SYSTEM VALUE SELECT {cols} FROM {source}",
        cols = shape.all_cols
    )
}

/// The plain insert of `rows` given as JSON (`$1`).
fn insert_statement(tbl: &str, shape: &TableShape) -> String {
    insert_from(
        tbl,
        shape,
        &format!("jsonb_populate_recordset(NULL::{tbl}, $1::jsonb)"),
    )
}

/// Inserts `rows` through COPY, or, when COPY text cannot carry one of them,
/// through `jsonb_populate_recordset`.
pub(super) async fn insert_rows(
    tx: &Transaction<'_>,
    tbl: &str,
    shape: &TableShape,
    rows: &[Cow<'_, Image>],
) -> Result<(), tokio_postgres::Error> {
    if !copy_rows(tx, tbl, shape, rows).await? {
        tx.execute(&insert_statement(tbl, shape), &[&Json(rows)])
            .await?;
    }
    Ok(())
}

/// Rows lacking a column the table has now (written before it was added in
/// their origin) get its default, as the origin's own rows did.
pub(super) async fn with_defaults<'a>(
    tx: &Transaction<'_>,
    tbl: &str,
    shape: &TableShape,
    rows: Vec<&'a Image>,
) -> Result<Vec<Cow<'a, Image>>, tokio_postgres::Error> {
    let lacking = rows
        .iter()
        .any(|r| shape.columns.iter().any(|c| !r.contains(c)));
    let defaults: Option<Value> = if lacking {
        tx.query_one(
            "SELECT meridian.missing_defaults($1::text::regclass, $2::jsonb)",
            &[&tbl, &Json(&rows)],
        )
        .await?
        .get(0)
    } else {
        None
    };
    let Some(defaults) = defaults.as_ref().and_then(Image::from_value) else {
        return Ok(rows.into_iter().map(Cow::Borrowed).collect());
    };
    Ok(rows
        .into_iter()
        .map(|r| {
            if defaults.iter().all(|(k, _)| r.contains(k)) {
                return Cow::Borrowed(r);
            }
            let mut filled = r.clone();
            for (k, v) in defaults.iter().filter(|(k, _)| !r.contains(k)) {
                filled.push(k, v);
            }
            Cow::Owned(filled)
        })
        .collect())
}

/// Rows for keys that have a row here (or may have one), written through a
/// staging table: COPY into a temporary table of the table's columns, then
/// one upsert that moves the rows out of it. The same upsert straight from
/// `jsonb_populate_recordset` spends most of its time in Postgres parsing
/// JSON: 406-485 ms for 15,000 rows of the catch-up benchmark's 10-column
/// table, against 25-48 ms for the COPY and 137-216 ms for the upsert from
/// the staging table. Rows COPY text cannot carry go the JSON way.
pub(super) async fn upsert_rows(
    tx: &Transaction<'_>,
    tbl: &str,
    key_cols: &str,
    shape: &TableShape,
    rows: &[Cow<'_, Image>],
) -> Result<(), tokio_postgres::Error> {
    let Some(text) = copy_text_of(rows, shape) else {
        let upsert = format!(
            "{} ON CONFLICT ({key_cols}) {}",
            insert_statement(tbl, shape),
            shape.on_conflict
        );
        tx.execute(&upsert, &[&Json(rows)]).await?;
        return Ok(());
    };
    let cols = &shape.all_cols;
    // Made once per session and table shape (and again after a rolled-back
    // apply); its rows go at commit, and the upsert below deletes what it
    // moves.
    let stage = tx.query_one(STAGE, &[&tbl]).await?;
    let (stage, exists): (String, bool) = (stage.get(0), stage.get(1));
    if !exists {
        tx.batch_execute(&format!(
            "CREATE TEMP TABLE {stage} ON COMMIT DELETE ROWS AS SELECT {cols} FROM {tbl} WITH NO DATA"
        ))
        .await?;
    }
    copy_in(tx, &format!("COPY {stage} ({cols}) FROM STDIN"), text).await?;
    tx.execute(
        &format!(
            "WITH moved AS (DELETE FROM {stage} RETURNING *) {} ON CONFLICT ({key_cols}) {}",
            insert_from(tbl, shape, "moved"),
            shape.on_conflict
        ),
        &[],
    )
    .await?;
    Ok(())
}

/// The name of table `$1`'s staging table, and whether this session has it.
/// The name is a digest of the table and its stored columns' names and types
/// with their modifiers: a staging table kept from before a schema change
/// would otherwise take, say, `numeric(10,2)` values for a column that is
/// `numeric(12,4)` now, and round them.
const STAGE: &str = "SELECT s.name, to_regclass('pg_temp.' || s.name) IS NOT NULL
                       FROM (SELECT 'meridian_stage_' || left(md5($1::text || ':' || string_agg(
                                        quote_ident(a.attname) || ' ' || format_type(a.atttypid, a.atttypmod),
                                        ',' ORDER BY a.attnum)), 24) AS name
                               FROM pg_attribute a
                              WHERE a.attrelid = $1::text::regclass AND a.attnum > 0 AND NOT a.attisdropped
                                AND a.attgenerated = '') s";

/// New rows through COPY (see [`copy_text`]); false, with nothing written,
/// when some row holds a value COPY text cannot carry as it is.
async fn copy_rows(
    tx: &Transaction<'_>,
    tbl: &str,
    shape: &TableShape,
    rows: &[Cow<'_, Image>],
) -> Result<bool, tokio_postgres::Error> {
    let Some(text) = copy_text_of(rows, shape) else {
        return Ok(false);
    };
    let statement = format!("COPY {tbl} ({}) FROM STDIN", shape.all_cols);
    copy_in(tx, &statement, text).await?;
    Ok(true)
}

pub(super) async fn copy_in(
    tx: &Transaction<'_>,
    statement: &str,
    text: Vec<u8>,
) -> Result<(), tokio_postgres::Error> {
    use futures_util::SinkExt;
    let sink = tx.copy_in::<_, bytes::Bytes>(statement).await?;
    futures_util::pin_mut!(sink);
    sink.send(bytes::Bytes::from(text)).await?;
    sink.finish().await?;
    Ok(())
}

/// `rows` as COPY text of the table's columns; None when a value cannot be
/// carried as it is (see [`copy_text`]).
fn copy_text_of(rows: &[Cow<'_, Image>], shape: &TableShape) -> Option<Vec<u8>> {
    let mut text = Vec::with_capacity(rows.len() * 128);
    for row in rows {
        if !copy_text::encode_row(&mut text, row, &shape.columns, &shape.json) {
            return None;
        }
    }
    Some(text)
}
