-- meridian migration 6: what the rule engine needs to merge row states
-- rather than rows (see src/rules/merge.rs for the reasoning).
--
-- For tables decided by the rule engine, capture now records with each
-- write, and keeps per row in meridian.row_version:
--   * gen, tag_hlc/tag_origin: the row's incarnation (deletes before it,
--     and the version of the insert that started it); an insert on top of
--     a tombstone starts the next one;
--   * epoch: one more than the epoch of the row the write was made on;
--   * cols: per merged column what merging needs besides the value:
--     last-writer-wins columns the version of the write that last changed
--     them ([hlc, region]), counters each region's running total of its own
--     changes with the hlc of its last one ({"region": [hlc, total]}).
-- It also refuses a write that moves a grow-only merged column (max, min,
-- union, states) back: the writing region would keep a value the others
-- never take.
--
-- The engine's column rules are kept in meridian.engine_table.columns (set
-- by migrate through set_table_engine); changing them regenerates the
-- table's capture function.

ALTER TABLE meridian.engine_table ADD COLUMN columns jsonb NOT NULL DEFAULT '{}';
ALTER TABLE meridian.row_version
    ADD COLUMN gen int, ADD COLUMN tag_hlc bigint, ADD COLUMN tag_origin int,
    ADD COLUMN epoch int, ADD COLUMN cols jsonb;
ALTER TABLE meridian.change
    ADD COLUMN gen int, ADD COLUMN tag_hlc bigint, ADD COLUMN tag_origin int,
    ADD COLUMN epoch int, ADD COLUMN cols jsonb;

COMMENT ON COLUMN meridian.engine_table.columns IS
    'Merged columns and their rules, e.g. {"n": "counter", "st": {"states": [...]}} (from the conflict-rules files).';
COMMENT ON COLUMN meridian.row_version.cols IS
    'Rule-engine tables: per merged column, its version (last-writer-wins) or per-region totals (counter).';

-- A total order on jsonb values, the one rules::merge::compare uses: null <
-- boolean < number < string < array < object; numbers by value, strings
-- bytewise, the rest by their text. -1, 0 or 1.
CREATE FUNCTION meridian.json_cmp(a jsonb, b jsonb) RETURNS int
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE
        WHEN ka <> kb THEN sign(ka - kb)::int
        WHEN ka = 0 THEN 0
        WHEN ka = 1 THEN sign(a::bool::int - b::bool::int)::int
        WHEN ka = 2 THEN sign(a::numeric - b::numeric)::int
        WHEN ka = 3 THEN CASE WHEN (a #>> '{}') COLLATE "C" < (b #>> '{}') COLLATE "C" THEN -1
                              WHEN (a #>> '{}') = (b #>> '{}') THEN 0 ELSE 1 END
        ELSE CASE WHEN a::text COLLATE "C" < b::text COLLATE "C" THEN -1
                  WHEN a::text = b::text THEN 0 ELSE 1 END
    END
    FROM (SELECT CASE jsonb_typeof(a) WHEN 'null' THEN 0 WHEN 'boolean' THEN 1 WHEN 'number' THEN 2
                                      WHEN 'string' THEN 3 WHEN 'array' THEN 4 ELSE 5 END AS ka,
                 CASE jsonb_typeof(b) WHEN 'null' THEN 0 WHEN 'boolean' THEN 1 WHEN 'number' THEN 2
                                      WHEN 'string' THEN 3 WHEN 'array' THEN 4 ELSE 5 END AS kb) k
$$;

-- Refuses (check_violation) a local update of tbl that moves a grow-only
-- merged column back: max down, min up, union losing an element, states
-- backwards in their order. old and new are the row images.
CREATE FUNCTION meridian.check_growth(tbl text, rules jsonb, old jsonb, new jsonb) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    col text;
    rule jsonb;
    o jsonb;
    n jsonb;
    shrinks bool;
    how text;
BEGIN
    FOR col, rule IN SELECT * FROM jsonb_each(rules) LOOP
        o := nullif(old -> col, 'null');
        n := nullif(new -> col, 'null');
        IF o IS NULL OR o = n THEN
            CONTINUE;
        END IF;
        IF rule = '"max"' THEN
            shrinks := n IS NULL OR meridian.json_cmp(n, o) < 0;
            how := 'merged as "max", it can only grow';
        ELSIF rule = '"min"' THEN
            shrinks := n IS NULL OR meridian.json_cmp(n, o) > 0;
            how := 'merged as "min", it can only shrink';
        ELSIF rule = '"union"' THEN
            shrinks := jsonb_typeof(o) = 'array' AND jsonb_array_length(o) > 0
                       AND (n IS NULL OR jsonb_typeof(n) <> 'array' OR NOT n @> o);
            how := 'merged as "union", elements can only be added';
        ELSIF jsonb_typeof(rule) = 'object' AND rule ? 'states' THEN
            shrinks := ROW(CASE WHEN n IS NULL THEN -2
                                ELSE coalesce((SELECT s.i - 1 FROM jsonb_array_elements(rule -> 'states') WITH ORDINALITY s(v, i)
                                                WHERE s.v = n), -1) END,
                           coalesce(n #>> '{}', '') COLLATE "C")
                     < ROW(coalesce((SELECT s.i - 1 FROM jsonb_array_elements(rule -> 'states') WITH ORDINALITY s(v, i)
                                      WHERE s.v = o), -1),
                           (o #>> '{}') COLLATE "C");
            how := format('its states only move forward (%s)',
                          (SELECT string_agg(v, ' -> ') FROM jsonb_array_elements_text(rule -> 'states') v));
        ELSE
            CONTINUE;
        END IF;
        IF shrinks THEN
            RAISE EXCEPTION 'column % of % cannot go from % to %', col, tbl, o, coalesce(n, 'null')
                USING ERRCODE = '23514',
                      DETAIL = format('Its conflict rule makes it merge across regions: %s.', how),
                      HINT = 'A region that moved it back would disagree with the others for good. Delete and re-insert the row to start it afresh.';
        END IF;
    END LOOP;
END
$$;

-- The merged columns' metadata after a write: prev is the row's (NULL for
-- none), old and new the row images (old NULL: an insert), (hlc, region)
-- the write's version, and (dflt_hlc, dflt_origin) the version an unchanged
-- last-writer-wins column without one of its own was last written by.
CREATE FUNCTION meridian.bump_cols(rules jsonb, prev jsonb, old jsonb, new jsonb, hlc bigint, region int,
                                   dflt_hlc bigint, dflt_origin int) RETURNS jsonb
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT jsonb_object_agg(r.col, CASE
        WHEN r.rule = '"last-writer-wins"' THEN
            CASE WHEN old IS NULL OR (new -> r.col) IS DISTINCT FROM (old -> r.col)
                 THEN jsonb_build_array(hlc, region)
                 ELSE coalesce(prev -> r.col, jsonb_build_array(dflt_hlc, dflt_origin)) END
        ELSE
            t.totals || jsonb_build_object(region::text, jsonb_build_array(hlc,
                coalesce((t.totals -> region::text ->> 1)::numeric, 0)
                + coalesce(nullif(new -> r.col, 'null')::numeric, 0)
                - coalesce(nullif(old -> r.col, 'null')::numeric, 0)))
        END)
      FROM jsonb_each(rules) AS r(col, rule)
      CROSS JOIN LATERAL (SELECT CASE WHEN old IS NULL THEN '{}'::jsonb
                                      ELSE coalesce(prev -> r.col,
                                                    jsonb_build_object('0', jsonb_build_array(0, old -> r.col)))
                                 END AS totals) t
     WHERE r.rule IN ('"last-writer-wins"', '"counter"')
$$;

-- The capture statement (see migrations 1 and 5): same arguments. For a
-- rule-engine table it also records the write's incarnation, epoch and
-- merged-column metadata, and (updates) checks grow-only columns first.
CREATE OR REPLACE FUNCTION meridian.change_stmt(tbl text, region int, op "char", key_args text,
                                                deleted bool, row_expr text, old_expr text,
                                                indent int) RETURNS text
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    rules jsonb;
    grow jsonb;
    new_hlc text := 'GREATEST(excluded.hlc, v.hlc OPERATOR(pg_catalog.+) 1)';
    stmt text;
BEGIN
    SELECT e.columns INTO rules FROM meridian.engine_table e WHERE e.tbl = change_stmt.tbl;
    IF rules IS NULL THEN
        stmt := format($stmt$WITH ver AS (
    INSERT INTO meridian.row_version AS v (tbl, pk, hlc, origin, deleted)
    VALUES (%1$L, pg_catalog.jsonb_build_object(%4$s),
            pg_catalog.substr(pin, 2)::pg_catalog.int8, %2$s, %5$s)
    ON CONFLICT (tbl, pk) DO UPDATE
       SET hlc = GREATEST(excluded.hlc, v.hlc OPERATOR(pg_catalog.+) 1),
           origin = excluded.origin, deleted = excluded.deleted,
           base_hlc = v.hlc, base_origin = v.origin,
           winner_hlc = NULL, winner_origin = NULL
    RETURNING v.pk, v.hlc, v.base_hlc, v.base_origin)
INSERT INTO meridian.change (origin, hlc, tx_hlc, via_proxy, tbl, op, pk, "row", old, base_hlc, base_origin)
SELECT %2$s, ver.hlc, pg_catalog.substr(pin, 2)::pg_catalog.int8,
       pg_catalog.starts_with(pin, 'P'), %1$L, %3$L, ver.pk, %6$s, %7$s, ver.base_hlc, ver.base_origin
  FROM ver;$stmt$,
                       tbl, region, op, key_args,
                       CASE WHEN deleted THEN 'true' ELSE 'false' END,
                       row_expr, old_expr);
    ELSE
        SELECT jsonb_object_agg(k, r) INTO grow
          FROM jsonb_each(rules) AS x(k, r) WHERE r NOT IN ('"counter"', '"last-writer-wins"');
        -- The version a pre-existing row's unchanged columns count as
        -- written by: its winner, else its version (0, 0 for a row from
        -- before capture, as the receiver reads it).
        stmt := format($stmt$%9$sWITH ver AS (
    INSERT INTO meridian.row_version AS v (tbl, pk, hlc, origin, deleted, gen, tag_hlc, tag_origin, epoch, cols)
    VALUES (%1$L, pg_catalog.jsonb_build_object(%4$s),
            pg_catalog.substr(pin, 2)::pg_catalog.int8, %2$s, %5$s, 0,
            %10$s, %11$s, %12$s, %13$s)
    ON CONFLICT (tbl, pk) DO UPDATE
       SET hlc = %8$s,
           origin = excluded.origin, deleted = excluded.deleted,
           base_hlc = v.hlc, base_origin = v.origin,
           winner_hlc = NULL, winner_origin = NULL,
           gen = COALESCE(v.gen, 0) OPERATOR(pg_catalog.+) %14$s,
           tag_hlc = %15$s,
           tag_origin = %16$s,
           epoch = COALESCE(v.epoch, 0) OPERATOR(pg_catalog.+) 1,
           cols = %17$s
    RETURNING v.pk, v.hlc, v.base_hlc, v.base_origin, v.gen, v.tag_hlc, v.tag_origin, v.epoch, v.cols)
INSERT INTO meridian.change (origin, hlc, tx_hlc, via_proxy, tbl, op, pk, "row", old, base_hlc, base_origin,
                             gen, tag_hlc, tag_origin, epoch, cols)
SELECT %2$s, ver.hlc, pg_catalog.substr(pin, 2)::pg_catalog.int8,
       pg_catalog.starts_with(pin, 'P'), %1$L, %3$L, ver.pk, %6$s, %7$s, ver.base_hlc, ver.base_origin,
       ver.gen, ver.tag_hlc, ver.tag_origin, ver.epoch, ver.cols
  FROM ver;$stmt$,
            tbl, region, op, key_args,                                   -- 1-4
            CASE WHEN deleted THEN 'true' ELSE 'false' END,              -- 5
            row_expr, old_expr, new_hlc,                                 -- 6-8
            -- 9: the growth check, for updates
            CASE WHEN op = 'U' AND grow IS NOT NULL
                 THEN format(E'PERFORM meridian.check_growth(%L, %L::pg_catalog.jsonb, pg_catalog.to_jsonb(OLD), pg_catalog.to_jsonb(NEW));\n', tbl, grow)
                 ELSE '' END,
            -- 10-13: a key without a version: new here (insert), or a row
            -- from before capture (update, delete: its version is (0, 0)).
            CASE WHEN op = 'I' THEN 'pg_catalog.substr(pin, 2)::pg_catalog.int8' ELSE '0' END,
            CASE WHEN op = 'I' THEN region::text ELSE '0' END,
            CASE WHEN op = 'I' THEN '0' ELSE '1' END,
            CASE op
                WHEN 'I' THEN format('meridian.bump_cols(%L, NULL, NULL, %s, pg_catalog.substr(pin, 2)::pg_catalog.int8, %s, 0, 0)',
                                     rules, row_expr, region)
                WHEN 'U' THEN format('meridian.bump_cols(%L, NULL, pg_catalog.to_jsonb(OLD), %s, pg_catalog.substr(pin, 2)::pg_catalog.int8, %s, 0, 0)',
                                     rules, row_expr, region)
                ELSE 'NULL' END,
            -- 14-16: an insert on a tombstone starts the next incarnation
            CASE WHEN op = 'I' THEN 'CASE WHEN v.deleted THEN 1 ELSE 0 END' ELSE '0' END,
            CASE WHEN op = 'I' THEN format('CASE WHEN v.deleted THEN %s ELSE COALESCE(v.tag_hlc, v.winner_hlc, v.hlc) END', new_hlc)
                 ELSE 'COALESCE(v.tag_hlc, v.winner_hlc, v.hlc)' END,
            CASE WHEN op = 'I' THEN 'CASE WHEN v.deleted THEN excluded.origin ELSE COALESCE(v.tag_origin, v.winner_origin, v.origin) END'
                 ELSE 'COALESCE(v.tag_origin, v.winner_origin, v.origin)' END,
            -- 17: merged-column metadata
            CASE op
                WHEN 'I' THEN format('meridian.bump_cols(%L, NULL, NULL, %s, %s, excluded.origin, 0, 0)',
                                     rules, row_expr, new_hlc)
                WHEN 'U' THEN format('meridian.bump_cols(%L, v.cols, pg_catalog.to_jsonb(OLD), %s, %s, excluded.origin, '
                                     'COALESCE(v.winner_hlc, v.hlc), COALESCE(v.winner_origin, v.origin))',
                                     rules, row_expr, new_hlc)
                ELSE 'NULL' END);
    END IF;
    RETURN replace(stmt, E'\n', E'\n' || repeat(' ', indent));
END
$fn$;

-- Marks a table as decided by the rule engine (or not), with its merged
-- columns' rules; regenerates its capture function when either changed.
DROP FUNCTION meridian.set_table_engine(regclass, bool);
CREATE FUNCTION meridian.set_table_engine(tbl regclass, engine bool, merged jsonb) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    name text := meridian.table_name(set_table_engine.tbl);
    before jsonb;
    after jsonb;
BEGIN
    SELECT e.columns INTO before FROM meridian.engine_table e WHERE e.tbl = name;
    IF engine THEN
        after := merged;
        INSERT INTO meridian.engine_table AS e (tbl, columns) VALUES (name, after)
        ON CONFLICT ON CONSTRAINT engine_table_pkey DO UPDATE SET columns = excluded.columns;
    ELSE
        DELETE FROM meridian.engine_table e WHERE e.tbl = name;
    END IF;
    IF before IS DISTINCT FROM after
       AND EXISTS (SELECT FROM meridian.replicated_table r WHERE r.tbl = name AND r.captured) THEN
        PERFORM meridian.enable_capture(set_table_engine.tbl);
    END IF;
END
$$;

-- engine_read and engine_write now also carry the row state's incarnation,
-- epoch and merged-column metadata.
DROP FUNCTION meridian.engine_read(text, jsonb);
CREATE FUNCTION meridian.engine_read(tbl text, pks jsonb)
RETURNS TABLE (pk jsonb, "row" jsonb, hlc bigint, origin int, deleted bool,
               winner_hlc bigint, winner_origin int,
               epoch int, tag_hlc bigint, tag_origin int, cols jsonb, gen int)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    rel regclass := engine_read.tbl::regclass;
    key_cols text;
    t_keys text;
    key_obj text;
    rows jsonb;
BEGIN
    SELECT c.key_cols, c.t_keys INTO key_cols, t_keys FROM meridian.apply_columns(rel) c;
    -- The key as capture spells it: jsonb_build_object('k1', t.k1, ...).
    SELECT string_agg(format('%L, t.%I', a.attname, a.attname), ', ' ORDER BY k.ord)
      INTO key_obj
      FROM pg_index i
      CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
      JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
     WHERE i.indrelid = rel AND i.indisprimary;
    EXECUTE format($q$
        SELECT jsonb_object_agg(f.k, f.r) FROM (
            SELECT jsonb_build_object(%3$s)::text AS k, to_jsonb(t) AS r
              FROM %1$s t
             WHERE (%2$s) IN (SELECT %4$s FROM jsonb_populate_recordset(NULL::%1$s, $1))
             ORDER BY %2$s
               FOR UPDATE OF t) f$q$,
        rel, t_keys, key_obj, key_cols)
    INTO rows
    USING pks;
    RETURN QUERY
    SELECT k.pk, rows -> (k.pk::text), v.hlc, v.origin, v.deleted, v.winner_hlc, v.winner_origin,
           v.epoch, v.tag_hlc, v.tag_origin, v.cols, v.gen
      FROM jsonb_array_elements(pks) AS k(pk)
      LEFT JOIN (SELECT rv.pk, rv.hlc, rv.origin, rv.deleted, rv.winner_hlc, rv.winner_origin,
                        rv.epoch, rv.tag_hlc, rv.tag_origin, rv.cols, rv.gen
                   FROM meridian.row_version rv
                  WHERE rv.tbl = engine_read.tbl AND rv.pk IN (SELECT e FROM jsonb_array_elements(pks) e)
                  ORDER BY rv.pk
                    FOR UPDATE) v ON v.pk = k.pk;
END
$$;

-- Writes the engine's decisions for some keys of a table: results is an
-- array of {pk, fresh, deleted, row, hlc, origin, winner_hlc, winner_origin,
-- gen, tag_hlc, tag_origin, epoch, cols}. fresh: the key had no row and no
-- version when engine_read looked, so nothing was locked; if a row or
-- version appeared since, the decision was made without it: raise
-- serialization_failure, and the receiver retries the batch.
CREATE OR REPLACE FUNCTION meridian.engine_write(tbl text, results jsonb) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    rel regclass := engine_write.tbl::regclass;
    key_cols text;
    t_keys text;
    d_keys text;
    all_cols text;
    excluded_cols text;
    n bigint;
    defaults jsonb;
BEGIN
    SELECT * INTO key_cols, t_keys, d_keys, all_cols, excluded_cols FROM meridian.apply_columns(rel);
    defaults := meridian.missing_defaults(
        rel, (SELECT jsonb_agg(r -> 'row') FROM jsonb_array_elements(results) r WHERE NOT (r ->> 'deleted')::bool));
    IF defaults IS NOT NULL THEN
        SELECT jsonb_agg(jsonb_set(r, '{row}', defaults || (r -> 'row'))) INTO results
          FROM jsonb_array_elements(results) r;
    END IF;
    EXECUTE format('DELETE FROM %1$s t USING jsonb_populate_recordset(NULL::%1$s, $1) d WHERE (%2$s) = (%3$s)',
                   rel, t_keys, d_keys)
    USING (SELECT jsonb_agg(r -> 'pk') FROM jsonb_array_elements(results) r WHERE (r ->> 'deleted')::bool);
    -- Fresh keys first: inserted only if still absent.
    INSERT INTO meridian.row_version AS v (tbl, pk, hlc, origin, deleted, winner_hlc, winner_origin,
                                           gen, tag_hlc, tag_origin, epoch, cols)
    SELECT engine_write.tbl, r.pk, r.hlc, r.origin, r.deleted, r.winner_hlc, r.winner_origin,
           r.gen, r.tag_hlc, r.tag_origin, r.epoch, r.cols
      FROM jsonb_to_recordset(results) AS r(pk jsonb, fresh bool, hlc bigint, origin int, deleted bool,
                                            winner_hlc bigint, winner_origin int, gen int, tag_hlc bigint,
                                            tag_origin int, epoch int, cols jsonb)
     WHERE r.fresh
    ON CONFLICT (tbl, pk) DO NOTHING;
    GET DIAGNOSTICS n = ROW_COUNT;
    IF n < (SELECT count(*) FROM jsonb_array_elements(results) r WHERE (r ->> 'fresh')::bool) THEN
        RAISE EXCEPTION 'a row of % appeared while its change was being decided; retrying', tbl
            USING ERRCODE = '40001';
    END IF;
    EXECUTE format('INSERT INTO %1$s (%2$s) OVERRIDING SYSTEM VALUE SELECT %2$s FROM jsonb_populate_recordset(NULL::%1$s, $1)
                    ON CONFLICT (%3$s) DO NOTHING',
                   rel, all_cols, key_cols)
    USING (SELECT jsonb_agg(r -> 'row') FROM jsonb_array_elements(results) r
            WHERE (r ->> 'fresh')::bool AND NOT (r ->> 'deleted')::bool);
    GET DIAGNOSTICS n = ROW_COUNT;
    IF n < (SELECT count(*) FROM jsonb_array_elements(results) r
             WHERE (r ->> 'fresh')::bool AND NOT (r ->> 'deleted')::bool) THEN
        RAISE EXCEPTION 'a row of % appeared while its change was being decided; retrying', tbl
            USING ERRCODE = '40001';
    END IF;
    -- Keys that were there (locked by engine_read).
    EXECUTE format('INSERT INTO %1$s (%2$s) OVERRIDING SYSTEM VALUE SELECT %2$s FROM jsonb_populate_recordset(NULL::%1$s, $1)
                    ON CONFLICT (%3$s) DO UPDATE SET (%2$s) = ROW(%4$s)',
                   rel, all_cols, key_cols, excluded_cols)
    USING (SELECT jsonb_agg(r -> 'row') FROM jsonb_array_elements(results) r
            WHERE NOT (r ->> 'fresh')::bool AND NOT (r ->> 'deleted')::bool);
    INSERT INTO meridian.row_version AS v (tbl, pk, hlc, origin, deleted, winner_hlc, winner_origin,
                                           gen, tag_hlc, tag_origin, epoch, cols)
    SELECT engine_write.tbl, r.pk, r.hlc, r.origin, r.deleted, r.winner_hlc, r.winner_origin,
           r.gen, r.tag_hlc, r.tag_origin, r.epoch, r.cols
      FROM jsonb_to_recordset(results) AS r(pk jsonb, fresh bool, hlc bigint, origin int, deleted bool,
                                            winner_hlc bigint, winner_origin int, gen int, tag_hlc bigint,
                                            tag_origin int, epoch int, cols jsonb)
     WHERE NOT r.fresh
    ON CONFLICT (tbl, pk) DO UPDATE
       SET hlc = excluded.hlc, origin = excluded.origin, deleted = excluded.deleted,
           winner_hlc = excluded.winner_hlc, winner_origin = excluded.winner_origin,
           gen = excluded.gen, tag_hlc = excluded.tag_hlc, tag_origin = excluded.tag_origin,
           epoch = excluded.epoch, cols = excluded.cols;
END
$$;

-- Unique keys other than the primary key, on rule-engine tables too: the
-- held change (c, from origin) and the local row holding its value are two
-- incarnations of different keys, compared as rules::merge compares
-- incarnations: the later generation, then by policy (first-writer-wins:
-- the earlier insert; region-priority: the insert from the region listed
-- first in priority, then the later; otherwise the later insert). policy
-- NULL: last-writer-wins tables, whose row versions are compared. Returns
-- 'won' (the local row was deleted, not captured) or 'lost' (drop the
-- change); either is logged.
CREATE FUNCTION meridian.resolve_unique(origin int, c jsonb, policy text, priority int[]) RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    rel regclass := (c ->> 'tbl')::regclass;
    tbl_name text := c ->> 'tbl';
    hlc bigint := (c ->> 'hlc')::bigint;
    idx record;
    pk_cols text[];
    key_cols text;
    t_keys text;
    other jsonb;
    other_pk jsonb;
    ver meridian.row_version;
    r_tag record;
    l_tag record;
    remote_wins bool;
BEGIN
    SELECT array_agg(a.attname::text ORDER BY k.ord) INTO pk_cols
      FROM pg_index i
      CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
      JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
     WHERE i.indrelid = rel AND i.indisprimary;
    SELECT x.key_cols, x.t_keys INTO key_cols, t_keys FROM meridian.apply_columns(rel) x;
    SELECT coalesce((c ->> 'gen')::int, 0) AS gen,
           coalesce((c ->> 'tag_hlc')::bigint, hlc) AS hlc,
           coalesce((c ->> 'tag_origin')::int, origin) AS origin
      INTO r_tag;
    FOR idx IN
        SELECT i.indexrelid::regclass::text AS name,
               string_agg(quote_ident(a.attname), ', ' ORDER BY k.ord) AS cols,
               string_agg('t.' || quote_ident(a.attname), ', ' ORDER BY k.ord) AS t_cols
          FROM pg_index i
          CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
          JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
         WHERE i.indrelid = rel AND i.indisunique AND NOT i.indisprimary
           AND i.indexprs IS NULL AND i.indpred IS NULL
         GROUP BY i.indexrelid
         ORDER BY 1
    LOOP
        EXECUTE format('SELECT to_jsonb(t) FROM %1$s t
                         WHERE (%2$s) = (SELECT %3$s FROM jsonb_populate_record(NULL::%1$s, $1))
                           AND (%4$s) <> (SELECT %5$s FROM jsonb_populate_record(NULL::%1$s, $2))
                         FOR UPDATE',
                       rel, idx.t_cols, idx.cols, t_keys, key_cols)
        INTO other
        USING c -> 'row', c -> 'pk';
        CONTINUE WHEN other IS NULL;
        SELECT jsonb_object_agg(k, other -> k) INTO other_pk FROM unnest(pk_cols) AS k;
        SELECT * INTO ver FROM meridian.row_version v
         WHERE v.tbl = tbl_name AND v.pk = other_pk FOR UPDATE;
        IF policy IS NULL THEN
            remote_wins := ver.hlc IS NULL OR (hlc, origin) > (ver.hlc, ver.origin);
        ELSE
            SELECT coalesce(ver.gen, 0) AS gen,
                   coalesce(ver.tag_hlc, ver.winner_hlc, ver.hlc, 0) AS hlc,
                   coalesce(ver.tag_origin, ver.winner_origin, ver.origin, 0) AS origin
              INTO l_tag;
            remote_wins := CASE
                WHEN r_tag.gen <> l_tag.gen THEN r_tag.gen > l_tag.gen
                WHEN policy = 'first-writer-wins' THEN (r_tag.hlc, r_tag.origin) < (l_tag.hlc, l_tag.origin)
                WHEN policy = 'region-priority' THEN
                    (coalesce(cardinality(priority) + 1 - array_position(priority, r_tag.origin), 0), r_tag.hlc, r_tag.origin)
                  > (coalesce(cardinality(priority) + 1 - array_position(priority, l_tag.origin), 0), l_tag.hlc, l_tag.origin)
                ELSE (r_tag.hlc, r_tag.origin) > (l_tag.hlc, l_tag.origin)
            END;
        END IF;
        INSERT INTO meridian.conflict (tbl, pk, rule, kept, local_row, local_hlc, local_origin,
                                       remote_row, remote_hlc, remote_origin, result_row)
        VALUES (tbl_name, CASE WHEN remote_wins THEN other_pk ELSE c -> 'pk' END, 'unique ' || idx.name,
                CASE WHEN remote_wins THEN 'remote' ELSE 'local' END,
                other, coalesce(ver.hlc, 0), coalesce(ver.origin, 0),
                c -> 'row', hlc, origin, CASE WHEN remote_wins THEN c -> 'row' ELSE other END);
        IF NOT remote_wins THEN
            RETURN 'lost';
        END IF;
        EXECUTE format('DELETE FROM %1$s t WHERE (%2$s) = (SELECT %3$s FROM jsonb_populate_record(NULL::%1$s, $1))',
                       rel, t_keys, key_cols)
        USING other_pk;
        UPDATE meridian.row_version v SET deleted = true, cols = NULL
         WHERE v.tbl = tbl_name AND v.pk = other_pk;
    END LOOP;
    RETURN 'won';
END
$$;
REVOKE ALL ON FUNCTION meridian.resolve_unique(int, jsonb, text, int[]) FROM PUBLIC;

-- The last-writer-wins path (retry_held) keeps calling the two-argument form.
CREATE OR REPLACE FUNCTION meridian.resolve_unique(origin int, c jsonb) RETURNS text
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$ SELECT meridian.resolve_unique(origin, c, NULL, NULL) $$;
