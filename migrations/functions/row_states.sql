-- What the rule engine needs to merge row states rather than rows (see
-- src/rules/merge.rs for the reasoning). For tables decided by the rule
-- engine, capture records with each write, and keeps per row in
-- meridian.row_version:
--   * gen, tag_hlc/tag_origin: the row's incarnation (deletes before it,
--     and the version of the insert that started it); an insert on top of
--     a tombstone starts the next one;
--   * epoch: one more than the epoch of the row the write was made on;
--   * cols: per merged column what merging needs besides the value:
--     last-writer-wins columns the version of the write that last changed
--     them ([hlc, region]), counters each region's running total of its own
--     changes with the hlc of its last one ({"region": [hlc, total]}).
-- A write that moves a grow-only merged column (max, min, union, states)
-- back is refused in the client's transaction (guard_growth, check_growth):
-- the writing region would keep a value the others never take.
--
-- Re-applied by every `meridian migrate` (CREATE OR REPLACE, with
-- check_function_bodies off, after the versioned migrations): each of
-- meridian's functions is defined here and nowhere else. See
-- migrations/README.md.

-- A total order on jsonb values, the one rules::merge::compare uses: null <
-- boolean < number < string < array < object; numbers by value, strings
-- bytewise, the rest by their text. -1, 0 or 1.
CREATE OR REPLACE FUNCTION meridian.json_cmp(a jsonb, b jsonb) RETURNS int
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
CREATE OR REPLACE FUNCTION meridian.check_growth(tbl text, rules jsonb, old jsonb, new jsonb) RETURNS void
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
CREATE OR REPLACE FUNCTION meridian.bump_cols(rules jsonb, prev jsonb, old jsonb, new jsonb, hlc bigint, region int,
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
