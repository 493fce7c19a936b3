-- Counter columns: merged as deltas rather than last-writer-wins.
--
-- Re-applied by every `meridian migrate` (CREATE OR REPLACE, with
-- check_function_bodies off, after the versioned migrations): each of
-- meridian's functions is defined here and nowhere else. See
-- migrations/README.md.
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
-- update overtaking the insert it was made on (only when the receiver's
-- causal wait ran out), can leave regions with different counter values.
--
-- the set-wise apply (src/replication/set_wise.rs: counter_finals, then
-- set_counters) and apply_one (one change, used by the
-- change-by-change path and by held-change retries) both do it the same way:
--   1. counter_deltas: per key, the sum of the deltas of the changes here,
--      for keys whose changes here are all updates carrying old values;
--   2. counter_finals: with the table's rows locked, each such existing
--      row's counters plus its deltas;
--   3. the last-writer-wins apply of the row;
--   4. set_counters: the counters set to those finals.

-- Step 1. Returns [{"pk": key, "d": {"column": delta, ...}}, ...] or NULL.
CREATE OR REPLACE FUNCTION meridian.counter_deltas(tbl text, changes jsonb) RETURNS jsonb
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
CREATE OR REPLACE FUNCTION meridian.counter_finals(rel regclass, deltas jsonb) RETURNS jsonb
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
CREATE OR REPLACE FUNCTION meridian.set_counters(rel regclass, finals jsonb) RETURNS void
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
