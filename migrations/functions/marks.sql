-- Per-session and per-transaction state of meridian's functions, kept in
-- meridian.session_mark (see migrations/0013_session_marks.sql for why not
-- in custom settings). A mark belongs to the backend (pid) and, when read
-- with this_transaction, only counts in the transaction that wrote it (a
-- mark from an earlier transaction of the same session, or of an earlier
-- session that had the same pid, is ignored). Marks are rows, so a rolled
-- back transaction or savepoint takes its marks with it.
--
-- Re-applied by every `meridian migrate`; see migrations/README.md.

CREATE OR REPLACE FUNCTION meridian.mark(what text, value text) RETURNS void
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$
    INSERT INTO meridian.session_mark AS m (pid, what, xid, value)
    VALUES (pg_backend_pid(), what, pg_current_xact_id(), value)
    ON CONFLICT (pid, what) DO UPDATE SET xid = EXCLUDED.xid, value = EXCLUDED.value
$$;

CREATE OR REPLACE FUNCTION meridian.marked(what text, this_transaction bool) RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT m.value FROM meridian.session_mark m
     WHERE m.pid = pg_backend_pid() AND m.what = marked.what
       AND (NOT this_transaction OR m.xid = pg_current_xact_id_if_assigned())
$$;

CREATE OR REPLACE FUNCTION meridian.unmark(what text) RETURNS void
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$
    DELETE FROM meridian.session_mark m WHERE m.pid = pg_backend_pid() AND m.what = unmark.what
$$;

-- Brackets meridian's own schema changes (installing capture on a table,
-- aligning a sequence), so the event triggers leave them alone; nests.
CREATE OR REPLACE FUNCTION meridian.own_ddl(entering bool) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    depth int := coalesce(meridian.marked('own_ddl', true)::int, 0)
                 + CASE WHEN entering THEN 1 ELSE -1 END;
BEGIN
    IF depth > 0 THEN
        PERFORM meridian.mark('own_ddl', depth::text);
    ELSE
        PERFORM meridian.unmark('own_ddl');
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION meridian.in_own_ddl() RETURNS bool
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT coalesce(meridian.marked('own_ddl', true)::int, 0) > 0
$$;
