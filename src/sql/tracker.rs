//! Per-session statement tracking: what each Query, Parse and Bind a client
//! sends will do, fed by the relay from the bodies its scanner captures.
//!
//! Prepared statements are classified once, at Parse, and looked up by name at
//! each Bind, so an execution costs a hash lookup. The counts are shown by `/status` and `/metrics`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::{statements, StatementKind};

/// Named statements remembered per session. Beyond this, statements are not
/// remembered and their executions count as `MayWrite` (conservative).
pub const MAX_NAMED_STATEMENTS: usize = 10_000;

/// Statement counts by kind, shared by all sessions of a proxy.
#[derive(Debug, Default)]
pub struct StatementCounts {
    pub read: AtomicU64,
    pub write: AtomicU64,
    pub ddl: AtomicU64,
    pub transaction: AtomicU64,
    pub session: AtomicU64,
    pub may_write: AtomicU64,
}

impl StatementCounts {
    fn count(&self, kind: StatementKind) {
        let counter = match kind {
            StatementKind::Read => &self.read,
            StatementKind::Write => &self.write,
            StatementKind::Ddl => &self.ddl,
            StatementKind::Transaction => &self.transaction,
            StatementKind::Session => &self.session,
            StatementKind::MayWrite => &self.may_write,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// (name, count) pairs for reporting.
    pub fn snapshot(&self) -> [(&'static str, u64); 6] {
        let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
        [
            ("read", n(&self.read)),
            ("write", n(&self.write)),
            ("ddl", n(&self.ddl)),
            ("transaction", n(&self.transaction)),
            ("session", n(&self.session)),
            ("may_write", n(&self.may_write)),
        ]
    }
}

pub struct StatementTracker {
    counts: Arc<StatementCounts>,
    /// Prepared statements by name ("" is the unnamed statement).
    prepared: HashMap<Box<[u8]>, StatementKind>,
}

impl StatementTracker {
    pub fn new(counts: Arc<StatementCounts>) -> StatementTracker {
        StatementTracker {
            counts,
            prepared: HashMap::new(),
        }
    }

    /// A simple Query's text: each of its statements classified and counted now.
    pub fn on_query(&mut self, text: &[u8]) {
        for s in statements(text) {
            self.counts.count(s.kind);
            if s.drops_prepared {
                self.prepared.clear();
            }
        }
    }

    /// Parse: classified once and remembered under the statement's name.
    pub fn on_parse(&mut self, name: &[u8], text: &[u8]) {
        let kind = statements(text)
            .next()
            .map_or(StatementKind::MayWrite, |s| s.kind);
        if self.prepared.len() < MAX_NAMED_STATEMENTS
            || name.is_empty()
            || self.prepared.contains_key(name)
        {
            self.prepared.insert(name.into(), kind);
        }
    }

    /// Bind of a statement (by name; `None`: its body was cut short):
    /// counted as one execution.
    pub fn on_bind(&mut self, statement: Option<&[u8]>) {
        let kind = statement
            .and_then(|s| self.prepared.get(s))
            .copied()
            .unwrap_or(StatementKind::MayWrite);
        self.counts.count(kind);
    }

    /// Close of a statement forgets it.
    pub fn on_close_statement(&mut self, name: &[u8]) {
        self.prepared.remove(name);
    }

    pub fn prepared_len(&self) -> usize {
        self.prepared.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tracker() -> (StatementTracker, Arc<StatementCounts>) {
        let counts = Arc::new(StatementCounts::default());
        (StatementTracker::new(counts.clone()), counts)
    }

    #[test]
    fn prepared_statements_are_classified_at_parse_and_counted_at_bind() {
        let (mut t, counts) = tracker();
        t.on_parse(b"upd", b"UPDATE t SET v = $1 WHERE id = $2");
        t.on_parse(b"", b"SELECT v FROM t WHERE id = $1");
        for _ in 0..3 {
            t.on_bind(Some(b"upd"));
        }
        t.on_bind(Some(b""));
        assert_eq!(counts.write.load(Ordering::Relaxed), 3);
        assert_eq!(counts.read.load(Ordering::Relaxed), 1);
        // An unknown statement name, or a Bind cut short, counts as may-write.
        t.on_bind(Some(b"never_parsed"));
        t.on_bind(None);
        assert_eq!(counts.may_write.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn close_and_discard_forget_statements() {
        let (mut t, _) = tracker();
        t.on_parse(b"a", b"SELECT 1");
        t.on_parse(b"b", b"SELECT 2");
        t.on_close_statement(b"a");
        assert_eq!(t.prepared_len(), 1);
        t.on_query(b"DISCARD ALL");
        assert_eq!(t.prepared_len(), 0);
    }

    #[test]
    fn simple_queries_count_each_statement_whatever_their_encoding() {
        let (mut t, counts) = tracker();
        t.on_query(b"BEGIN; INSERT INTO t VALUES (1); COMMIT;");
        assert_eq!(counts.transaction.load(Ordering::Relaxed), 2);
        assert_eq!(counts.write.load(Ordering::Relaxed), 1);
        t.on_query(b"SELECT '\xe9t\xe9' FROM t");
        assert_eq!(counts.read.load(Ordering::Relaxed), 1);
    }
}
