-- The rule engine's side of the database. Tables whose rule needs more than
-- last-writer-wins (a policy, a deletes rule, merged columns other than
-- counters: see conflict-rules/README.md) are listed in meridian.engine_table.
-- For them the receiver decides conflicts in meridian itself (rules::merge):
-- it reads the local state of the batch's keys (engine_read), decides, and
-- writes the outcome (engine_write) in the same transaction as the other
-- changes (src/replication/apply.rs) and advance_applied. Conflicts it detects are logged
-- in meridian.conflict. Also here: unique keys other than the primary key
-- (resolve_unique) and foreign-key orphans (handle_orphans), for every table.
--
-- Re-applied by every `meridian migrate` (CREATE OR REPLACE, with
-- check_function_bodies off, after the versioned migrations): each of
-- meridian's functions is defined here and nowhere else. See
-- migrations/README.md.

CREATE OR REPLACE FUNCTION meridian.is_engine_table(tbl text) RETURNS bool
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT EXISTS (SELECT 1 FROM meridian.engine_table e WHERE e.tbl = is_engine_table.tbl)
$$;


CREATE OR REPLACE FUNCTION meridian.set_table_engine(tbl regclass, engine bool, merged jsonb) RETURNS void
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


-- The engine's view of some keys of a table: the row (locked), its version
-- (locked) and winner. Rows first, then versions, in key order: the order
-- local writes and the set-wise apply take them.
CREATE OR REPLACE FUNCTION meridian.engine_read(tbl text, pks jsonb)
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
      -- Each key's state by index, locked in key order.
      LEFT JOIN (SELECT rv.*
                   FROM (SELECT DISTINCT e AS pk FROM jsonb_array_elements(pks) e ORDER BY 1) kk
                   CROSS JOIN LATERAL (SELECT rv.pk, rv.hlc, rv.origin, rv.deleted, rv.winner_hlc, rv.winner_origin,
                                              rv.epoch, rv.tag_hlc, rv.tag_origin, rv.cols, rv.gen
                                         FROM meridian.row_version rv
                                        WHERE rv.tbl = engine_read.tbl AND rv.pk = kk.pk
                                        LIMIT 1 FOR UPDATE) rv) v ON v.pk = k.pk;
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
CREATE OR REPLACE FUNCTION meridian.missing_defaults(rel regclass, rows jsonb) RETURNS jsonb
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
CREATE OR REPLACE FUNCTION meridian.fill_defaults(changes jsonb) RETURNS jsonb
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


--------------------------------------------------------------------------------
-- Unique keys other than the primary key
--------------------------------------------------------------------------------
-- Two regions insert different keys with the same value of another unique
-- column (an e-mail address). Each applies its own; the other's change fails
-- with unique_violation and is held. When the held change is retried,
-- resolve_unique finds the local row holding the value and keeps one of the
-- two in every region alike: the loser is deleted (if it is the local row,
-- without capture: every region deletes it the same way) or dropped (if it
-- is the change), and logged in meridian.conflict with rule 'unique <index>'.
--
-- The held change (c, from origin) and the local row are two incarnations of
-- different keys, compared as rules::merge compares incarnations: the later
-- generation, then by policy (first-writer-wins: the earlier insert;
-- region-priority: the insert from the region listed first in priority, then
-- the later; otherwise the later insert). policy NULL: last-writer-wins
-- tables, whose row versions are compared ((hlc, region) of the change
-- against the local row's version). Returns 'won' (the local row was
-- deleted, not captured) or 'lost' (drop the change).
CREATE OR REPLACE FUNCTION meridian.resolve_unique(origin int, c jsonb, policy text, priority int[]) RETURNS text
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


CREATE OR REPLACE FUNCTION meridian.set_orphans(tbl regclass, action text) RETURNS void
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$
    INSERT INTO meridian.orphan_rule AS r (tbl, action)
    VALUES (meridian.table_name(set_orphans.tbl), set_orphans.action)
    ON CONFLICT (tbl) DO UPDATE SET action = excluded.action
$$;


-- Logs child (a row of fk's child table) as an orphan found while applying
-- change c from origin, and deletes it if its table's rule says so.
CREATE OR REPLACE FUNCTION meridian.note_orphan(child_tbl regclass, child_name text, conname text,
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
CREATE OR REPLACE FUNCTION meridian.handle_orphans(origin int, changes jsonb) RETURNS int
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
