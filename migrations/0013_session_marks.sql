-- What meridian's own functions remember within a session or a transaction
-- (that a schema change is meridian's own, that a DROP removed a replicated
-- object, a transaction's stamp, where a query of several statements has got
-- to). Until December 2026 these were custom settings (meridian.in_capture,
-- meridian.dropped_replicated, meridian.tx_stamp, meridian.ddl_statements),
-- and any role may set any custom setting: SET meridian.in_capture = on made
-- a table created next go uncaptured, and a forged meridian.ddl_statements
-- made another statement's text ship as the schema change. Only meridian's
-- owner may write this table (its functions that use it run as the owner);
-- unlogged, because nothing in it outlives a session.
CREATE UNLOGGED TABLE meridian.session_mark (
    pid   int4 NOT NULL,
    what  text NOT NULL,
    xid   xid8 NOT NULL,
    value text NOT NULL,
    PRIMARY KEY (pid, what)
);
COMMENT ON TABLE meridian.session_mark IS
    'Per-session state of meridian''s functions, keyed by backend pid; written only by them.';
