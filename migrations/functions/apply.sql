-- Applying other regions' changes. A receiving region applies many batches
-- of an origin's changes in one transaction, together with the position it
-- has applied up to for that origin (meridian.applied, advance_applied), so a
-- restart resumes exactly there: nothing lost, nothing applied twice.
--
-- Conflicts are decided row by row by version, last writer wins: a change
-- whose (hlc, origin) is not above the row's current version in
-- meridian.row_version is skipped. Deletes leave their version behind as a
-- tombstone (row_version.deleted), so a late, older insert or update cannot
-- bring a deleted row back. An update of a row this region does not have yet
-- (its insert comes from a third region, later) inserts the full row image it
-- carries; a delete of a missing row only records the tombstone. Whatever the
-- arrival order, every region ends with the row of the highest version.
-- Tables with other rules are decided by the rule engine (engine.sql).
--
-- Applied changes are not captured again: apply sessions carry a replication
-- origin (apply_session_setup) and capture drops transactions that have one.
-- Applies run with session_replication_role = replica, so ordinary triggers
-- and foreign-key checks do not fire for applied rows, on purpose: a child
-- can come before its parent within a batch, and requiring order there would
-- stall replication. Orphans left by a concurrent delete of a parent in
-- another region are a matter for the conflict rules (handle_orphans).
--
-- A change that cannot be applied (its table does not exist here yet, a type
-- or constraint error) is not dropped and does not block anything else: it is
-- kept in meridian.held with the error, and the batch goes on (a deadlock or
-- serialization failure aborts the whole batch instead; the receiver retries
-- it). src/replication/held.rs tries them again.
--
-- Re-applied by every `meridian migrate` (CREATE OR REPLACE, with
-- check_function_bodies off, after the versioned migrations): each of
-- meridian's functions is defined here and nowhere else. See
-- migrations/README.md.

-- Marks this session's transactions as applied by meridian, so capture
-- does not ship them again: the session takes a replication origin of this
-- database (meridian_<database oid>_<n>, n = 1..16; names and their state
-- are cluster-wide, and Postgres 15 lets one session at a time use an
-- origin, so each concurrent apply session needs its own).
CREATE OR REPLACE FUNCTION meridian.apply_session_setup() RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    base text := (SELECT 'meridian_' || d.oid || '_' FROM pg_database d WHERE d.datname = current_database());
    name text;
BEGIN
    IF pg_replication_origin_session_is_setup() THEN
        RETURN;
    END IF;
    FOR i IN 1..16 LOOP
        name := base || i;
        BEGIN
            IF pg_replication_origin_oid(name) IS NULL THEN
                PERFORM pg_replication_origin_create(name);
            END IF;
            PERFORM pg_replication_origin_session_setup(name);
            RETURN;
        EXCEPTION WHEN object_in_use OR unique_violation THEN
            NULL;   -- another apply session has this one: try the next
        END;
    END LOOP;
    RAISE EXCEPTION 'all 16 replication origins for meridian''s apply sessions in this database are in use'
        USING ERRCODE = '53400';
END
$$;


-- Makes the local state an apply decides on exact. Capture records a local
-- transaction a moment after it commits, so before comparing a peer's
-- changes with the local rows' versions, the apply session (1) locks the
-- rows it will decide on (FOR UPDATE; from then on no local transaction can
-- change them until it commits), or, when some of a table's keys have no
-- row here (inserts, tombstones), the whole table against local writes
-- (SHARE ROW EXCLUSIVE, for the rest of its transaction), and then (2)
-- waits until capture has recorded every transaction committed before
-- (src/capture/wal.rs, Barrier). Insert-only tables need neither: their
-- keys are made per region and never meet.
CREATE OR REPLACE FUNCTION meridian.lock_keys(changes jsonb) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    t   text;
    pks jsonb;
BEGIN
    -- As every apply does: an apply that deadlocks with a local transaction
    -- is the one to give way (and is retried), and quickly.
    PERFORM set_config('deadlock_timeout', '20ms', true);
    FOR t, pks IN
        SELECT c ->> 'tbl', jsonb_agg(DISTINCT c -> 'pk')
          FROM jsonb_array_elements(changes) AS c
         WHERE c ->> 'op' IN ('I', 'U', 'D') AND jsonb_typeof(c -> 'pk') = 'object'
         GROUP BY 1 ORDER BY 1
    LOOP
        CONTINUE WHEN to_regclass(t) IS NULL
                   OR EXISTS (SELECT 1 FROM meridian.replicated_table r WHERE r.tbl = t AND r.insert_only);
        PERFORM meridian.lock_for_apply(t, pks);
    END LOOP;
END
$$;


-- The column lists the apply statements are built from, for table rel:
-- its primary key (plain, and prefixed t. and d.; NULL without a key), and
-- every stored column (plain, and as EXCLUDED.col).
CREATE OR REPLACE FUNCTION meridian.apply_columns(rel regclass,
                                       OUT key_cols text, OUT t_keys text, OUT d_keys text,
                                       OUT all_cols text, OUT on_conflict text)
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    WITH pk AS (
        SELECT a.attname, k.ord
          FROM pg_index i
          CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
          JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
         WHERE i.indrelid = rel AND i.indisprimary),
    cols AS (
        SELECT attname, attnum, attidentity
          FROM pg_attribute
         WHERE attrelid = rel AND attnum > 0 AND NOT attisdropped AND attgenerated = '')
    SELECT (SELECT string_agg(quote_ident(attname), ', ' ORDER BY ord) FROM pk),
           (SELECT string_agg('t.' || quote_ident(attname), ', ' ORDER BY ord) FROM pk),
           (SELECT string_agg('d.' || quote_ident(attname), ', ' ORDER BY ord) FROM pk),
           (SELECT string_agg(quote_ident(attname), ', ' ORDER BY attnum) FROM cols),
           (SELECT CASE WHEN count(*) = 0 THEN 'DO NOTHING'
                        ELSE format('DO UPDATE SET (%s) = ROW(%s)',
                                    string_agg(quote_ident(attname), ', ' ORDER BY attnum),
                                    string_agg('EXCLUDED.' || quote_ident(attname), ', ' ORDER BY attnum))
                   END
              FROM cols WHERE attidentity <> 'a')
$$;


-- rel's name as meridian's tables record it: format('%I.%I', schema, table).
CREATE OR REPLACE FUNCTION meridian.table_name(rel regclass) RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT format('%I.%I', n.nspname, c.relname)
      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE c.oid = rel
$$;


-- The batch and per-table apply of the first design (every decision in
-- PL/pgSQL over the batch as one jsonb) are superseded by the receiver's
-- apply in Rust (src/replication/apply.rs, set_wise.rs).
DROP FUNCTION IF EXISTS meridian.apply_batch(int, jsonb);
DROP FUNCTION IF EXISTS meridian.apply_table(text, jsonb, int);


-- Applies changes (a JSON array, in stream order) one at a time, each in a
-- subtransaction of its own: one that fails is kept in meridian.held with
-- its error and the others go on (a deadlock or serialization failure
-- aborts them all: the receiver retries). Does not record a position; the
-- caller does. Returns {"applied", "older", "held"}.
CREATE OR REPLACE FUNCTION meridian.apply_each(origin int, changes jsonb) RETURNS jsonb
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    c jsonb;
    n_applied int := 0;
    n_older int := 0;
    n_held int := 0;
BEGIN
    PERFORM set_config('session_replication_role', 'replica', true);
    FOR c IN SELECT value FROM jsonb_array_elements(changes) LOOP
        BEGIN
            IF meridian.apply_one(c, apply_each.origin) = 'applied' THEN
                n_applied := n_applied + 1;
            ELSE
                n_older := n_older + 1;
            END IF;
        EXCEPTION
            WHEN deadlock_detected OR serialization_failure THEN
                RAISE;
            WHEN OTHERS THEN
                PERFORM meridian.hold(apply_each.origin, jsonb_build_array(c), SQLERRM, SQLSTATE);
                n_held := n_held + 1;
        END;
    END LOOP;
    RETURN jsonb_build_object('applied', n_applied, 'older', n_older, 'held', n_held);
END
$$;


-- What the receiver's set-wise apply (src/replication/apply.rs) needs to
-- know of each table it writes, in one call: whether it exists, its column
-- lists (apply_columns), its stored columns' names and which are json or
-- jsonb (for COPY), its counters and whether a foreign key touches it
-- (orphans are looked for).
CREATE OR REPLACE FUNCTION meridian.apply_tables(tbls text[])
RETURNS TABLE (tbl text, present bool, key_cols text, t_keys text, d_keys text, all_cols text,
               on_conflict text, columns text[], json bool[], counters text[], has_fk bool)
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT t.tbl, t.rel IS NOT NULL, c.key_cols, c.t_keys, c.d_keys, c.all_cols, c.on_conflict,
           (SELECT array_agg(a.attname::text ORDER BY a.attnum) FROM pg_attribute a
             WHERE a.attrelid = t.rel AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''),
           -- json or jsonb (or a domain over them): the image holds their JSON as is.
           (SELECT array_agg(coalesce(nullif(ty.typbasetype, 0), ty.oid) IN (114, 3802) ORDER BY a.attnum)
              FROM pg_attribute a JOIN pg_type ty ON ty.oid = a.atttypid
             WHERE a.attrelid = t.rel AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''),
           coalesce(r.counters, '{}'),
           EXISTS (SELECT 1 FROM pg_constraint k WHERE k.contype = 'f' AND t.rel IN (k.conrelid, k.confrelid))
      FROM (SELECT x.tbl, to_regclass(x.tbl) AS rel FROM unnest(tbls) AS x(tbl)) t
      LEFT JOIN meridian.replicated_table r ON r.tbl = t.tbl
      LEFT JOIN LATERAL meridian.apply_columns(t.rel) c ON t.rel IS NOT NULL
$$;


-- Locks what an apply will decide on in table tbl, for the keys pks (a
-- JSON array of key objects): the rows that exist, in key order (FOR
-- UPDATE), and, when some key has no row, the table against local writes
-- (SHARE ROW EXCLUSIVE) so none can appear. Returns the 1-based positions
-- in pks of the keys that have a row. (As lock_keys, for one table.)
CREATE OR REPLACE FUNCTION meridian.lock_for_apply(tbl text, pks jsonb) RETURNS SETOF bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    rel regclass := to_regclass(tbl);
    t_cols text;
    d_cols text;
    i bigint;
    n bigint := 0;
BEGIN
    SELECT string_agg(format('t.%I', a.attname), ', ' ORDER BY k.ord),
           string_agg(format('d.%I', a.attname), ', ' ORDER BY k.ord)
      INTO t_cols, d_cols
      FROM pg_index x
      CROSS JOIN LATERAL unnest(x.indkey) WITH ORDINALITY AS k(attnum, ord)
      JOIN pg_attribute a ON a.attrelid = x.indrelid AND a.attnum = k.attnum
     WHERE x.indrelid = rel AND x.indisprimary;
    IF t_cols IS NULL THEN
        RETURN;
    END IF;
    FOR i IN EXECUTE format(
        'SELECT e.ord FROM jsonb_array_elements($1) WITH ORDINALITY AS e(j, ord)
           CROSS JOIN LATERAL jsonb_populate_record(NULL::%1$s, e.j) AS d
           JOIN %1$s t ON (%2$s) = (%3$s)
          ORDER BY %2$s FOR UPDATE OF t', rel, t_cols, d_cols)
        USING pks
    LOOP
        n := n + 1;
        RETURN NEXT i;
    END LOOP;
    IF n < jsonb_array_length(pks) THEN
        EXECUTE format('LOCK TABLE %s IN SHARE ROW EXCLUSIVE MODE', rel);
    END IF;
END
$$;


-- Applies one change under last-writer-wins. Returns 'applied' or 'older'.
CREATE OR REPLACE FUNCTION meridian.apply_change(tbl text, op "char", pk jsonb, new_row jsonb,
                                      hlc bigint, origin int) RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    rel regclass := CASE WHEN op = 'S' THEN NULL ELSE apply_change.tbl::regclass END;
    cur meridian.row_version;
    key_cols text;
    all_cols text;
    on_conflict text;
BEGIN
    IF op = 'S' THEN
        PERFORM meridian.apply_ddl(new_row);
        RETURN 'applied';
    END IF;
    IF op = 'T' THEN
        -- TRUNCATE: every row whose version is older than the truncate goes;
        -- rows written later (in any region) stay.
        SELECT string_agg(format('t.%I', a.attname), ', ' ORDER BY k.ord)
          INTO key_cols
          FROM pg_index i
          CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
          JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
         WHERE i.indrelid = rel AND i.indisprimary;
        IF key_cols IS NULL THEN
            EXECUTE format('DELETE FROM %s', rel);
        ELSE
            EXECUTE format(
                'DELETE FROM %s t WHERE NOT EXISTS (SELECT 1 FROM meridian.row_version v
                   WHERE v.tbl = $1 AND v.pk = to_jsonb(t) - (SELECT array_agg(c) FROM jsonb_object_keys(to_jsonb(t)) c
                                                              WHERE c <> ALL (string_to_array($4, '','')))
                     AND (v.hlc, v.origin) > ($2, $3))',
                rel)
            USING apply_change.tbl, hlc, origin,
                  (SELECT string_agg(a.attname, ',') FROM pg_index i
                     CROSS JOIN LATERAL unnest(i.indkey) AS k(attnum)
                     JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
                    WHERE i.indrelid = rel AND i.indisprimary);
            UPDATE meridian.row_version v SET hlc = apply_change.hlc, origin = apply_change.origin, deleted = true
             WHERE v.tbl = apply_change.tbl AND (v.hlc, v.origin) < (apply_change.hlc, apply_change.origin);
        END IF;
        RETURN 'applied';
    END IF;

    SELECT c.key_cols, c.all_cols, c.on_conflict INTO key_cols, all_cols, on_conflict
      FROM meridian.apply_columns(rel) c;

    -- Locks in the order local writes take them: the table's row first (a
    -- local UPDATE/DELETE holds it when its capture trigger upserts the row
    -- version), then the row version. The other order deadlocks.
    IF key_cols IS NOT NULL THEN
        EXECUTE format('SELECT 1 FROM %s WHERE (%s) = (SELECT %s FROM jsonb_populate_record(NULL::%s, $1)) FOR UPDATE',
                       rel, key_cols, key_cols, rel)
        USING pk;
    END IF;
    SELECT * INTO cur FROM meridian.row_version v
     WHERE v.tbl = apply_change.tbl AND v.pk = apply_change.pk
       FOR UPDATE;
    IF FOUND AND (cur.hlc, cur.origin) >= (apply_change.hlc, apply_change.origin) THEN
        RETURN 'older';
    END IF;

    IF op = 'D' THEN
        IF key_cols IS NOT NULL THEN
            EXECUTE format('DELETE FROM %s WHERE (%s) = (SELECT %s FROM jsonb_populate_record(NULL::%s, $1))',
                           rel, key_cols, key_cols, rel)
            USING pk;
        END IF;
    ELSE
        IF key_cols IS NULL THEN
            -- Insert-only table: each row arrives once.
            EXECUTE format('INSERT INTO %s (%s) OVERRIDING SYSTEM VALUE SELECT %s FROM jsonb_populate_record(NULL::%s, $1)',
                           rel, all_cols, all_cols, rel)
            USING new_row;
        ELSE
            EXECUTE format('INSERT INTO %s (%s) OVERRIDING SYSTEM VALUE SELECT %s FROM jsonb_populate_record(NULL::%s, $1)
                            ON CONFLICT (%s) %s',
                           rel, all_cols, all_cols, rel, key_cols, on_conflict)
            USING new_row;
        END IF;
    END IF;

    INSERT INTO meridian.row_version AS v (tbl, pk, hlc, origin, deleted)
    VALUES (apply_change.tbl, apply_change.pk, apply_change.hlc, apply_change.origin, op = 'D')
    ON CONFLICT (tbl, pk) DO UPDATE
       SET hlc = excluded.hlc, origin = excluded.origin, deleted = excluded.deleted;
    RETURN 'applied';
END
$$;


-- One change (an element of a batch) under last-writer-wins, with its
-- counter deltas added. Returns 'applied' or 'older' (for the row; a delta
-- counts either way).
CREATE OR REPLACE FUNCTION meridian.apply_one(c jsonb, origin int) RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    rel regclass;
    finals jsonb;
    outcome text;
BEGIN
    IF c ->> 'op' = 'U' AND jsonb_typeof(c -> 'old') = 'object' THEN
        rel := (c ->> 'tbl')::regclass;
        finals := meridian.counter_finals(rel, meridian.counter_deltas(c ->> 'tbl', jsonb_build_array(c)));
    END IF;
    outcome := meridian.apply_change(c ->> 'tbl', (c ->> 'op')::"char", c -> 'pk', c -> 'row',
                                     (c ->> 'hlc')::bigint, origin);
    PERFORM meridian.set_counters(rel, finals);
    RETURN outcome;
END
$$;


-- The receiver applies a batch (last-writer-wins tables and the engine's)
-- and then records its position here, in the same transaction.
-- Moves origin's position forward to (xid, seq) (never back) and counts n
-- more changes.
CREATE OR REPLACE FUNCTION meridian.advance_applied(origin int, xid bigint, seq bigint, n bigint) RETURNS void
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$
    INSERT INTO meridian.applied AS a (origin, xid, seq, changes, applied_at)
    VALUES (origin, xid, seq, n, now())
    ON CONFLICT (origin) DO UPDATE
       SET xid = excluded.xid, seq = excluded.seq, changes = a.changes + excluded.changes,
           applied_at = excluded.applied_at
     WHERE (a.xid, a.seq) < (excluded.xid, excluded.seq)
$$;


-- When a held change is tried next after `attempts` failed retries: 1 s,
-- doubling, up to 5 minutes.
CREATE OR REPLACE FUNCTION meridian.held_next_try(attempts int) RETURNS timestamptz
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT now() + least(interval '1 second' * power(2, least(attempts, 10)), interval '5 minutes')
$$;


-- Holds changes (a jsonb array, each as the receiver has it) that could not
-- be applied, with the error: tried again at the next housekeeping round.
-- A change held before (its retry failed) keeps its place and waits twice
-- as long for its next try (1 s doubling up to 5 minutes: held_next_try).
-- Every path that holds a change calls this; src/replication/held.rs retries.
CREATE OR REPLACE FUNCTION meridian.hold(origin int, changes jsonb, error text, sqlstate text) RETURNS void
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$
    INSERT INTO meridian.held AS h (origin, xid, seq, tbl, change, error, sqlstate)
    SELECT hold.origin, (c ->> 'xid')::bigint, (c ->> 'seq')::bigint, c ->> 'tbl', c, hold.error,
           hold.sqlstate
      FROM jsonb_array_elements(changes) c
    ON CONFLICT (origin, xid, seq) DO UPDATE
       SET error = excluded.error, sqlstate = excluded.sqlstate, attempts = h.attempts + 1,
           next_try = meridian.held_next_try(h.attempts + 1)
$$;

-- Superseded by src/replication/held.rs (one retry for every held change).
DROP FUNCTION IF EXISTS meridian.retry_held();


-- Deletes the changes every one of peers has applied; returns how many. Does
-- nothing while any of them has not acknowledged anything yet.
CREATE OR REPLACE FUNCTION meridian.prune(peers int[]) RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    lo meridian.shipped;
    n bigint;
BEGIN
    IF cardinality(peers) = 0 THEN
        RETURN 0;
    END IF;
    SELECT count(*) INTO n FROM meridian.shipped s WHERE s.peer = ANY (peers);
    IF n < cardinality(peers) THEN
        RETURN 0;
    END IF;
    SELECT * INTO lo FROM meridian.shipped s WHERE s.peer = ANY (peers) ORDER BY s.xid, s.seq LIMIT 1;
    DELETE FROM meridian.change c
     WHERE (c.xid, c.seq) <= (lo.xid::text::xid8, lo.seq);
    GET DIAGNOSTICS n = ROW_COUNT;
    DELETE FROM meridian.change_deps d WHERE d.xid < lo.xid::text::xid8;
    RETURN n;
END
$$;
