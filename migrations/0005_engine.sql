-- meridian migration 5: the rule engine's side of the database.
--
-- Tables whose rule needs more than last-writer-wins (a policy, a deletes
-- rule, merged columns other than counters: see conflict-rules/README.md)
-- are listed in meridian.engine_table. For them the receiver
-- decides conflicts in meridian itself (rules::merge) and writes the outcome
-- with meridian.engine_write, in the same transaction as apply_batch (which
-- it gives only the other changes) and advance_applied.
--
-- What the engine needs from capture: the version each change was written on
-- (its base), so "made on top of the version here" can be told from a
-- conflict. The capture statement now returns the row's previous version
-- from the same upsert and records it in meridian.change (base_hlc,
-- base_origin; NULL for a key new in the region). A local write also clears
-- the row's winner (the version whose row the engine kept after a conflict).
--
-- Conflicts the engine detects are logged in meridian.conflict.

-- (A table of its own rather than a column of meridian.replicated_table:
-- enable_capture builds that table's row type with a fixed column list.)
CREATE TABLE meridian.engine_table (
    tbl text PRIMARY KEY
);
ALTER TABLE meridian.change ADD COLUMN base_hlc bigint, ADD COLUMN base_origin int;
ALTER TABLE meridian.row_version
    ADD COLUMN base_hlc bigint, ADD COLUMN base_origin int,
    ADD COLUMN winner_hlc bigint, ADD COLUMN winner_origin int;

COMMENT ON TABLE meridian.engine_table IS
    'Tables whose conflicts the rule engine (meridian) decides, rather than last-writer-wins in SQL.';
COMMENT ON COLUMN meridian.row_version.base_hlc IS
    'Set by capture only: the version this row had before the last local write (returned to the capture statement).';
COMMENT ON COLUMN meridian.row_version.winner_hlc IS
    'After a conflict decided by the rule engine: the version whose row was kept (NULL: hlc/origin itself).';

-- The capture statement (see migration 1): same arguments, now also records
-- the previous version as the change's base and clears the winner.
CREATE OR REPLACE FUNCTION meridian.change_stmt(tbl text, region int, op "char", key_args text,
                                                deleted bool, row_expr text, old_expr text,
                                                indent int) RETURNS text
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT replace(format($stmt$WITH ver AS (
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
                          row_expr, old_expr),
                   E'\n', E'\n' || repeat(' ', indent))
$$;

-- Regenerate every capture function with the new statement.
DO $$
DECLARE
    t text;
BEGIN
    FOR t IN SELECT r.tbl FROM meridian.replicated_table r WHERE r.captured AND to_regclass(r.tbl) IS NOT NULL LOOP
        PERFORM meridian.enable_capture(t::regclass);
    END LOOP;
END
$$;

-- Marks a table as decided by the rule engine (or not); called by migrate.
CREATE FUNCTION meridian.set_table_engine(tbl regclass, engine bool) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    name text := meridian.table_name(set_table_engine.tbl);
BEGIN
    IF engine THEN
        INSERT INTO meridian.engine_table (tbl) VALUES (name) ON CONFLICT DO NOTHING;
    ELSE
        DELETE FROM meridian.engine_table e WHERE e.tbl = name;
    END IF;
END
$$;

CREATE FUNCTION meridian.is_engine_table(tbl text) RETURNS bool
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT EXISTS (SELECT 1 FROM meridian.engine_table e WHERE e.tbl = is_engine_table.tbl)
$$;

-- The receiver hands apply_batch only the changes of last-writer-wins tables
-- and gives the others to the engine; the batch's position is then recorded
-- here (apply_batch records the position of the last change it was given).
-- Moves origin's position forward to (xid, seq) (never back) and counts n
-- more changes.
CREATE FUNCTION meridian.advance_applied(origin int, xid bigint, seq bigint, n bigint) RETURNS void
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

-- The engine's view of some keys of a table: the row (locked), its version
-- (locked) and winner. Rows first, then versions, in key order: the order
-- local writes and apply_table take them.
CREATE FUNCTION meridian.engine_read(tbl text, pks jsonb)
RETURNS TABLE (pk jsonb, "row" jsonb, hlc bigint, origin int, deleted bool,
               winner_hlc bigint, winner_origin int)
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
    SELECT k.pk, rows -> (k.pk::text), v.hlc, v.origin, v.deleted, v.winner_hlc, v.winner_origin
      FROM jsonb_array_elements(pks) AS k(pk)
      LEFT JOIN (SELECT rv.pk, rv.hlc, rv.origin, rv.deleted, rv.winner_hlc, rv.winner_origin
                   FROM meridian.row_version rv
                  WHERE rv.tbl = engine_read.tbl AND rv.pk IN (SELECT e FROM jsonb_array_elements(pks) e)
                  ORDER BY rv.pk
                    FOR UPDATE) v ON v.pk = k.pk;
END
$$;

-- Writes the engine's decisions for some keys of a table: results is an
-- array of {pk, fresh, deleted, row, hlc, origin, winner_hlc, winner_origin}.
-- fresh: the key had no row and no version when engine_read looked, so
-- nothing was locked; if a row or version appeared since (a concurrent local
-- insert, or another region's change applied meanwhile), the decision was
-- made without it: raise serialization_failure, and the receiver retries
-- the batch, reading it this time.
CREATE FUNCTION meridian.engine_write(tbl text, results jsonb) RETURNS void
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
    INSERT INTO meridian.row_version AS v (tbl, pk, hlc, origin, deleted, winner_hlc, winner_origin)
    SELECT engine_write.tbl, r.pk, r.hlc, r.origin, r.deleted, r.winner_hlc, r.winner_origin
      FROM jsonb_to_recordset(results) AS r(pk jsonb, fresh bool, hlc bigint, origin int, deleted bool,
                                            winner_hlc bigint, winner_origin int)
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
    INSERT INTO meridian.row_version AS v (tbl, pk, hlc, origin, deleted, winner_hlc, winner_origin)
    SELECT engine_write.tbl, r.pk, r.hlc, r.origin, r.deleted, r.winner_hlc, r.winner_origin
      FROM jsonb_to_recordset(results) AS r(pk jsonb, fresh bool, hlc bigint, origin int, deleted bool,
                                            winner_hlc bigint, winner_origin int)
     WHERE NOT r.fresh
    ON CONFLICT (tbl, pk) DO UPDATE
       SET hlc = excluded.hlc, origin = excluded.origin, deleted = excluded.deleted,
           winner_hlc = excluded.winner_hlc, winner_origin = excluded.winner_origin;
END
$$;

-- Every conflict the engine detected here.
CREATE TABLE meridian.conflict (
    id            bigserial   PRIMARY KEY,
    at            timestamptz NOT NULL DEFAULT now(),
    tbl           text        NOT NULL,
    pk            jsonb       NOT NULL,
    rule          text        NOT NULL,   -- what decided the row: the policy, delete-wins or update-wins
    kept          text        NOT NULL,   -- 'local' or 'remote': whose row was kept
    merged        text[]      NOT NULL DEFAULT '{}',  -- columns whose differing values were merged
    local_row     jsonb,                  -- NULL: deleted here
    local_hlc     bigint      NOT NULL,
    local_origin  int         NOT NULL,
    remote_row    jsonb,                  -- NULL: a delete
    remote_hlc    bigint      NOT NULL,
    remote_origin int         NOT NULL,
    result_row    jsonb                   -- what this region holds now (NULL: deleted)
);

CREATE INDEX conflict_at ON meridian.conflict (at);
CREATE INDEX conflict_tbl_at ON meridian.conflict (tbl, at);

COMMENT ON TABLE meridian.conflict IS
    'Conflicts decided by the rule engine in this region: both versions, the rule that decided, and the outcome.';

--------------------------------------------------------------------------------
-- Rows from before a column existed
--------------------------------------------------------------------------------
-- A row image captured before ALTER TABLE ... ADD COLUMN ran at its origin
-- lacks the column; applied where the column exists already it must get the
-- column's default (what the ALTER gave the origin's existing rows), not
-- NULL (which a NOT NULL column refuses, holding the change for ever).

-- The defaults of rel's columns that some row in rows lacks, as one object
-- (NULL if none). Defaults drawing from a sequence are left out (key columns
-- are always in the image).
CREATE FUNCTION meridian.missing_defaults(rel regclass, rows jsonb) RETURNS jsonb
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    exprs text;
    defaults jsonb;
BEGIN
    SELECT string_agg(format('%L, (%s)', a.attname, pg_get_expr(d.adbin, d.adrelid)), ', ')
      INTO exprs
      FROM pg_attribute a
      JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
     WHERE a.attrelid = rel AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''
       AND pg_get_expr(d.adbin, d.adrelid) NOT LIKE 'nextval(%'
       AND EXISTS (SELECT 1 FROM jsonb_array_elements(rows) r
                    WHERE jsonb_typeof(r) = 'object' AND NOT r ? a.attname);
    IF exprs IS NULL THEN
        RETURN NULL;
    END IF;
    EXECUTE 'SELECT pg_catalog.jsonb_build_object(' || exprs || ')' INTO defaults;
    RETURN defaults;
END
$$;

-- changes with each insert's and update's row completed by missing_defaults.
CREATE FUNCTION meridian.fill_defaults(changes jsonb) RETURNS jsonb
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    t record;
    defaults jsonb;
    filled jsonb := changes;
BEGIN
    -- (CASE, not AND: the name of a schema change's row is not a table name,
    -- and to_regclass refuses it.)
    FOR t IN SELECT DISTINCT c ->> 'tbl' AS tbl FROM jsonb_array_elements(changes) c
              WHERE CASE WHEN c ->> 'op' IN ('I', 'U') THEN to_regclass(c ->> 'tbl') IS NOT NULL END LOOP
        defaults := meridian.missing_defaults(
            t.tbl::regclass,
            (SELECT jsonb_agg(c -> 'row') FROM jsonb_array_elements(changes) c
              WHERE c ->> 'tbl' = t.tbl AND c ->> 'op' IN ('I', 'U')));
        CONTINUE WHEN defaults IS NULL;
        SELECT jsonb_agg(CASE WHEN x.c ->> 'tbl' = t.tbl AND x.c ->> 'op' IN ('I', 'U')
                              THEN jsonb_set(x.c, '{row}', defaults || (x.c -> 'row'))
                              ELSE x.c END ORDER BY x.ord)
          INTO filled
          FROM jsonb_array_elements(filled) WITH ORDINALITY AS x(c, ord);
    END LOOP;
    RETURN filled;
END
$$;

-- (The receiver calls apply_batch(origin, fill_defaults(changes)).)

--------------------------------------------------------------------------------
-- Unique keys other than the primary key
--------------------------------------------------------------------------------
-- Two regions insert different keys with the same value of another unique
-- column (an e-mail address). Each applies its own; the other's change fails
-- with unique_violation and is held. When the held change is retried,
-- resolve_unique finds the local row holding the value and keeps the newer
-- of the two by last-writer-wins ((hlc, region) of the change against the
-- local row's version), in every region alike: the loser is deleted (if it
-- is the local row, without capture: every region deletes it the same way)
-- or dropped (if it is the change), and logged in meridian.conflict with
-- rule 'unique <index>'. For last-writer-wins tables; engine tables keep
-- such changes held.

-- Returns 'won' (the way is clear: apply the change) or 'lost' (drop it).
CREATE FUNCTION meridian.resolve_unique(origin int, c jsonb) RETURNS text
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
    remote_wins bool;
BEGIN
    SELECT array_agg(a.attname::text ORDER BY k.ord) INTO pk_cols
      FROM pg_index i
      CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
      JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
     WHERE i.indrelid = rel AND i.indisprimary;
    SELECT x.key_cols, x.t_keys INTO key_cols, t_keys FROM meridian.apply_columns(rel) x;
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
        remote_wins := ver.hlc IS NULL OR (hlc, origin) > (ver.hlc, ver.origin);
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
        UPDATE meridian.row_version v SET deleted = true
         WHERE v.tbl = tbl_name AND v.pk = other_pk;
    END LOOP;
    RETURN 'won';
END
$$;

--------------------------------------------------------------------------------
-- Foreign-key orphans
--------------------------------------------------------------------------------
-- Apply runs in replica mode, so foreign keys are neither checked nor acted
-- on for applied rows. A child written in one region while its parent is
-- deleted in another is left without its parent in both. After each batch,
-- handle_orphans looks at both ends: the children here of each parent the
-- batch deleted (if the parent is gone), and the parent of each child the
-- batch wrote (if it is gone *and* tombstoned here, i.e. deleted, not just
-- late). Each orphan is logged; the child table's rule (orphans = "keep" or
-- "delete", in meridian.orphan_rule) says whether it stays. Both regions
-- meet the same orphan at one of the two ends and decide it alike.

CREATE TABLE meridian.orphan_rule (
    tbl    text PRIMARY KEY,
    action text NOT NULL CHECK (action IN ('keep', 'delete'))
);

CREATE FUNCTION meridian.set_orphans(tbl regclass, action text) RETURNS void
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$
    INSERT INTO meridian.orphan_rule AS r (tbl, action)
    VALUES (meridian.table_name(set_orphans.tbl), set_orphans.action)
    ON CONFLICT (tbl) DO UPDATE SET action = excluded.action
$$;

-- Logs child (a row of fk's child table) as an orphan found while applying
-- change c from origin, and deletes it if its table's rule says so.
CREATE FUNCTION meridian.note_orphan(child_tbl regclass, child_name text, conname text,
                                     child jsonb, c jsonb, origin int) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    action text := coalesce((SELECT r.action FROM meridian.orphan_rule r WHERE r.tbl = child_name), 'keep');
    child_pk jsonb;
    ver meridian.row_version;
    t_keys text;
    key_cols text;
BEGIN
    SELECT jsonb_object_agg(a.attname, child -> a.attname::text) INTO child_pk
      FROM pg_index i
      CROSS JOIN LATERAL unnest(i.indkey) AS k(attnum)
      JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
     WHERE i.indrelid = child_tbl AND i.indisprimary;
    SELECT * INTO ver FROM meridian.row_version v WHERE v.tbl = child_name AND v.pk = child_pk;
    INSERT INTO meridian.conflict (tbl, pk, rule, kept, local_row, local_hlc, local_origin,
                                   remote_row, remote_hlc, remote_origin, result_row)
    VALUES (child_name, coalesce(child_pk, '{}'), 'orphans ' || action || ' (' || conname || ')',
            CASE action WHEN 'keep' THEN 'local' ELSE 'remote' END,
            child, coalesce(ver.hlc, 0), coalesce(ver.origin, 0),
            CASE WHEN c ->> 'op' = 'D' THEN NULL ELSE c -> 'row' END, (c ->> 'hlc')::bigint, origin,
            CASE action WHEN 'keep' THEN child END);
    IF action = 'delete' AND child_pk IS NOT NULL THEN
        SELECT x.t_keys, x.key_cols INTO t_keys, key_cols FROM meridian.apply_columns(child_tbl) x;
        EXECUTE format('DELETE FROM %1$s t WHERE (%2$s) = (SELECT %3$s FROM jsonb_populate_record(NULL::%1$s, $1))',
                       child_tbl, t_keys, key_cols)
        USING child_pk;
        UPDATE meridian.row_version v SET deleted = true WHERE v.tbl = child_name AND v.pk = child_pk;
    END IF;
END
$$;

-- After a batch from origin is applied: finds the orphans it made (see
-- above); returns how many.
CREATE FUNCTION meridian.handle_orphans(origin int, changes jsonb) RETURNS int
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    tables oid[];
    fk record;
    c jsonb;
    child jsonb;
    parent_pk jsonb;
    parent_here bool;
    child_keys text;
    child_key_cols text;
    n int := 0;
BEGIN
    SELECT array_agg(t.rel::oid) INTO tables
      FROM (SELECT DISTINCT CASE WHEN x ->> 'op' IN ('I', 'U', 'D') THEN to_regclass(x ->> 'tbl') END AS rel
              FROM jsonb_array_elements(changes) x) t
     WHERE t.rel IS NOT NULL;
    IF tables IS NULL THEN
        RETURN 0;
    END IF;
    FOR fk IN
        SELECT con.conname::text AS conname,
               con.conrelid::regclass AS child, con.confrelid::regclass AS parent,
               meridian.table_name(con.conrelid) AS child_name,
               meridian.table_name(con.confrelid) AS parent_name,
               (SELECT string_agg('t.' || quote_ident(a.attname), ', ' ORDER BY k.ord)
                  FROM unnest(con.conkey) WITH ORDINALITY AS k(attnum, ord)
                  JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.attnum) AS child_cols,
               (SELECT array_agg(a.attname::text ORDER BY k.ord)
                  FROM unnest(con.conkey) WITH ORDINALITY AS k(attnum, ord)
                  JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.attnum) AS child_names,
               (SELECT string_agg(quote_ident(a.attname), ', ' ORDER BY k.ord)
                  FROM unnest(con.confkey) WITH ORDINALITY AS k(attnum, ord)
                  JOIN pg_attribute a ON a.attrelid = con.confrelid AND a.attnum = k.attnum) AS parent_cols,
               (SELECT array_agg(a.attname::text ORDER BY k.ord)
                  FROM unnest(con.confkey) WITH ORDINALITY AS k(attnum, ord)
                  JOIN pg_attribute a ON a.attrelid = con.confrelid AND a.attnum = k.attnum) AS parent_names
          FROM pg_constraint con
         WHERE con.contype = 'f' AND (con.conrelid = ANY (tables) OR con.confrelid = ANY (tables))
    LOOP
        FOR c IN SELECT x FROM jsonb_array_elements(changes) x
                  WHERE (x ->> 'tbl' = fk.parent_name AND x ->> 'op' = 'D')
                     OR (x ->> 'tbl' = fk.child_name AND x ->> 'op' IN ('I', 'U'))
        LOOP
            IF c ->> 'op' = 'D' THEN
                -- The parent's key as captured must hold the referenced columns.
                CONTINUE WHEN NOT (SELECT bool_and(c -> 'pk' ? k) FROM unnest(fk.parent_names) k);
                parent_pk := c -> 'pk';
            ELSE
                SELECT jsonb_object_agg(fk.parent_names[i], c -> 'row' -> fk.child_names[i]) INTO parent_pk
                  FROM generate_subscripts(fk.parent_names, 1) i;
                -- No parent referenced, or the parent was never deleted here (it may just be late).
                CONTINUE WHEN parent_pk IS NULL
                           OR EXISTS (SELECT 1 FROM jsonb_each(parent_pk) e WHERE e.value = 'null'::jsonb)
                           OR NOT EXISTS (SELECT 1 FROM meridian.row_version v
                                           WHERE v.tbl = fk.parent_name AND v.pk = parent_pk AND v.deleted);
            END IF;
            EXECUTE format('SELECT EXISTS (SELECT 1 FROM %1$s p WHERE (%2$s) = (SELECT %2$s FROM jsonb_populate_record(NULL::%1$s, $1)))',
                           fk.parent, fk.parent_cols)
            INTO parent_here
            USING parent_pk;
            CONTINUE WHEN parent_here;
            -- After a parent delete: its children here. After a child write: that child.
            SELECT x.t_keys, x.key_cols INTO child_keys, child_key_cols FROM meridian.apply_columns(fk.child) x;
            FOR child IN EXECUTE format(
                'SELECT to_jsonb(t) FROM %1$s t WHERE (%2$s) = (SELECT %3$s FROM jsonb_populate_record(NULL::%4$s, $1))
                   AND ($2::jsonb IS NULL OR (%5$s) = (SELECT %6$s FROM jsonb_populate_record(NULL::%1$s, $2)))',
                fk.child, fk.child_cols, fk.parent_cols, fk.parent, child_keys, child_key_cols)
            USING parent_pk, CASE WHEN c ->> 'op' = 'D' THEN NULL ELSE c -> 'pk' END
            LOOP
                PERFORM meridian.note_orphan(fk.child, fk.child_name, fk.conname, child, c, origin);
                n := n + 1;
            END LOOP;
        END LOOP;
    END LOOP;
    RETURN n;
END
$$;

-- Held changes of engine tables are retried by the engine, not here; and
-- engine tables keep their tombstones (a policy other than last-writer-wins
-- can prefer a tombstone to a newer change, so a forgotten one would decide
-- differently).
CREATE OR REPLACE FUNCTION meridian.retry_held() RETURNS int
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    h meridian.held;
    n int := 0;
BEGIN
    PERFORM set_config('session_replication_role', 'replica', true);
    PERFORM set_config('meridian.applying', 'on', true);
    PERFORM set_config('deadlock_timeout', '20ms', true);
    FOR h IN SELECT * FROM meridian.held x
              WHERE NOT (x.change ->> 'op' IN ('I', 'U', 'D') AND meridian.is_engine_table(x.tbl))
              ORDER BY x.origin, x.xid, x.seq LIMIT 1000 LOOP
        BEGIN
            IF h.sqlstate = '23505' AND h.change ->> 'op' IN ('I', 'U')
               AND meridian.resolve_unique(h.origin, h.change) = 'lost' THEN
                DELETE FROM meridian.held x WHERE x.origin = h.origin AND x.xid = h.xid AND x.seq = h.seq;
                n := n + 1;
                CONTINUE;
            END IF;
            PERFORM meridian.apply_one(meridian.fill_defaults(jsonb_build_array(h.change)) -> 0, h.origin);
            DELETE FROM meridian.held x WHERE x.origin = h.origin AND x.xid = h.xid AND x.seq = h.seq;
            n := n + 1;
        EXCEPTION
            WHEN deadlock_detected OR serialization_failure THEN
                RAISE;
            WHEN OTHERS THEN
                UPDATE meridian.held x SET error = SQLERRM, sqlstate = SQLSTATE
                 WHERE x.origin = h.origin AND x.xid = h.xid AND x.seq = h.seq;
        END;
    END LOOP;
    RETURN n;
END
$$;

CREATE OR REPLACE FUNCTION meridian.forget_tombstones(peers int[], grace_ms bigint) RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    horizon bigint;
    n bigint;
BEGIN
    IF (SELECT count(*) FROM meridian.floor f WHERE f.origin = ANY (peers))
       < cardinality(peers) THEN
        RETURN 0;
    END IF;
    horizon := least((SELECT min(f.hlc) FROM meridian.floor f WHERE f.origin = ANY (peers)),
                     meridian.local_floor(grace_ms),
                     (SELECT min((h.change ->> 'hlc')::int8) FROM meridian.held h));
    DELETE FROM meridian.row_version v
     WHERE v.deleted AND v.hlc < horizon
       AND v.tbl NOT IN (SELECT e.tbl FROM meridian.engine_table e);
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$$;

REVOKE ALL ON FUNCTION meridian.set_table_engine(regclass, bool) FROM PUBLIC;
REVOKE ALL ON FUNCTION meridian.advance_applied(int, bigint, bigint, bigint) FROM PUBLIC;
REVOKE ALL ON FUNCTION meridian.engine_read(text, jsonb) FROM PUBLIC;
REVOKE ALL ON FUNCTION meridian.engine_write(text, jsonb) FROM PUBLIC;
REVOKE ALL ON FUNCTION meridian.missing_defaults(regclass, jsonb) FROM PUBLIC;
REVOKE ALL ON FUNCTION meridian.fill_defaults(jsonb) FROM PUBLIC;
REVOKE ALL ON FUNCTION meridian.resolve_unique(int, jsonb) FROM PUBLIC;
REVOKE ALL ON FUNCTION meridian.set_orphans(regclass, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION meridian.note_orphan(regclass, text, text, jsonb, jsonb, int) FROM PUBLIC;
REVOKE ALL ON FUNCTION meridian.handle_orphans(int, jsonb) FROM PUBLIC;
