//! sql: the class of each statement the relay forwards (read, write,
//! schema, transaction control, session, or may-write), for the statement
//! counts in `/status` and `/metrics`. Nothing else depends on it: capture
//! reads every change from the WAL, so the relay decides nothing by what a
//! statement does.
//!
//! A statement is classed by its leading keywords and a scan of its words
//! ([`lex`]), not by a parse: the relay runs this on every simple Query, and
//! texts that carry their values as literals (psycopg, Django, psql) are new
//! to a cache every time. Parsing each with sqlparser made meridian use
//! three times PgBouncer's CPU per query on `pgbench -S -M simple`
//! (BENCHMARKS.md). The price is precision where only a parse could tell:
//! a SELECT calling a function that writes counts as a read.

pub mod guard;
mod lex;
mod tracker;

pub use tracker::{StatementCounts, StatementTracker};

use lex::{Lexer, Token};

/// What one statement does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StatementKind {
    /// Reads: SELECT, VALUES, TABLE, SHOW, COPY ... TO, EXPLAIN without ANALYZE.
    Read,
    /// Changes rows: INSERT, UPDATE, DELETE, MERGE, TRUNCATE, COPY ... FROM,
    /// SELECT ... INTO, data-modifying WITH, EXPLAIN ANALYZE of a write.
    Write,
    /// Changes the schema: CREATE/ALTER/DROP, GRANT/REVOKE, COMMENT.
    Ddl,
    /// BEGIN/START, COMMIT/END, ROLLBACK/ABORT, SAVEPOINT, RELEASE, PREPARE TRANSACTION.
    Transaction,
    /// Session state and utilities: SET, RESET, PREPARE, DEALLOCATE, DISCARD,
    /// LISTEN, NOTIFY, cursors, LOCK, VACUUM, ANALYZE, CREATE DATABASE, ALTER SYSTEM.
    Session,
    /// Could write, cannot tell: CALL, DO, EXECUTE, and anything not known.
    MayWrite,
}

/// One statement of a text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Statement {
    pub kind: StatementKind,
    /// DISCARD ALL / DISCARD PLANS / DEALLOCATE: drops server-side prepared statements.
    pub drops_prepared: bool,
}

/// The statements of a text (a simple Query may hold several), in order.
/// Empty statements (`;;`) are skipped. Never fails; bytes that are not
/// UTF-8 only ever land inside words or literals.
pub fn statements(text: &[u8]) -> impl Iterator<Item = Statement> + '_ {
    let mut lexer = Lexer::new(text);
    std::iter::from_fn(move || loop {
        let mut seen = Seen::default();
        let ended = seen.read(&mut lexer);
        if let Some(statement) = seen.statement() {
            return Some(statement);
        }
        if !ended {
            return None;
        }
    })
}

/// The kinds of the statements of a text.
pub fn classify(text: &str) -> Vec<StatementKind> {
    statements(text.as_bytes()).map(|s| s.kind).collect()
}

fn is(word: &[u8], keyword: &str) -> bool {
    word.eq_ignore_ascii_case(keyword.as_bytes())
}

fn is_any(word: &[u8], keywords: &[&str]) -> bool {
    keywords.iter().any(|k| is(word, k))
}

/// Which of a statement's later words its first word makes worth looking
/// at: for most statements none (the relay runs this on every Query).
#[derive(Default, Clone, Copy)]
enum Lead {
    Select,
    Copy,
    WithOrExplain,
    #[default]
    Other,
}

/// What the classification needs from one statement's words.
#[derive(Default)]
struct Seen<'a> {
    first: Option<&'a [u8]>,
    lead: Lead,
    second: Option<&'a [u8]>,
    /// COPY: whether FROM (true) or TO (false) came first at the top level.
    copy_from: Option<bool>,
    /// SELECT: INTO at the top level before FROM.
    select_into: bool,
    top_level_from: bool,
    /// INSERT, UPDATE, DELETE or MERGE anywhere, not as FOR [NO KEY] UPDATE.
    modifies: bool,
    analyze: bool,
}

impl<'a> Seen<'a> {
    /// Reads one statement's tokens; false when the text ended (no `;`).
    fn read(&mut self, lexer: &mut Lexer<'a>) -> bool {
        let (mut depth, mut previous): (u32, Option<&[u8]>) = (0, None);
        for token in lexer.by_ref() {
            match token {
                Token::Semicolon if depth == 0 => return true,
                Token::Open => depth += 1,
                Token::Close => depth = depth.saturating_sub(1),
                Token::Word(w) => {
                    self.word(w, depth == 0, previous);
                    previous = Some(w);
                }
                _ => {}
            }
        }
        false
    }

    fn word(&mut self, w: &'a [u8], top: bool, previous: Option<&[u8]>) {
        if self.first.is_none() {
            self.first = Some(w);
            self.lead = match w {
                w if is(w, "SELECT") => Lead::Select,
                w if is(w, "COPY") => Lead::Copy,
                w if is_any(w, &["WITH", "EXPLAIN"]) => Lead::WithOrExplain,
                _ => Lead::Other,
            };
            return;
        }
        if self.second.is_none() {
            self.second = Some(w);
        }
        match self.lead {
            Lead::Select if top => {
                if is(w, "FROM") {
                    self.top_level_from = true;
                } else if is(w, "INTO") && !self.top_level_from {
                    self.select_into = true;
                }
            }
            Lead::Copy if top && self.copy_from.is_none() && (is(w, "FROM") || is(w, "TO")) => {
                self.copy_from = Some(is(w, "FROM"));
            }
            Lead::WithOrExplain => {
                let locking = previous.is_some_and(|p| is_any(p, &["FOR", "KEY"]));
                if is_any(w, &["INSERT", "UPDATE", "DELETE", "MERGE"]) && !locking {
                    self.modifies = true;
                }
                if is(w, "ANALYZE") {
                    self.analyze = true;
                }
            }
            _ => {}
        }
    }

    fn statement(&self) -> Option<Statement> {
        let first = self.first?;
        let second = self.second.unwrap_or_default();
        let drops_prepared =
            is(first, "DEALLOCATE") || (is(first, "DISCARD") && is_any(second, &["ALL", "PLANS"]));
        Some(Statement {
            kind: self.kind(first, second),
            drops_prepared,
        })
    }

    fn kind(&self, first: &[u8], second: &[u8]) -> StatementKind {
        use StatementKind::*;
        const WRITES: &[&str] = &["INSERT", "UPDATE", "DELETE", "MERGE", "TRUNCATE"];
        const READS: &[&str] = &["VALUES", "TABLE", "SHOW"];
        const SCHEMA: &[&str] = &[
            "COMMENT", "GRANT", "REVOKE", "REFRESH", "SECURITY", "IMPORT", "REASSIGN",
        ];
        const TRANSACTION: &[&str] = &[
            "BEGIN",
            "START",
            "COMMIT",
            "END",
            "ROLLBACK",
            "ABORT",
            "SAVEPOINT",
            "RELEASE",
        ];
        const SESSION: &[&str] = &[
            "SET",
            "RESET",
            "DEALLOCATE",
            "DISCARD",
            "LISTEN",
            "UNLISTEN",
            "NOTIFY",
            "DECLARE",
            "FETCH",
            "MOVE",
            "CLOSE",
            "LOCK",
            "VACUUM",
            "ANALYZE",
            "CLUSTER",
            "REINDEX",
            "CHECKPOINT",
            "LOAD",
        ];
        match first {
            w if is(w, "SELECT") => {
                if self.select_into {
                    Write
                } else {
                    Read
                }
            }
            w if is(w, "WITH") => {
                if self.modifies {
                    Write
                } else {
                    Read
                }
            }
            w if is(w, "EXPLAIN") => {
                if self.analyze && self.modifies {
                    Write
                } else {
                    Read
                }
            }
            w if is(w, "COPY") => match self.copy_from {
                Some(true) => Write,
                Some(false) => Read,
                None => MayWrite,
            },
            w if is_any(w, WRITES) => Write,
            w if is_any(w, READS) => Read,
            w if is_any(w, &["CREATE", "DROP"]) => {
                if is_any(second, &["DATABASE", "TABLESPACE", "SUBSCRIPTION"]) {
                    Session
                } else {
                    Ddl
                }
            }
            w if is(w, "ALTER") => {
                if is(second, "SYSTEM") {
                    Session
                } else {
                    Ddl
                }
            }
            w if is_any(w, SCHEMA) => Ddl,
            w if is_any(w, TRANSACTION) => Transaction,
            w if is(w, "PREPARE") => {
                if is(second, "TRANSACTION") {
                    Transaction
                } else {
                    Session
                }
            }
            w if is_any(w, SESSION) => Session,
            _ => MayWrite,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::StatementKind::*;
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn reads() {
        for sql in [
            "SELECT abalance FROM pgbench_accounts WHERE aid = $1",
            "select count(*), max(x) FROM t JOIN u USING (id) WHERE y IN (SELECT 1)",
            "SELECT * FROM t FOR UPDATE",
            "SELECT * FROM t FOR NO KEY UPDATE",
            "WITH a AS (SELECT 1) SELECT * FROM a",
            "COPY t TO STDOUT",
            "COPY (SELECT * FROM t) TO STDOUT",
            "EXPLAIN DELETE FROM t",
            "EXPLAIN ANALYZE SELECT 1",
            "SHOW search_path",
            "VALUES (1), (2)",
            "(SELECT 1) UNION (SELECT 2)",
            "\n  -- a comment first\n SELECT 1",
            "/* ORM */ SELECT 'UPDATE t' FROM t",
            "SELECT my_function(1)",
        ] {
            assert_eq!(classify(sql), [Read], "{sql}");
        }
    }

    #[test]
    fn writes() {
        for sql in [
            "INSERT INTO t VALUES (1)",
            "INSERT INTO t VALUES (1) ON CONFLICT (id) DO UPDATE SET v = excluded.v",
            "UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = $2",
            "delete from t where id = 1",
            "MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN UPDATE SET v = s.v",
            "TRUNCATE t, u",
            "COPY t FROM STDIN",
            "COPY t (a, b) FROM STDIN WITH (FORMAT csv)",
            "SELECT * INTO new_t FROM t",
            "WITH gone AS (DELETE FROM t RETURNING *) SELECT count(*) FROM gone",
            "WITH x AS (INSERT INTO t VALUES (1) RETURNING id) SELECT id FROM x",
            "EXPLAIN ANALYZE UPDATE t SET v = 1",
            "EXPLAIN (ANALYZE, BUFFERS) DELETE FROM t",
        ] {
            assert_eq!(classify(sql), [Write], "{sql}");
        }
    }

    #[test]
    fn may_write() {
        for sql in [
            "CALL refresh_totals()",
            "DO $$ BEGIN INSERT INTO t VALUES (1); END $$",
            "EXECUTE stmt(1)",
            "this is not sql",
        ] {
            assert_eq!(classify(sql), [MayWrite], "{sql}");
        }
    }

    #[test]
    fn schema_transactions_and_session() {
        for (sql, kind) in [
            ("CREATE TABLE t (id int PRIMARY KEY)", Ddl),
            ("ALTER TABLE t ADD COLUMN v text", Ddl),
            ("DROP TABLE t", Ddl),
            ("CREATE UNIQUE INDEX CONCURRENTLY i ON t (v)", Ddl),
            ("COMMENT ON TABLE t IS 'x'", Ddl),
            ("GRANT SELECT ON t TO app", Ddl),
            ("BEGIN", Transaction),
            (
                "START TRANSACTION ISOLATION LEVEL SERIALIZABLE",
                Transaction,
            ),
            ("COMMIT", Transaction),
            ("END", Transaction),
            ("ROLLBACK TO SAVEPOINT a", Transaction),
            ("PREPARE TRANSACTION 'x'", Transaction),
            ("SET search_path = public", Session),
            ("LISTEN chan", Session),
            ("PREPARE p AS SELECT 1", Session),
            ("VACUUM (VERBOSE) t", Session),
            ("REINDEX TABLE CONCURRENTLY t", Session),
            ("CREATE DATABASE d", Session),
            ("ALTER SYSTEM SET work_mem = '8MB'", Session),
        ] {
            assert_eq!(classify(sql), [kind], "{sql}");
        }
    }

    #[test]
    fn discard_and_deallocate_drop_prepared_statements() {
        let drops = |sql: &str| statements(sql.as_bytes()).any(|s| s.drops_prepared);
        assert!(drops("DISCARD ALL"));
        assert!(drops("discard plans"));
        assert!(drops("DEALLOCATE ALL"));
        assert!(!drops("DISCARD TEMP"));
        assert!(!drops("SELECT 1"));
    }

    #[test]
    fn a_text_of_several_statements() {
        assert_eq!(
            classify("BEGIN; UPDATE t SET v = ';'; SELECT * FROM t; COMMIT;"),
            [Transaction, Write, Read, Transaction]
        );
        assert_eq!(
            classify("CREATE FUNCTION f() RETURNS int LANGUAGE sql AS $$ SELECT 1; $$; SELECT f()"),
            [Ddl, Read]
        );
        assert!(classify("").is_empty());
        assert!(classify(" ; ;\n-- nothing\n").is_empty());
    }

    #[test]
    fn hostile_texts_are_classified_without_crashing() {
        let nested = format!("SELECT {}1{}", "(".repeat(100_000), ")".repeat(100_000));
        assert_eq!(classify(&nested), [Read]);
        let unbalanced = ")".repeat(1000) + "; SELECT 1";
        assert_eq!(classify(&unbalanced), [Read]);
        let comments = "/*".repeat(100_000);
        assert!(classify(&comments).is_empty());
    }

    proptest! {
        #[test]
        fn any_bytes_are_classified(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let n = statements(&bytes).count();
            prop_assert!(n <= bytes.len());
        }

        #[test]
        fn statements_joined_by_semicolons_are_counted_one_each(
            parts in proptest::collection::vec(
                prop_oneof![
                    Just("SELECT 'a;b'"), Just("UPDATE t SET v = $$;$$"), Just("BEGIN"),
                    Just("INSERT INTO \"x;y\" VALUES (1) -- ;\n"), Just("/* ; */ COMMIT"),
                ],
                1..8,
            )
        ) {
            let text = parts.join(";");
            prop_assert_eq!(statements(text.as_bytes()).count(), parts.len());
        }
    }
}
