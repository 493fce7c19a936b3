//! rules: the per-table rule files in `conflict-rules/*.toml`.
//!
//! This module owns reading and validating the files. What the write path
//! needs from them today: which tables are replicated, which are insert-only
//! (no primary key; each row replicated once under a generated identity), and
//! which columns are counters (capture records their old values, and the
//! apply adds each update's delta: `migrations/functions/counters.sql`). Other
//! conflict policies are for the rule
//! engine (see README, feature status); a policy this build cannot apply is
//! refused here rather than accepted and ignored.
//!
//! ```toml
//! [[table]]
//! name = "public.accounts"
//! [table.columns]
//! balance = "counter"
//!
//! [[table]]
//! name = "public.audit_log"
//! insert_only = true
//! ```

pub mod merge;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    #[serde(default)]
    table: Vec<TableRuleSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct TableRuleSpec {
    name: String,
    #[serde(default)]
    insert_only: bool,
    #[serde(default)]
    policy: Policy,
    /// For `region-priority`: region names, highest priority first.
    #[serde(default)]
    regions: Vec<String>,
    #[serde(default)]
    deletes: Option<Deletes>,
    /// For `policy = "custom"`.
    #[serde(default)]
    function: Option<String>,
    #[serde(default)]
    orphans: Orphans,
    #[serde(default)]
    columns: BTreeMap<String, toml::Value>,
}

/// What happens to rows of this table left without their foreign-key parent
/// (the parent deleted in one region while the child was written in
/// another). Either way the orphan is logged in `meridian.conflict`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Orphans {
    /// The child row stays (in every region: they still agree).
    #[default]
    Keep,
    /// The child row is deleted, in every region alike.
    Delete,
}

impl Orphans {
    pub fn name(self) -> &'static str {
        match self {
            Orphans::Keep => "keep",
            Orphans::Delete => "delete",
        }
    }
}

/// How a conflict on a row is decided (the columns without a merge of their own).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    /// The version with the larger (hlc, region id) wins.
    #[default]
    LastWriterWins,
    /// The version with the smaller (hlc, region id) wins.
    FirstWriterWins,
    /// The region listed first in `regions` wins; ties by last-writer-wins.
    RegionPriority,
    /// This region's version stays; the conflict is logged. Regions do not
    /// converge on such rows: for data an operator reconciles by hand.
    #[serde(alias = "keep-local-and-log")]
    KeepLocal,
    /// A SQL function `f(local jsonb, remote jsonb, meta jsonb) returns
    /// jsonb` decides (the row to keep; NULL: deleted). Keeping it
    /// order-independent is up to its author.
    Custom,
}

impl Policy {
    pub fn name(self) -> &'static str {
        match self {
            Policy::LastWriterWins => "last-writer-wins",
            Policy::FirstWriterWins => "first-writer-wins",
            Policy::RegionPriority => "region-priority",
            Policy::KeepLocal => "keep-local",
            Policy::Custom => "custom",
        }
    }
}

/// How a conflict between a delete and an update or insert is decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Deletes {
    DeleteWins,
    UpdateWins,
}

/// How one column is merged when two versions of a row conflict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ColumnRule {
    /// Concurrent increments from all regions add up: the delta is shipped.
    Counter,
    /// The larger value.
    Max,
    /// The smaller value.
    Min,
    /// Both arrays' elements, each once, in a canonical order.
    Union,
    /// The value furthest along this order (values not listed come first).
    States(Vec<String>),
    /// The value of the write that changed this column last (each column
    /// has its own version, kept by capture).
    LastWriterWins,
}

impl ColumnRule {
    pub fn name(&self) -> &'static str {
        match self {
            ColumnRule::Counter => "counter",
            ColumnRule::Max => "max",
            ColumnRule::Min => "min",
            ColumnRule::Union => "union",
            ColumnRule::States(_) => "states",
            ColumnRule::LastWriterWins => "last-writer-wins",
        }
    }

    fn parse(value: &toml::Value) -> Result<ColumnRule, String> {
        const EXPECTED: &str =
            "expected \"counter\", \"max\", \"min\", \"union\", \"last-writer-wins\" or { states = [...] }";
        match value {
            toml::Value::String(s) => match s.as_str() {
                "counter" => Ok(ColumnRule::Counter),
                "max" => Ok(ColumnRule::Max),
                "min" => Ok(ColumnRule::Min),
                "union" => Ok(ColumnRule::Union),
                "last-writer-wins" => Ok(ColumnRule::LastWriterWins),
                other => Err(format!("unknown column rule {other:?}; {EXPECTED}")),
            },
            toml::Value::Table(t) => {
                if let Some(key) = t.keys().find(|k| *k != "states") {
                    return Err(format!("unknown key {key:?}; {EXPECTED}"));
                }
                let states = t
                    .get("states")
                    .and_then(|v| v.as_array())
                    .ok_or_else(|| format!("states must be a list of strings; {EXPECTED}"))?;
                let states: Vec<String> = states
                    .iter()
                    .map(|v| v.as_str().map(str::to_string))
                    .collect::<Option<_>>()
                    .ok_or("states must be a list of strings")?;
                if states.len() < 2 {
                    return Err(
                        "states needs at least two values, in the order a value may move".into(),
                    );
                }
                if let Some(dup) = states
                    .iter()
                    .enumerate()
                    .find(|(i, s)| states[..*i].contains(s))
                {
                    return Err(format!("state {:?} is listed twice", dup.1));
                }
                Ok(ColumnRule::States(states))
            }
            _ => Err(EXPECTED.into()),
        }
    }
}

/// The rule for one table, with the file it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableRule {
    /// `schema.table`; a name without a schema means `public`.
    pub schema: String,
    pub table: String,
    pub insert_only: bool,
    pub policy: Policy,
    /// For [`Policy::Custom`]: the SQL function, `schema.name`.
    pub function: Option<String>,
    /// For [`Policy::RegionPriority`]: region names, highest priority first.
    pub regions: Vec<String>,
    pub deletes: Option<Deletes>,
    pub orphans: Orphans,
    /// Every column with a merge of its own (counters included).
    pub columns: BTreeMap<String, ColumnRule>,
    /// The counter columns (capture records their old values).
    pub counters: Vec<String>,
    pub file: PathBuf,
    /// Index of the `[[table]]` entry in its file (for messages).
    pub index: usize,
}

impl TableRule {
    /// Whether conflicts on this table are decided by the rule engine
    /// (`rules::merge`) rather than by plain last-writer-wins in SQL (where
    /// counter columns are handled too).
    pub fn needs_engine(&self) -> bool {
        self.policy != Policy::LastWriterWins
            || self.deletes.is_some()
            || self.columns.values().any(|c| *c != ColumnRule::Counter)
    }

    /// The rule as the merge engine runs it, with region names resolved by
    /// `region_id`; an unknown name is an error naming the key.
    pub fn engine(
        &self,
        region_id: impl Fn(&str) -> Option<u16>,
    ) -> Result<merge::Engine, RulesError> {
        let priority = self
            .regions
            .iter()
            .enumerate()
            .map(|(i, name)| {
                region_id(name).ok_or_else(|| RulesError::Invalid {
                    file: self.file.clone(),
                    key: format!("table[{}].regions[{i}]", self.index),
                    message: format!("{name:?} is neither this region nor one of its peers"),
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(merge::Engine {
            policy: self.policy,
            function: self.function.clone(),
            priority,
            // A tombstone keeps no merged values: with merged columns a
            // conflicting delete wins (see merge).
            deletes: match self.deletes {
                None if !self.columns.is_empty() => Some(Deletes::DeleteWins),
                d => d,
            },
            columns: self
                .columns
                .iter()
                .map(|(c, r)| (c.clone(), r.clone()))
                .collect(),
        })
    }

    /// The merged columns' rules as the database keeps them
    /// (`meridian.engine_table.columns`, read by capture):
    /// `{"n": "counter", "st": {"states": [...]}}`.
    pub fn columns_json(&self) -> serde_json::Value {
        self.columns
            .iter()
            .map(|(c, r)| {
                let v = match r {
                    ColumnRule::States(s) => serde_json::json!({ "states": s }),
                    r => serde_json::Value::from(r.name()),
                };
                (c.clone(), v)
            })
            .collect::<serde_json::Map<_, _>>()
            .into()
    }

    pub fn qualified(&self) -> String {
        format!("{}.{}", self.schema, self.table)
    }

    /// Where this rule is written, for messages: `file: table[i]`.
    pub fn origin(&self) -> String {
        format!("{}: table[{}]", self.file.display(), self.index)
    }
}

/// All rule files of a directory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RuleSet {
    pub tables: Vec<TableRule>,
}

#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{file}: {key}: {message}")]
    Invalid {
        file: PathBuf,
        key: String,
        message: String,
    },
}

impl RuleSet {
    /// Reads every `*.toml` file of `dir` in name order. A missing directory is
    /// an empty rule set; an unreadable or invalid file is an error naming it.
    pub fn load(dir: &Path) -> Result<RuleSet, RulesError> {
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(RuleSet::default()),
            Err(source) => {
                return Err(RulesError::Read {
                    path: dir.into(),
                    source,
                })
            }
        };
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .collect();
        files.sort();
        let mut set = RuleSet::default();
        for file in files {
            let text = std::fs::read_to_string(&file).map_err(|source| RulesError::Read {
                path: file.clone(),
                source,
            })?;
            set.add_file(&file, &text)?;
        }
        Ok(set)
    }

    /// Parses one file's text and adds its tables.
    pub fn add_file(&mut self, file: &Path, text: &str) -> Result<(), RulesError> {
        let invalid = |key: String, message: String| RulesError::Invalid {
            file: file.into(),
            key,
            message,
        };
        let parsed: RuleFile = serde_path_to_error::deserialize(toml::Deserializer::new(text))
            .map_err(|e| {
                let key = e.path().to_string();
                let inner = e.into_inner();
                let mut message = inner.message().trim().to_string();
                if let Some(span) = inner.span() {
                    let line = text[..span.start.min(text.len())].lines().count().max(1);
                    message = format!("{message} (line {line})");
                }
                invalid(if key == "." { String::new() } else { key }, message)
            })?;
        for (index, spec) in parsed.table.into_iter().enumerate() {
            let key = format!("table[{index}].name");
            let (schema, table) = split_name(&spec.name).ok_or_else(|| {
                invalid(
                    key.clone(),
                    format!(
                        "{:?} is not a table name; write schema.table, e.g. \"public.accounts\"",
                        spec.name
                    ),
                )
            })?;
            if let Some(other) = self
                .tables
                .iter()
                .find(|t| t.schema == schema && t.table == table)
            {
                return Err(invalid(
                    key,
                    format!("{schema}.{table} already has a rule in {}", other.origin()),
                ));
            }
            let mut columns = BTreeMap::new();
            for (column, value) in &spec.columns {
                let rule = ColumnRule::parse(value)
                    .map_err(|m| invalid(format!("table[{index}].columns.{column}"), m))?;
                columns.insert(column.clone(), rule);
            }
            let counters: Vec<String> = columns
                .iter()
                .filter(|(_, rule)| **rule == ColumnRule::Counter)
                .map(|(c, _)| c.clone())
                .collect();
            if spec.insert_only && !columns.is_empty() {
                let column = columns.keys().next().expect("not empty");
                return Err(invalid(
                    format!("table[{index}].columns.{column}"),
                    "an insert-only table has no updates, so its columns cannot have merge rules"
                        .into(),
                ));
            }
            if spec.insert_only && (spec.policy != Policy::LastWriterWins || spec.deletes.is_some())
            {
                return Err(invalid(
                    format!("table[{index}].insert_only"),
                    "an insert-only table never has conflicts, so it takes no policy or deletes rule".into(),
                ));
            }
            match spec.policy {
                Policy::RegionPriority if spec.regions.is_empty() => {
                    return Err(invalid(
                        format!("table[{index}].regions"),
                        "policy \"region-priority\" needs regions = [...], region names highest priority first".into(),
                    ))
                }
                Policy::RegionPriority => {
                    if let Some(dup) = spec.regions.iter().enumerate().find(|(i, r)| spec.regions[..*i].contains(r)) {
                        return Err(invalid(
                            format!("table[{index}].regions"),
                            format!("region {:?} is listed twice", dup.1),
                        ));
                    }
                }
                _ if !spec.regions.is_empty() => {
                    return Err(invalid(
                        format!("table[{index}].regions"),
                        format!("regions only applies to policy \"region-priority\", not {:?}", spec.policy.name()),
                    ))
                }
                _ => {}
            }
            if spec.deletes == Some(Deletes::UpdateWins) && !columns.is_empty() {
                return Err(invalid(
                    format!("table[{index}].deletes"),
                    "deletes = \"update-wins\" cannot be combined with merged columns yet (a tombstone keeps no merged values, so regions could end with different values); use \"delete-wins\" or drop the column rules".into(),
                ));
            }
            let function = match (&spec.function, spec.policy) {
                (None, Policy::Custom) => {
                    return Err(invalid(
                        format!("table[{index}].function"),
                        "policy \"custom\" needs function = \"schema.name\", a SQL function (local jsonb, remote jsonb, meta jsonb) returning the row to keep (jsonb, or NULL for deleted)".into(),
                    ))
                }
                (Some(f), Policy::Custom) => {
                    let (fs, fname) = split_name(f).ok_or_else(|| {
                        invalid(
                            format!("table[{index}].function"),
                            format!("{f:?} is not a function name; write schema.name"),
                        )
                    })?;
                    if !columns.is_empty() {
                        return Err(invalid(
                            format!("table[{index}].columns"),
                            "with policy \"custom\" the function decides every column; drop the column rules".into(),
                        ));
                    }
                    Some(format!("{fs}.{fname}"))
                }
                (Some(_), _) => {
                    return Err(invalid(
                        format!("table[{index}].function"),
                        "function only applies to policy \"custom\"".into(),
                    ))
                }
                (None, _) => None,
            };
            self.tables.push(TableRule {
                schema,
                table,
                function,
                insert_only: spec.insert_only,
                policy: spec.policy,
                regions: spec.regions,
                deletes: spec.deletes,
                orphans: spec.orphans,
                columns,
                counters,
                file: file.into(),
                index,
            });
        }
        Ok(())
    }
}

/// `schema.table` (or `table`, meaning `public.table`), as the lower-case,
/// unquoted identifiers Postgres folds names to. Quoted names are not supported.
fn split_name(name: &str) -> Option<(String, String)> {
    let ident = |s: &str| {
        !s.is_empty()
            && !s.starts_with(|c: char| c.is_ascii_digit())
            && s.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    };
    let (schema, table) = name.split_once('.').unwrap_or(("public", name));
    (ident(schema) && ident(table)).then(|| (schema.to_string(), table.to_string()))
}

#[cfg(test)]
mod tests;
