-- The conflict rules capture needs, as `meridian migrate` records them from
-- the conflict-rules files: insert-only tables and counter columns
-- (meridian.replicated_table), and rules for tables that do not exist yet
-- (meridian.rule_ahead).
--
-- An application creates its tables through its own migrations, after
-- meridian is in place, and tools drop and re-create tables (pgbench -i).
-- A rule may therefore name a table that does not exist yet: migrate records
-- it by name, and the table is checked against it when it appears
-- (check_rule_fits, from the capture event trigger), with an error naming the
-- rule file and key if it does not fit. The rule rows are kept by name, so a
-- table dropped and created again is under its rule again.
--
-- Re-applied by every `meridian migrate` (CREATE OR REPLACE, with
-- check_function_bodies off, after the versioned migrations): each of
-- meridian's functions is defined here and nowhere else. See
-- migrations/README.md.

-- Records the conflict rules of one table that matter to capture: whether it
-- is insert-only and which columns are counters. If the table is captured its
-- capture functions are regenerated to follow the new rules.
CREATE OR REPLACE FUNCTION meridian.set_table_rule(tbl regclass, insert_only bool, counters text[])
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    name     text;
    captured bool;
BEGIN
    IF set_table_rule.tbl IS NULL THEN
        RAISE EXCEPTION 'set_table_rule: table must not be NULL' USING ERRCODE = '22004';
    END IF;
    SELECT format('%I.%I', n.nspname, c.relname) INTO name
      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE c.oid = set_table_rule.tbl AND c.relkind IN ('r', 'p');
    IF name IS NULL THEN
        RAISE EXCEPTION '% is not a table', set_table_rule.tbl USING ERRCODE = '42809';
    END IF;
    PERFORM meridian.check_counters(set_table_rule.tbl, set_table_rule.counters);

    INSERT INTO meridian.replicated_table AS r (tbl, insert_only, counters)
    VALUES (name, coalesce(set_table_rule.insert_only, false),
            coalesce(set_table_rule.counters, '{}'))
    ON CONFLICT ON CONSTRAINT replicated_table_pkey DO UPDATE
       SET insert_only = excluded.insert_only, counters = excluded.counters
    RETURNING r.captured INTO captured;

    IF captured THEN
        PERFORM meridian.enable_capture(set_table_rule.tbl);
    END IF;
END
$$;


--------------------------------------------------------------------------------
-- Configuration functions
--------------------------------------------------------------------------------

-- Checks that every counter column exists on rel and has a numeric type
-- (smallint, integer, bigint, numeric, real, double precision, or a domain
-- over one of them).
CREATE OR REPLACE FUNCTION meridian.check_counters(rel regclass, counters text[]) RETURNS void
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    col  text;
    typ  oid;
BEGIN
    IF cardinality(counters) > 50 THEN
        RAISE EXCEPTION 'table % has % counter columns; at most 50 are supported',
            rel, cardinality(counters)
            USING ERRCODE = '54011';   -- too_many_columns
    END IF;
    FOREACH col IN ARRAY coalesce(counters, '{}') LOOP
        SELECT a.atttypid INTO typ
          FROM pg_attribute a
         WHERE a.attrelid = rel AND a.attname = col
           AND a.attnum > 0 AND NOT a.attisdropped;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'counter column % of table % does not exist',
                quote_ident(coalesce(col, '')), rel
                USING ERRCODE = '42703';   -- undefined_column
        END IF;
        -- Look through domains to the base type.
        WHILE (SELECT t.typtype FROM pg_type t WHERE t.oid = typ) = 'd' LOOP
            SELECT t.typbasetype INTO typ FROM pg_type t WHERE t.oid = typ;
        END LOOP;
        IF typ NOT IN ('int2'::regtype, 'int4'::regtype, 'int8'::regtype,
                       'numeric'::regtype, 'float4'::regtype, 'float8'::regtype) THEN
            RAISE EXCEPTION 'counter column % of table % has type %, which is not numeric',
                quote_ident(col), rel, format_type(typ, NULL)
                USING ERRCODE = '42804';   -- datatype_mismatch
        END IF;
    END LOOP;
END
$$;


-- Text shared by enable_capture and the event trigger when a table cannot be
-- captured for want of a primary key.
CREATE OR REPLACE FUNCTION meridian.no_key_message(tbl text) RETURNS text
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT format('table %s has no primary key, so meridian cannot capture its changes. '
                  'Either add a primary key, or declare the table insert-only in its '
                  'conflict-rules file (insert_only = true under its [[table]]): an '
                  'insert-only table replicates each row once under a generated identity '
                  'and refuses UPDATE and DELETE', tbl)
$$;


-- Records a rule by name, without looking at the table (it does not exist).
CREATE OR REPLACE FUNCTION meridian.record_rule_ahead(tbl text, origin text, insert_only bool, counters text[],
                                           columns text[], orphans text, engine bool, merged jsonb)
RETURNS void
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$
    INSERT INTO meridian.replicated_table AS r (tbl, insert_only, counters)
    VALUES (record_rule_ahead.tbl, coalesce(record_rule_ahead.insert_only, false),
            coalesce(record_rule_ahead.counters, '{}'))
    ON CONFLICT ON CONSTRAINT replicated_table_pkey DO UPDATE
       SET insert_only = excluded.insert_only, counters = excluded.counters;
    INSERT INTO meridian.orphan_rule AS r (tbl, action)
    VALUES (record_rule_ahead.tbl, record_rule_ahead.orphans)
    ON CONFLICT (tbl) DO UPDATE SET action = excluded.action;
    DELETE FROM meridian.engine_table e WHERE e.tbl = record_rule_ahead.tbl AND NOT record_rule_ahead.engine;
    INSERT INTO meridian.engine_table AS e (tbl, columns)
    SELECT record_rule_ahead.tbl, record_rule_ahead.merged WHERE record_rule_ahead.engine
    ON CONFLICT ON CONSTRAINT engine_table_pkey DO UPDATE SET columns = excluded.columns;
    INSERT INTO meridian.rule_ahead AS a (tbl, origin, columns, counters)
    VALUES (record_rule_ahead.tbl, record_rule_ahead.origin, coalesce(record_rule_ahead.columns, '{}'),
            coalesce(record_rule_ahead.counters, '{}'))
    ON CONFLICT (tbl) DO UPDATE
       SET origin = excluded.origin, columns = excluded.columns, counters = excluded.counters;
$$;


-- Raises, naming the rule, if rel lacks a column its rule merges or counts.
CREATE OR REPLACE FUNCTION meridian.check_rule_fits(rel regclass, name text) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    a meridian.rule_ahead;
    missing text;
BEGIN
    SELECT * INTO a FROM meridian.rule_ahead r WHERE r.tbl = name;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    SELECT c INTO missing
      FROM unnest(a.columns || a.counters) c
     WHERE NOT EXISTS (SELECT 1 FROM pg_attribute t WHERE t.attrelid = rel AND t.attname = c
                                                    AND t.attnum > 0 AND NOT t.attisdropped)
     LIMIT 1;
    IF missing IS NOT NULL THEN
        RAISE EXCEPTION '%.columns.%: table % has no column %, so its conflict rule does not fit',
                        a.origin, missing, name, missing
            USING ERRCODE = '42703',
                  HINT = 'Add the column in the same statement, or change the rule file and reload meridian (SIGHUP).';
    END IF;
    BEGIN
        PERFORM meridian.check_counters(rel, a.counters);
    EXCEPTION WHEN OTHERS THEN
        RAISE EXCEPTION '%: %', a.origin, SQLERRM USING ERRCODE = SQLSTATE;
    END;
END
$$;
