//! rules: the per-table rule files in `conflict-rules/*.toml`.
//!
//! This module owns reading and validating the files. What the write path
//! needs from them today: which tables are replicated, which are insert-only
//! (no primary key; each row replicated once under a generated identity), and
//! which columns are counters (capture records their old values, and the
//! apply adds each update's delta: `migrations/0004_counters.sql`). Other
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
    columns: BTreeMap<String, ColumnRule>,
}

/// How one column is merged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ColumnRule {
    /// Concurrent increments from all regions add up: the delta is shipped.
    Counter,
}

/// The rule for one table, with the file it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableRule {
    /// `schema.table`; a name without a schema means `public`.
    pub schema: String,
    pub table: String,
    pub insert_only: bool,
    pub counters: Vec<String>,
    pub file: PathBuf,
    /// Index of the `[[table]]` entry in its file (for messages).
    pub index: usize,
}

impl TableRule {
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
            let counters: Vec<String> = spec
                .columns
                .iter()
                .filter(|(_, rule)| **rule == ColumnRule::Counter)
                .map(|(c, _)| c.clone())
                .collect();
            if spec.insert_only && !counters.is_empty() {
                return Err(invalid(
                    format!("table[{index}].columns.{}", counters[0]),
                    "an insert-only table has no updates, so it cannot have counter columns".into(),
                ));
            }
            self.tables.push(TableRule {
                schema,
                table,
                insert_only: spec.insert_only,
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
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<RuleSet, RulesError> {
        let mut set = RuleSet::default();
        set.add_file(Path::new("conflict-rules/x.toml"), text)?;
        Ok(set)
    }

    #[test]
    fn reads_tables_insert_only_and_counters() {
        let set = parse(
            r#"
[[table]]
name = "public.accounts"
[table.columns]
balance = "counter"

[[table]]
name = "audit_log"
insert_only = true
"#,
        )
        .unwrap();
        assert_eq!(set.tables.len(), 2);
        assert_eq!(set.tables[0].qualified(), "public.accounts");
        assert_eq!(set.tables[0].counters, ["balance"]);
        assert_eq!(set.tables[1].qualified(), "public.audit_log");
        assert!(set.tables[1].insert_only);
    }

    #[test]
    fn mistakes_name_the_file_and_key() {
        let e = parse("[[table]]\nname = \"public.a\"\ninsert_onyl = true\n").unwrap_err();
        let text = e.to_string();
        assert!(
            text.starts_with("conflict-rules/x.toml: table[0]"),
            "{text}"
        );
        assert!(text.contains("insert_onyl"), "{text}");
        let e =
            parse("[[table]]\nname = \"public.a\"\n[table.columns]\nb = \"sum\"\n").unwrap_err();
        assert!(e.to_string().contains("table[0].columns.b"), "{e}");
        let e = parse("[[table]]\nname = \"Public.A\"\n").unwrap_err();
        assert!(e.to_string().contains("table[0].name"), "{e}");
        let e = parse("[[table]]\nname = \"a\"\n[[table]]\nname = \"public.a\"\n").unwrap_err();
        assert!(e.to_string().contains("already has a rule"), "{e}");
    }

    #[test]
    fn shipped_examples_are_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("conflict-rules/examples");
        let set = RuleSet::load(&dir).unwrap();
        assert!(!set.tables.is_empty());
    }

    #[test]
    fn missing_directory_is_no_rules() {
        assert_eq!(
            RuleSet::load(Path::new("/nonexistent/rules")).unwrap(),
            RuleSet::default()
        );
    }
}
