//! The rule files' table rules, recorded in the database for capture and
//! apply (`meridian.replicated_table`, `engine_table`, `orphan_rule`,
//! `rule_ahead`). A rule may name a table that does not exist yet (the
//! application creates it later through its own migrations): it is recorded
//! by name and checked by the capture event trigger when the table appears.

use tokio_postgres::Transaction;

use super::{pg, CaptureError};
use crate::rules::{RuleSet, TableRule};

/// The columns a rule merges, to check them when its table appears.
fn column_names(rule: &TableRule) -> Vec<String> {
    rule.columns.keys().cloned().collect()
}

/// Records every rule; returns the qualified names of the tables with rules.
pub(super) async fn record(
    tx: &Transaction<'_>,
    rules: &RuleSet,
) -> Result<Vec<String>, CaptureError> {
    for rule in &rules.tables {
        let name = rule.qualified();
        let exists = tx
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&name])
            .await
            .map_err(pg("looking up rule tables"))?;
        let (origin, columns) = (rule.origin(), column_names(rule));
        if !exists.get::<_, bool>(0) {
            // Created later by the application: checked when it appears.
            tx.execute(
                "SELECT meridian.record_rule_ahead($1, $2, $3, $4, $5, $6, $7, $8)",
                &[
                    &name,
                    &origin,
                    &rule.insert_only,
                    &rule.counters,
                    &columns,
                    &rule.orphans.name(),
                    &rule.needs_engine(),
                    &rule.columns_json(),
                ],
            )
            .await
            .map_err(pg(format!("{origin}: recording the rule for {name}")))?;
            continue;
        }
        // Kept by name, so the table is checked again if it is dropped and created again.
        tx.execute(
            "INSERT INTO meridian.rule_ahead AS a (tbl, origin, columns, counters) VALUES ($1, $2, $3, $4)
             ON CONFLICT (tbl) DO UPDATE SET origin = excluded.origin, columns = excluded.columns,
                                             counters = excluded.counters",
            &[&name, &origin, &columns, &rule.counters],
        )
        .await
        .map_err(pg(format!("{origin}: recording the rule for {name}")))?;
        tx.execute(
            "SELECT meridian.set_table_rule($1::text::regclass, $2, $3)",
            &[&name, &rule.insert_only, &rule.counters],
        )
        .await
        .map_err(pg(format!(
            "{}: applying the rule for {name}",
            rule.origin()
        )))?;
        for column in rule.columns.keys() {
            let found: bool = tx
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = $1::text::regclass
                                       AND attname = $2 AND attnum > 0 AND NOT attisdropped)",
                    &[&name, column],
                )
                .await
                .map_err(pg("looking up rule columns"))?
                .get(0);
            if !found {
                return Err(CaptureError::MissingColumn {
                    origin: format!("{}.columns.{column}", rule.origin()),
                    table: name,
                    column: column.clone(),
                });
            }
        }
        if let Some(function) = &rule.function {
            let found: bool = tx
                .query_one(
                    "SELECT to_regprocedure($1 || '(jsonb, jsonb, jsonb)') IS NOT NULL",
                    &[function],
                )
                .await
                .map_err(pg("looking up rule functions"))?
                .get(0);
            if !found {
                return Err(CaptureError::MissingFunction {
                    origin: format!("{}.function", rule.origin()),
                    function: function.clone(),
                });
            }
        }
        tx.execute(
            "SELECT meridian.set_orphans($1::text::regclass, $2)",
            &[&name, &rule.orphans.name()],
        )
        .await
        .map_err(pg(format!(
            "{}: applying the rule for {name}",
            rule.origin()
        )))?;
        tx.execute(
            "SELECT meridian.set_table_engine($1::text::regclass, $2, $3)",
            &[&name, &rule.needs_engine(), &rule.columns_json()],
        )
        .await
        .map_err(pg(format!(
            "{}: applying the rule for {name}",
            rule.origin()
        )))?;
    }
    let rule_tables: Vec<String> = rules.tables.iter().map(|t| t.qualified()).collect();
    // A table whose rule was removed goes back to last-writer-wins.
    // (set_table_engine also regenerates the table's capture function.)
    tx.execute(
        "SELECT meridian.set_table_engine(e.tbl::regclass, false, '{}')
           FROM meridian.engine_table e
          WHERE e.tbl <> ALL($1) AND to_regclass(e.tbl) IS NOT NULL",
        &[&rule_tables],
    )
    .await
    .map_err(pg("resetting rules"))?;
    tx.execute(
        "WITH e AS (DELETE FROM meridian.engine_table WHERE tbl <> ALL($1)),
              a AS (DELETE FROM meridian.rule_ahead WHERE tbl <> ALL($1))
         DELETE FROM meridian.orphan_rule WHERE tbl <> ALL($1)",
        &[&rule_tables],
    )
    .await
    .map_err(pg("resetting rules"))?;
    Ok(rule_tables)
}
