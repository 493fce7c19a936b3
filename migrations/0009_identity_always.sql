--------------------------------------------------------------------------------
-- Identity columns GENERATED ALWAYS
--------------------------------------------------------------------------------
-- The apply statements insert with OVERRIDING SYSTEM VALUE (a row keeps the
-- identity value its origin gave it) and, for a key that is already here,
-- ON CONFLICT DO UPDATE SET every stored column. Postgres refuses any value
-- but DEFAULT for a GENERATED ALWAYS identity column in an UPDATE, even its
-- own value (428C9), at planning time, so every change of such a table was
-- held. The conflict action now comes from apply_columns (one place) and
-- leaves those columns out: on a conflict of the key they are either the key
-- itself (equal) or a value the origin's row was given once and never
-- changes. A table with nothing else to set does nothing on a conflict.
--
-- apply_columns loses excluded_cols (only the SET lists used it) and gains
-- on_conflict; the three functions that built SET lists are redefined with
-- it, unchanged otherwise (apply_change from 0002, apply_table from 0004,
-- engine_write from 0006).

DROP FUNCTION meridian.apply_columns(regclass);
CREATE FUNCTION meridian.apply_columns(rel regclass,
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

REVOKE ALL ON FUNCTION meridian.apply_columns(regclass) FROM PUBLIC;

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
    on_conflict text;
    newest jsonb;
    winners jsonb;
    n_in int;
    n_win int;
    finals jsonb;
BEGIN
    IF changes IS NULL OR jsonb_array_length(changes) = 0 THEN
        RETURN jsonb_build_object('applied', 0, 'older', 0);
    END IF;
    SELECT c.key_cols, c.t_keys, c.d_keys, c.all_cols, c.on_conflict
      INTO key_cols, t_keys, d_keys, all_cols, on_conflict
      FROM meridian.apply_columns(rel) c;

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
                    ON CONFLICT (%3$s) %4$s',
                   rel, all_cols, key_cols, on_conflict)
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
    on_conflict text;
    n bigint;
    defaults jsonb;
BEGIN
    SELECT c.key_cols, c.t_keys, c.d_keys, c.all_cols, c.on_conflict
      INTO key_cols, t_keys, d_keys, all_cols, on_conflict
      FROM meridian.apply_columns(rel) c;
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
                    ON CONFLICT (%3$s) %4$s',
                   rel, all_cols, key_cols, on_conflict)
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

