//! sql: what a statement does to data, decided with sqlparser's PostgreSQL
//! dialect; the relay counts the statements it forwards by class. (It used
//! to decide which transactions the relay stamped; capture now stamps every
//! transaction from the WAL.)
//!
//! Classification is deliberately conservative: whatever might write is
//! treated as writing ([`StatementKind::MayWrite`]): CALL, DO, EXECUTE,
//! functions other than well-known read-only built-ins, and any text that
//! fails to parse. Text that fails to parse is still forwarded; Postgres
//! judges SQL, meridian only needs to know whether it may write. Results are
//! cached per statement text in a bounded LRU ([`ClassifierCache`]).
//!
//! Hostile input must not take the proxy down: sqlparser guards its own
//! recursion while parsing, but dropping or walking a very deep expression
//! tree recurses without a guard. So texts above [`MAX_PARSED_TEXT`] are not
//! parsed (they count as `MayWrite`), and function calls are found in the flat
//! token stream instead of by walking the tree.

mod cache;
mod tracker;

pub use cache::ClassifierCache;
pub use tracker::{StatementCounts, StatementTracker};

use sqlparser::ast::{SetExpr, Statement};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::keywords::Keyword;
use sqlparser::parser::Parser;
use sqlparser::tokenizer::{Token, Tokenizer};

/// Longer texts are not parsed and count as `MayWrite` (conservative).
/// Bounds parse time and expression depth.
pub const MAX_PARSED_TEXT: usize = 64 * 1024;

/// What one statement does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StatementKind {
    /// Reads only (SELECT without writing functions, SHOW, COPY TO, EXPLAIN).
    Read,
    /// Changes rows: INSERT (incl. ON CONFLICT), UPDATE, DELETE, MERGE, TRUNCATE,
    /// COPY FROM, SELECT INTO, data-modifying CTEs.
    Write,
    /// Changes the schema: CREATE/ALTER/DROP, GRANT/REVOKE, COMMENT.
    Ddl,
    /// BEGIN/START TRANSACTION, COMMIT, ROLLBACK, SAVEPOINT, RELEASE.
    Transaction(TxControl),
    /// Session state and utilities: SET, RESET, PREPARE, DEALLOCATE, DISCARD,
    /// LISTEN, NOTIFY, cursors, LOCK, VACUUM, ANALYZE.
    Session,
    /// Could write, cannot tell: CALL, DO, EXECUTE, user functions, unparseable text.
    MayWrite,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TxControl {
    Begin,
    Commit,
    Rollback,
    Savepoint,
    Release,
}

impl StatementKind {
    /// Whether the statement may write table rows. DDL is not counted as
    /// such (schema changes are classified apart).
    pub fn writes_rows(self) -> bool {
        matches!(self, StatementKind::Write | StatementKind::MayWrite)
    }
}

/// The classification of one statement text (which may hold several statements).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Classification {
    pub kinds: Vec<StatementKind>,
    /// The text did not parse; `kinds` is then `[MayWrite]`.
    pub unparsed: bool,
    /// DISCARD ALL / DISCARD PLANS / DEALLOCATE: drops server-side prepared statements.
    pub drops_prepared: bool,
}

impl Classification {
    pub fn writes_rows(&self) -> bool {
        self.kinds.iter().any(|k| k.writes_rows())
    }

    pub fn is_read_only(&self) -> bool {
        self.kinds.iter().all(|k| {
            matches!(
                k,
                StatementKind::Read | StatementKind::Session | StatementKind::Transaction(_)
            )
        })
    }
}

/// Classifies statement text. Never fails: unparseable text is `MayWrite`.
pub fn classify(text: &str) -> Classification {
    let unparsed = Classification {
        kinds: vec![StatementKind::MayWrite],
        unparsed: true,
        drops_prepared: false,
    };
    if text.len() > MAX_PARSED_TEXT {
        return unparsed;
    }
    let statements = match Parser::parse_sql(&PostgreSqlDialect {}, text) {
        Ok(s) => s,
        Err(_) => {
            return match copy_direction(text).or_else(|| non_transactional_utility(text)) {
                Some(kind) => Classification {
                    kinds: vec![kind],
                    unparsed: true,
                    drops_prepared: false,
                },
                None => unparsed,
            }
        }
    };
    let mut kinds: Vec<StatementKind> = statements.iter().map(classify_statement).collect();
    if kinds.contains(&StatementKind::Read) && calls_unknown_function(text) {
        for k in kinds.iter_mut().filter(|k| **k == StatementKind::Read) {
            *k = StatementKind::MayWrite;
        }
    }
    let drops_prepared = statements
        .iter()
        .any(|s| matches!(s, Statement::Discard { .. } | Statement::Deallocate { .. }));
    // Dropping a deep tree recurses; the size bound above keeps it shallow enough.
    drop(statements);
    Classification {
        kinds,
        unparsed: false,
        drops_prepared,
    }
}

fn classify_statement(statement: &Statement) -> StatementKind {
    use StatementKind::*;
    match statement {
        Statement::Query(query) => {
            if query_writes(query) {
                Write
            } else {
                Read
            }
        }
        Statement::Insert(_)
        | Statement::Update { .. }
        | Statement::Delete(_)
        | Statement::Merge { .. }
        | Statement::Truncate { .. } => Write,
        Statement::Copy { to, .. } => {
            if *to {
                Read
            } else {
                Write
            }
        }
        Statement::Explain {
            analyze,
            statement,
            options,
            ..
        } => {
            let analyzes = *analyze
                || options.as_ref().is_some_and(|o| {
                    o.iter()
                        .any(|u| u.name.value.eq_ignore_ascii_case("analyze"))
                });
            if analyzes {
                classify_statement(statement)
            } else {
                Read
            }
        }
        Statement::ShowVariable { .. } | Statement::ShowVariables { .. } => Read,
        Statement::StartTransaction { .. } => Transaction(TxControl::Begin),
        Statement::Commit { .. } => Transaction(TxControl::Commit),
        Statement::Rollback {
            savepoint: None, ..
        } => Transaction(TxControl::Rollback),
        Statement::Rollback {
            savepoint: Some(_), ..
        } => Transaction(TxControl::Savepoint),
        Statement::Savepoint { .. } => Transaction(TxControl::Savepoint),
        Statement::ReleaseSavepoint { .. } => Transaction(TxControl::Release),
        Statement::Call(_) | Statement::Execute { .. } => MayWrite,
        Statement::Set(_)
        | Statement::Prepare { .. }
        | Statement::Deallocate { .. }
        | Statement::Discard { .. }
        | Statement::LISTEN { .. }
        | Statement::UNLISTEN { .. }
        | Statement::NOTIFY { .. }
        | Statement::Declare { .. }
        | Statement::Fetch { .. }
        | Statement::Close { .. }
        | Statement::LockTables { .. }
        | Statement::Analyze { .. }
        | Statement::Vacuum(_) => Session,
        Statement::CreateTable(_)
        | Statement::CreateView { .. }
        | Statement::CreateIndex(_)
        | Statement::CreateSchema { .. }
        | Statement::CreateSequence { .. }
        | Statement::CreateType { .. }
        | Statement::CreateDomain(_)
        | Statement::CreateFunction(_)
        | Statement::CreateTrigger { .. }
        | Statement::CreateProcedure { .. }
        | Statement::CreateExtension { .. }
        | Statement::CreateRole { .. }
        | Statement::CreatePolicy { .. }
        | Statement::CreateDatabase { .. }
        | Statement::AlterTable { .. }
        | Statement::AlterIndex { .. }
        | Statement::AlterView { .. }
        | Statement::AlterType(_)
        | Statement::AlterRole { .. }
        | Statement::AlterSchema(_)
        | Statement::AlterPolicy { .. }
        | Statement::Drop { .. }
        | Statement::DropFunction { .. }
        | Statement::DropDomain(_)
        | Statement::DropProcedure { .. }
        | Statement::DropTrigger { .. }
        | Statement::DropExtension { .. }
        | Statement::DropPolicy { .. }
        | Statement::RenameTable(_)
        | Statement::Comment { .. }
        | Statement::Grant { .. }
        | Statement::Revoke { .. } => Ddl,
        // Anything else sqlparser knows but meridian has not classified: be safe.
        _ => MayWrite,
    }
}

/// A data-modifying CTE anywhere in WITH, or SELECT ... INTO.
fn query_writes(query: &sqlparser::ast::Query) -> bool {
    let cte_writes = query.with.as_ref().is_some_and(|w| {
        w.cte_tables
            .iter()
            .any(|cte| set_expr_writes(&cte.query.body) || query_writes(&cte.query))
    });
    cte_writes || set_expr_writes(&query.body)
}

fn set_expr_writes(body: &SetExpr) -> bool {
    match body {
        SetExpr::Insert(_) | SetExpr::Update(_) | SetExpr::Delete(_) | SetExpr::Merge(_) => true,
        SetExpr::Select(select) => select.into.is_some(),
        SetExpr::Query(q) => query_writes(q),
        SetExpr::SetOperation { left, right, .. } => {
            set_expr_writes(left) || set_expr_writes(right)
        }
        _ => false,
    }
}

/// Commands that cannot run inside a transaction block or a pipeline and
/// write no rows of replicated tables, recognised by their first words when
/// sqlparser cannot parse them: they are session commands, not row writes.
fn non_transactional_utility(text: &str) -> Option<StatementKind> {
    let words: Vec<String> = text
        .split_whitespace()
        .take(4)
        .map(|w| w.trim_end_matches(';').to_ascii_uppercase())
        .collect();
    let w = |i: usize| words.get(i).map(String::as_str).unwrap_or("");
    let utility = matches!(w(0), "VACUUM" | "REINDEX" | "CLUSTER" | "CHECKPOINT")
        || (w(0) == "ALTER" && w(1) == "SYSTEM")
        || (matches!(w(0), "CREATE" | "DROP")
            && (matches!(w(1), "DATABASE" | "TABLESPACE" | "SUBSCRIPTION")
                || w(2) == "CONCURRENTLY"
                || (w(1) == "UNIQUE" && w(3) == "CONCURRENTLY")));
    utility.then_some(StatementKind::Session)
}

/// Built-in functions known not to write. Anything else may (user functions,
/// nextval, setval, pg_advisory_lock's side effects are not writes but we do
/// not list them; being conservative only miscounts a read as a write).
const READ_ONLY_FUNCTIONS: &[&str] = &[
    "abs",
    "array_agg",
    "array_length",
    "avg",
    "bool_and",
    "bool_or",
    "ceil",
    "char_length",
    "coalesce",
    "concat",
    "count",
    "current_database",
    "current_date",
    "current_schema",
    "current_setting",
    "current_timestamp",
    "current_user",
    "date_part",
    "date_trunc",
    "exists",
    "extract",
    "floor",
    "format",
    "greatest",
    "json_agg",
    "json_build_object",
    "jsonb_agg",
    "jsonb_build_object",
    "least",
    "left",
    "length",
    "localtimestamp",
    "lower",
    "ltrim",
    "max",
    "md5",
    "min",
    "now",
    "nullif",
    "pg_backend_pid",
    "pg_sleep",
    "position",
    "random",
    "regexp_replace",
    "replace",
    "right",
    "round",
    "row_number",
    "rtrim",
    "session_user",
    "split_part",
    "sqrt",
    "statement_timestamp",
    "string_agg",
    "substr",
    "substring",
    "sum",
    "to_char",
    "to_json",
    "to_jsonb",
    "to_timestamp",
    "trim",
    "trunc",
    "upper",
    "version",
];

/// Whether the text calls a function that is not a known read-only built-in:
/// a non-keyword word (or quoted identifier) directly followed by `(`.
/// Keywords followed by `(` (IN, EXISTS, VALUES, CAST, types such as
/// NUMERIC(10,2), ...) are syntax, not calls.
fn calls_unknown_function(text: &str) -> bool {
    let Ok(tokens) = Tokenizer::new(&PostgreSqlDialect {}, text).tokenize() else {
        return true;
    };
    let mut before: Option<&Token> = None;
    let mut previous: Option<&Token> = None;
    for token in &tokens {
        if matches!(token, Token::Whitespace(_)) {
            continue;
        }
        if let (Token::LParen, Some(Token::Word(word))) = (token, previous) {
            // `AS alias (col, ...)` names columns; it is not a call.
            let after_as = matches!(before, Some(Token::Word(w)) if w.keyword == Keyword::AS);
            let is_call =
                !after_as && (word.keyword == Keyword::NoKeyword || word.quote_style.is_some());
            let name = word.value.to_ascii_lowercase();
            if (is_call || READ_ONLY_FUNCTIONS.contains(&name.as_str()))
                && !READ_ONLY_FUNCTIONS.contains(&name.as_str())
            {
                return true;
            }
        }
        before = previous;
        previous = Some(token);
    }
    false
}

/// For COPY texts sqlparser cannot parse (`COPY t FROM STDIN` without inline
/// data): FROM before TO at the top level means data comes in.
fn copy_direction(text: &str) -> Option<StatementKind> {
    let tokens = Tokenizer::new(&PostgreSqlDialect {}, text)
        .tokenize()
        .ok()?;
    let mut words = tokens.iter().filter(|t| !matches!(t, Token::Whitespace(_)));
    match words.next() {
        Some(Token::Word(w)) if w.keyword == Keyword::COPY => {}
        _ => return None,
    }
    let mut depth = 0i32;
    for token in words {
        match token {
            Token::LParen => depth += 1,
            Token::RParen => depth -= 1,
            Token::Word(w) if depth == 0 && w.keyword == Keyword::FROM => {
                return Some(StatementKind::Write)
            }
            Token::Word(w) if depth == 0 && w.keyword == Keyword::TO => {
                return Some(StatementKind::Read)
            }
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::StatementKind::*;
    use super::*;

    fn kinds(sql: &str) -> Vec<StatementKind> {
        classify(sql).kinds
    }

    #[test]
    fn reads() {
        for sql in [
            "SELECT abalance FROM pgbench_accounts WHERE aid = $1",
            "SELECT count(*), max(x) FROM t JOIN u USING (id) WHERE y IN (SELECT 1)",
            "SELECT * FROM t FOR UPDATE",
            "WITH a AS (SELECT 1) SELECT * FROM a",
            "COPY t TO STDOUT",
            "EXPLAIN DELETE FROM t",
            "SHOW search_path",
            "VALUES (1), (2)",
        ] {
            assert_eq!(kinds(sql), [Read], "{sql}");
        }
    }

    #[test]
    fn writes() {
        for sql in [
            "INSERT INTO t VALUES (1)",
            "INSERT INTO t VALUES (1) ON CONFLICT (id) DO UPDATE SET v = excluded.v",
            "UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = $2",
            "DELETE FROM t WHERE id = 1",
            "MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN UPDATE SET v = s.v",
            "TRUNCATE t, u",
            "COPY t FROM STDIN",
            "SELECT * INTO new_t FROM t",
            "WITH gone AS (DELETE FROM t RETURNING *) SELECT count(*) FROM gone",
            "WITH x AS (INSERT INTO t VALUES (1) RETURNING id) SELECT id FROM x",
            "EXPLAIN ANALYZE UPDATE t SET v = 1",
            "EXPLAIN (ANALYZE, BUFFERS) DELETE FROM t",
        ] {
            assert_eq!(kinds(sql), [Write], "{sql}");
        }
    }

    #[test]
    fn may_write() {
        for sql in [
            "CALL refresh_totals()",
            "DO $$ BEGIN INSERT INTO t VALUES (1); END $$",
            "SELECT my_function(1)",
            "SELECT nextval('s')",
            "EXECUTE stmt(1)",
            "this is not sql",
        ] {
            assert_eq!(kinds(sql), [MayWrite], "{sql}");
        }
        assert!(classify("this is not sql").unparsed);
    }

    #[test]
    fn ddl_and_non_transactional_utilities_are_not_row_writes() {
        for sql in [
            "CREATE TABLE t (id int PRIMARY KEY)",
            "CREATE INDEX CONCURRENTLY i ON t (v)",
            "CREATE UNIQUE INDEX CONCURRENTLY i ON t (v)",
            "DROP INDEX CONCURRENTLY i",
            "REINDEX TABLE CONCURRENTLY t",
            "VACUUM (VERBOSE) t",
            "CREATE DATABASE d",
            "ALTER SYSTEM SET work_mem = '8MB'",
        ] {
            assert!(!classify(sql).writes_rows(), "{sql}: {:?}", classify(sql));
        }
    }

    #[test]
    fn discard_and_deallocate_drop_prepared_statements() {
        assert!(classify("DISCARD ALL").drops_prepared);
        assert!(classify("DEALLOCATE ALL").drops_prepared);
        assert!(!classify("SELECT 1").drops_prepared);
    }

    #[test]
    fn ddl_transactions_and_session() {
        assert_eq!(kinds("CREATE TABLE t (id int PRIMARY KEY)"), [Ddl]);
        assert_eq!(kinds("ALTER TABLE t ADD COLUMN v text"), [Ddl]);
        assert_eq!(kinds("DROP TABLE t"), [Ddl]);
        assert_eq!(kinds("CREATE INDEX ON t (v)"), [Ddl]);
        assert_eq!(kinds("BEGIN"), [Transaction(TxControl::Begin)]);
        assert_eq!(
            kinds("START TRANSACTION ISOLATION LEVEL SERIALIZABLE"),
            [Transaction(TxControl::Begin)]
        );
        assert_eq!(kinds("COMMIT"), [Transaction(TxControl::Commit)]);
        assert_eq!(kinds("END"), [Transaction(TxControl::Commit)]);
        assert_eq!(kinds("ROLLBACK"), [Transaction(TxControl::Rollback)]);
        assert_eq!(
            kinds("ROLLBACK TO SAVEPOINT a"),
            [Transaction(TxControl::Savepoint)]
        );
        assert_eq!(kinds("SAVEPOINT a"), [Transaction(TxControl::Savepoint)]);
        assert_eq!(kinds("SET search_path = public"), [Session]);
        assert_eq!(kinds("LISTEN chan"), [Session]);
        assert_eq!(kinds("DISCARD ALL"), [Session]);
        assert_eq!(kinds("PREPARE p AS SELECT 1"), [Session]);
        assert_eq!(kinds("DEALLOCATE ALL"), [Session]);
    }

    #[test]
    fn multi_statement_text_and_summary() {
        let c = classify("BEGIN; UPDATE t SET v = 1; SELECT * FROM t; COMMIT;");
        assert_eq!(
            c.kinds,
            [
                Transaction(TxControl::Begin),
                Write,
                Read,
                Transaction(TxControl::Commit)
            ]
        );
        assert!(c.writes_rows());
        let c = classify("BEGIN; SELECT 1; COMMIT");
        assert!(!c.writes_rows());
        assert!(c.is_read_only());
        assert!(classify("").kinds.is_empty());
    }

    #[test]
    fn hostile_texts_are_classified_without_crashing() {
        // Deep left-nested expressions: sqlparser parses them, but walking or
        // dropping a tree this deep would overflow the stack.
        let deep = format!("SELECT {}1", "1 + ".repeat(MAX_PARSED_TEXT / 4));
        assert!(
            classify(&deep).writes_rows(),
            "too long to parse: conservatively MayWrite"
        );
        let nested = format!("SELECT {}1{}", "(".repeat(5000), ")".repeat(5000));
        let _ = classify(&nested);
        let c = classify(&format!("SELECT {}1", "1 + ".repeat(2000)));
        assert_eq!(c.kinds, [Read]);
    }

    #[test]
    fn keywords_before_parentheses_are_not_calls() {
        for sql in [
            "SELECT * FROM t WHERE id IN (1, 2) AND EXISTS (SELECT 1)",
            "SELECT CAST(x AS numeric(10, 2)) FROM t",
            "SELECT count(*) FILTER (WHERE x > 0) OVER (PARTITION BY y) FROM t",
            "SELECT * FROM (SELECT 1) AS s JOIN (VALUES (1)) AS v (n) ON true",
        ] {
            assert_eq!(kinds(sql), [Read], "{sql}");
        }
        assert_eq!(kinds("SELECT \"Audit\"(1)"), [MayWrite]);
        assert_eq!(kinds("SELECT public.bump(1)"), [MayWrite]);
    }
}
