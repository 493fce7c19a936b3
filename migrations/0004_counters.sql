-- meridian migration 4: counter columns merge as deltas.
--
-- A column declared a counter in a rule file (`[table.columns] balance =
-- "counter"`) is not last-writer-wins: an update's capture carries the
-- column's old value (meridian.change.old), and every region adds each
-- update's delta (new - old) to its own value, whichever version wins the
-- rest of the row. Concurrent increments in several regions therefore all
-- count; a resent batch counts nothing twice (meridian.applied). Inserts and
-- deletes stay last-writer-wins for the whole row, counter included; an
-- update of a row missing here brings its full row (the origin's value).
--
-- Known limit: increments made concurrently with a delete of the row, or an
-- update overtaking the insert it was made on (only when the causal wait of
-- the receiver ran out), can leave regions with different counter values.
--
-- apply_table (the set-wise path) and a new apply_one (one change, used by
-- the change-by-change path, and by retry_held from migration 5) both do it
-- the same way:
--   1. counter_deltas: per key, the sum of the deltas of the changes here,
--      for keys whose changes here are all updates carrying old values;
--   2. counter_finals: with the table's rows locked, each such existing
--      row's counters plus its deltas;
--   3. the last-writer-wins apply of the row;
--   4. set_counters: the counters set to those finals.

-- rel's name as meridian's tables record it: format('%I.%I', schema, table).
CREATE FUNCTION meridian.table_name(rel regclass) RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT format('%I.%I', n.nspname, c.relname)
      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE c.oid = rel
$$;

-- Step 1. Returns [{"pk": key, "d": {"column": delta, ...}}, ...] or NULL.
CREATE FUNCTION meridian.counter_deltas(tbl text, changes jsonb) RETURNS jsonb
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    WITH ctr AS (
        SELECT unnest(r.counters) AS col FROM meridian.replicated_table r WHERE r.tbl = counter_deltas.tbl
    ), ch AS (
        SELECT c FROM jsonb_array_elements(changes) c WHERE EXISTS (SELECT 1 FROM ctr)
    ), keys AS (
        SELECT ch.c -> 'pk' AS pk FROM ch GROUP BY 1
        HAVING bool_and(ch.c ->> 'op' = 'U' AND jsonb_typeof(ch.c -> 'old') = 'object')
    ), sums AS (
        SELECT keys.pk, ctr.col,
               sum(coalesce((ch.c -> 'row' ->> ctr.col)::numeric, 0)
                   - coalesce((ch.c -> 'old' ->> ctr.col)::numeric, 0)) AS d
          FROM ch JOIN keys ON keys.pk = ch.c -> 'pk' CROSS JOIN ctr
         GROUP BY 1, 2
    )
    SELECT jsonb_agg(jsonb_build_object('pk', s.pk, 'd', s.d))
      FROM (SELECT sums.pk, jsonb_object_agg(sums.col, sums.d) AS d FROM sums GROUP BY sums.pk) s
$$;

-- Step 2. Locks the rows of rel holding deltas' keys and returns, for each,
-- its key columns and its counters plus the deltas (row-shaped for
-- jsonb_populate_recordset), or NULL.
CREATE FUNCTION meridian.counter_finals(rel regclass, deltas jsonb) RETURNS jsonb
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    key_cols text;
    t_keys text;
    finals jsonb;
BEGIN
    IF deltas IS NULL THEN
        RETURN NULL;
    END IF;
    SELECT c.key_cols, c.t_keys INTO key_cols, t_keys FROM meridian.apply_columns(rel) c;
    EXECUTE format($q$
        SELECT jsonb_agg(f.v) FROM (
            SELECT e.pk || (SELECT jsonb_object_agg(x.k, coalesce((to_jsonb(t) ->> x.k)::numeric, 0) + x.v::numeric)
                              FROM jsonb_each_text(e.d) AS x(k, v)) AS v
              FROM jsonb_to_recordset($1) AS e(pk jsonb, d jsonb)
              JOIN %1$s t ON (%2$s) = (SELECT %3$s FROM jsonb_populate_record(NULL::%1$s, e.pk))
             ORDER BY %2$s
               FOR UPDATE OF t) f$q$,
        rel, t_keys, key_cols)
    INTO finals
    USING deltas;
    RETURN finals;
END
$$;

-- Step 4. Sets the counters of rel's rows named in finals.
CREATE FUNCTION meridian.set_counters(rel regclass, finals jsonb) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    t_keys text;
    d_keys text;
    cols text;
    vals text;
BEGIN
    IF finals IS NULL THEN
        RETURN;
    END IF;
    SELECT c.t_keys, c.d_keys INTO t_keys, d_keys FROM meridian.apply_columns(rel) c;
    SELECT string_agg(quote_ident(k), ', ' ORDER BY k), string_agg('d.' || quote_ident(k), ', ' ORDER BY k)
      INTO cols, vals
      FROM (SELECT DISTINCT k FROM jsonb_array_elements(finals) f, jsonb_object_keys(f) k) keys
     WHERE k IN (SELECT unnest(r.counters) FROM meridian.replicated_table r
                  WHERE r.tbl = meridian.table_name(rel));
    IF cols IS NULL THEN
        RETURN;
    END IF;
    EXECUTE format('UPDATE %1$s t SET (%2$s) = ROW(%3$s) FROM jsonb_populate_recordset(NULL::%1$s, $1) d WHERE (%4$s) = (%5$s)',
                   rel, cols, vals, t_keys, d_keys)
    USING finals;
END
$$;

-- One change (an element of a batch) under last-writer-wins, with its
-- counter deltas added. Returns 'applied' or 'older' (for the row; a delta
-- counts either way).
CREATE FUNCTION meridian.apply_one(c jsonb, origin int) RETURNS text
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

REVOKE ALL ON FUNCTION meridian.counter_deltas(text, jsonb) FROM PUBLIC;
REVOKE ALL ON FUNCTION meridian.counter_finals(regclass, jsonb) FROM PUBLIC;
REVOKE ALL ON FUNCTION meridian.set_counters(regclass, jsonb) FROM PUBLIC;
REVOKE ALL ON FUNCTION meridian.apply_one(jsonb, int) FROM PUBLIC;

-- The functions of migration 2 that apply changes, now with counters
-- (and apply_batch warns when it falls back to change by change; unchanged
-- otherwise).

CREATE OR REPLACE FUNCTION meridian.apply_table(tbl text, changes jsonb, origin int) RETURNS jsonb
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    rel regclass := apply_table.tbl::regclass;
    key_cols text;
    t_keys text;
    d_keys text;
    all_cols text;
    excluded_cols text;
    newest jsonb;
    winners jsonb;
    n_in int;
    n_win int;
    finals jsonb;
BEGIN
    IF changes IS NULL OR jsonb_array_length(changes) = 0 THEN
        RETURN jsonb_build_object('applied', 0, 'older', 0);
    END IF;
    SELECT * INTO key_cols, t_keys, d_keys, all_cols, excluded_cols FROM meridian.apply_columns(rel);

    IF key_cols IS NULL THEN
        -- Insert-only table: every row arrives once.
        EXECUTE format('INSERT INTO %s (%s) OVERRIDING SYSTEM VALUE SELECT %s FROM jsonb_populate_recordset(NULL::%s, $1)',
                       rel, all_cols, all_cols, rel)
        USING (SELECT jsonb_agg(c -> 'row') FROM jsonb_array_elements(changes) c WHERE c ->> 'op' = 'I');
        RETURN jsonb_build_object('applied', jsonb_array_length(changes), 'older', 0);
    END IF;

    -- The newest change per key in this batch (all from one origin, whose
    -- versions of a row only grow).
    SELECT jsonb_agg(x ORDER BY x.pk), count(*) INTO newest, n_in
      FROM (SELECT DISTINCT ON (c -> 'pk') c -> 'pk' AS pk, c ->> 'op' AS op, c -> 'row' AS "row",
                   (c ->> 'hlc')::bigint AS hlc
              FROM jsonb_array_elements(changes) c
             ORDER BY c -> 'pk', (c ->> 'hlc')::bigint DESC) x;

    -- Lock the table's rows first, in key order (as local writes do).
    EXECUTE format('SELECT count(*) FROM (SELECT 1 FROM %1$s t WHERE (%2$s) IN (SELECT %2$s FROM jsonb_populate_recordset(NULL::%1$s, $1)) ORDER BY %2$s FOR UPDATE OF t) x',
                   rel, key_cols)
    USING (SELECT jsonb_agg(e -> 'pk') FROM jsonb_array_elements(newest) e);

    -- Counter columns: every update's delta adds up, whichever version wins
    -- the rest of the row (taken from the locked rows, before they change).
    finals := meridian.counter_finals(rel, meridian.counter_deltas(apply_table.tbl, changes));

    -- Then the row versions; keep the changes above them.
    SELECT jsonb_agg(w), count(*) INTO winners, n_win
      FROM (SELECT i.pk, i.op, i."row", i.hlc
              FROM jsonb_to_recordset(newest) AS i(pk jsonb, op text, "row" jsonb, hlc bigint)
              LEFT JOIN (SELECT v.pk, v.hlc, v.origin FROM meridian.row_version v
                          WHERE v.tbl = apply_table.tbl
                            AND v.pk IN (SELECT e -> 'pk' FROM jsonb_array_elements(newest) e)
                          ORDER BY v.pk
                            FOR UPDATE) cur ON cur.pk = i.pk
             WHERE cur.pk IS NULL OR (i.hlc, apply_table.origin) > (cur.hlc, cur.origin)) w;
    IF n_win = 0 THEN
        PERFORM meridian.set_counters(rel, finals);
        RETURN jsonb_build_object('applied', 0, 'older', n_in);
    END IF;

    EXECUTE format('DELETE FROM %1$s t USING jsonb_populate_recordset(NULL::%1$s, $1) d WHERE (%2$s) = (%3$s)',
                   rel, t_keys, d_keys)
    USING (SELECT jsonb_agg(w -> 'pk') FROM jsonb_array_elements(winners) w WHERE w ->> 'op' = 'D');
    EXECUTE format('INSERT INTO %1$s (%2$s) OVERRIDING SYSTEM VALUE SELECT %2$s FROM jsonb_populate_recordset(NULL::%1$s, $1)
                    ON CONFLICT (%3$s) DO UPDATE SET (%2$s) = ROW(%4$s)',
                   rel, all_cols, key_cols, excluded_cols)
    USING (SELECT jsonb_agg(w -> 'row') FROM jsonb_array_elements(winners) w WHERE w ->> 'op' <> 'D');

    INSERT INTO meridian.row_version AS v (tbl, pk, hlc, origin, deleted)
    SELECT apply_table.tbl, w.pk, w.hlc, apply_table.origin, w.op = 'D'
      FROM jsonb_to_recordset(winners) AS w(pk jsonb, op text, hlc bigint)
    ON CONFLICT (tbl, pk) DO UPDATE
       SET hlc = excluded.hlc, origin = excluded.origin, deleted = excluded.deleted;
    PERFORM meridian.set_counters(rel, finals);
    RETURN jsonb_build_object('applied', n_win, 'older', n_in - n_win);
END
$$;

CREATE OR REPLACE FUNCTION meridian.apply_batch(origin int, changes jsonb) RETURNS jsonb
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    c jsonb;
    t record;
    outcome_json jsonb;
    pos meridian.applied;
    last_xid bigint;
    last_seq bigint;
    outcome text;
    n_applied int := 0;
    n_older int := 0;
    n_held int := 0;
    has_pos bool;
    n int := jsonb_array_length(changes);
BEGIN
    IF n = 0 THEN
        RETURN jsonb_build_object('applied', 0, 'older', 0, 'held', 0, 'duplicate', false);
    END IF;
    PERFORM set_config('session_replication_role', 'replica', true);
    PERFORM set_config('meridian.applying', 'on', true);
    -- If applying and a local transaction still deadlock (a remote insert
    -- racing a local insert of the same key), let Postgres pick this
    -- transaction, not the application's: the receiver retries the batch.
    PERFORM set_config('deadlock_timeout', '20ms', true);
    SELECT * INTO pos FROM meridian.applied a WHERE a.origin = apply_batch.origin FOR UPDATE;
    has_pos := FOUND;
    last_xid := (changes -> (n - 1) ->> 'xid')::bigint;
    last_seq := (changes -> (n - 1) ->> 'seq')::bigint;
    IF has_pos AND (last_xid, last_seq) <= (pos.xid, pos.seq) THEN
        RETURN jsonb_build_object('applied', 0, 'older', 0, 'held', 0, 'duplicate', true);
    END IF;
    -- Fast path: the whole batch in one subtransaction. Only if something in
    -- it fails is it redone change by change, each in its own subtransaction,
    -- holding back just the changes that fail.
    BEGIN
        IF NOT EXISTS (SELECT 1 FROM jsonb_array_elements(changes) c WHERE c ->> 'op' IN ('T', 'S')) THEN
            -- Set-wise, one table at a time (in name order, so two appliers
            -- lock tables in the same order).
            FOR t IN SELECT DISTINCT c ->> 'tbl' AS tbl FROM jsonb_array_elements(changes) c ORDER BY 1 LOOP
                outcome_json := meridian.apply_table(
                    t.tbl,
                    (SELECT jsonb_agg(c ORDER BY (c ->> 'xid')::bigint, (c ->> 'seq')::bigint)
                       FROM jsonb_array_elements(changes) c
                      WHERE c ->> 'tbl' = t.tbl
                        AND NOT (has_pos AND ((c ->> 'xid')::bigint, (c ->> 'seq')::bigint) <= (pos.xid, pos.seq))),
                    apply_batch.origin);
                n_applied := n_applied + (outcome_json ->> 'applied')::int;
                n_older := n_older + (outcome_json ->> 'older')::int;
            END LOOP;
        ELSE
        FOR c IN SELECT value FROM jsonb_array_elements(changes) LOOP
            IF has_pos AND ((c ->> 'xid')::bigint, (c ->> 'seq')::bigint) <= (pos.xid, pos.seq) THEN
                CONTINUE;   -- part of an earlier batch
            END IF;
            outcome := meridian.apply_one(c, apply_batch.origin);
            IF outcome = 'applied' THEN
                n_applied := n_applied + 1;
            ELSE
                n_older := n_older + 1;
            END IF;
        END LOOP;
        END IF;
    EXCEPTION
        WHEN deadlock_detected OR serialization_failure THEN
            RAISE;   -- the receiver retries the whole batch
        WHEN OTHERS THEN
            -- Correct but much slower: say so (the receiver logs it).
            RAISE WARNING 'meridian: applying a batch of % changes from region % change by change: %',
                n, apply_batch.origin, SQLERRM;
            n_applied := 0;
            n_older := 0;
            FOR c IN SELECT value FROM jsonb_array_elements(changes) LOOP
                IF has_pos AND ((c ->> 'xid')::bigint, (c ->> 'seq')::bigint) <= (pos.xid, pos.seq) THEN
                    CONTINUE;
                END IF;
                BEGIN
                    outcome := meridian.apply_one(c, apply_batch.origin);
                    IF outcome = 'applied' THEN
                        n_applied := n_applied + 1;
                    ELSE
                        n_older := n_older + 1;
                    END IF;
                EXCEPTION
                    WHEN deadlock_detected OR serialization_failure THEN
                        RAISE;
                    WHEN OTHERS THEN
                        INSERT INTO meridian.held (origin, xid, seq, tbl, change, error, sqlstate)
                        VALUES (apply_batch.origin, (c ->> 'xid')::bigint, (c ->> 'seq')::bigint,
                                c ->> 'tbl', c, SQLERRM, SQLSTATE)
                        ON CONFLICT DO NOTHING;
                        n_held := n_held + 1;
                END;
            END LOOP;
    END;
    INSERT INTO meridian.applied AS a (origin, xid, seq, changes, applied_at)
    VALUES (apply_batch.origin, last_xid, last_seq, n, now())
    ON CONFLICT (origin) DO UPDATE
       SET xid = excluded.xid, seq = excluded.seq, changes = a.changes + excluded.changes,
           applied_at = excluded.applied_at;
    RETURN jsonb_build_object('applied', n_applied, 'older', n_older, 'held', n_held, 'duplicate', false);
END
$$;

-- (retry_held moves to apply_one in migration 5, with the rest of its
-- changes.)
