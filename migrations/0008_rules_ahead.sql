--------------------------------------------------------------------------------
-- Rules for tables that do not exist yet, and rows from before capture
--------------------------------------------------------------------------------
-- An application creates its tables through its own migrations, after
-- meridian is in place, and tools drop and re-create tables (pgbench -i).
-- A rule may therefore name a table that does not exist yet: migrate records
-- it by name (meridian.rule_ahead), and the table is checked against it when
-- it appears (check_rule_fits, from the capture event trigger), with an
-- error naming the rule file and key if it does not fit. The rule rows are
-- kept by name, so a table dropped and created again is under its rule again.
--
-- A table created without a primary key is not captured; rows written to it
-- then (pgbench -i loads its tables before adding their keys) would stay in
-- this region for ever. So when capture is first installed on a table by a
-- schema change, the rows it already holds are captured as inserts, in the
-- same transaction, after the schema change itself (event triggers fire in
-- name order: the capture trigger is renamed to come after
-- meridian_replicate_ddl, so receivers add the key before the rows arrive).

-- Where a rule came from and the columns it names, for tables that did not
-- exist when it was recorded.
CREATE TABLE meridian.rule_ahead (
    tbl      text PRIMARY KEY,
    origin   text   NOT NULL,   -- 'file: table[i]', for messages
    columns  text[] NOT NULL,   -- columns the rule merges
    counters text[] NOT NULL
);

COMMENT ON TABLE meridian.rule_ahead IS
    'Rules recorded before their table existed; checked when the table appears.';

-- Records a rule by name, without looking at the table (it does not exist).
CREATE FUNCTION meridian.record_rule_ahead(tbl text, origin text, insert_only bool, counters text[],
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
CREATE FUNCTION meridian.check_rule_fits(rel regclass, name text) RETURNS void
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

-- Captures the rows rel holds now as inserts, as its capture trigger would
-- have, under the running transaction's stamp. Returns how many. The
-- statement is the capture trigger's own (change_stmt), run over the rows.
CREATE FUNCTION meridian.capture_existing_rows(rel regclass) RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    nd meridian.node;
    name text := meridian.table_name(rel);
    insert_only bool;
    key_args text;
    stmt text;
    n bigint;
BEGIN
    EXECUTE format('SELECT count(*) FROM %s', rel) INTO n;
    IF n = 0 THEN
        RETURN 0;
    END IF;
    SELECT * INTO nd FROM meridian.node;
    SELECT r.insert_only INTO insert_only FROM meridian.replicated_table r WHERE r.tbl = name;
    IF insert_only THEN
        stmt := format($s$INSERT INTO meridian.change (seq, origin, hlc, tx_hlc, via_proxy, tbl, op, pk, "row")
    SELECT x.s, %1$s, pg_catalog.substr(pin, 2)::pg_catalog.int8, pg_catalog.substr(pin, 2)::pg_catalog.int8,
           pg_catalog.starts_with(pin, 'P'), %2$L, 'I',
           pg_catalog.jsonb_build_object('meridian_row', pg_catalog.concat(%3$L, x.s)), x.j
      FROM (SELECT pg_catalog.nextval('meridian.change_seq'::pg_catalog.regclass) AS s,
                   pg_catalog.to_jsonb(t) AS j FROM %4$s t) x;$s$,
            nd.region_id, name, nd.region_id || '-', rel);
    ELSE
        SELECT string_agg(format('%L, r.%I', a.attname, a.attname), ', ' ORDER BY k.ord) INTO key_args
          FROM pg_index i
          CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
          JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
         WHERE i.indrelid = rel AND i.indisprimary;
        stmt := format(E'FOR r IN SELECT * FROM %s LOOP\n        %s\n    END LOOP;', rel,
                       meridian.change_stmt(name, nd.region_id, 'I', key_args, false,
                                            'pg_catalog.to_jsonb(r)', 'NULL', 8));
    END IF;
    EXECUTE format($do$DO $body$
DECLARE
    pin pg_catalog.text := pg_catalog.current_setting('meridian.tx_stamp', true);
    r %s;
BEGIN
    IF pin IS NULL OR pin OPERATOR(pg_catalog.=) '' THEN
        pin := meridian.pin_stamp();
    END IF;
    %s
END
$body$$do$, rel, stmt);
    RETURN n;
END
$fn$;

REVOKE ALL ON FUNCTION meridian.record_rule_ahead(text, text, bool, text[], text[], text, bool, jsonb) FROM PUBLIC;
REVOKE ALL ON FUNCTION meridian.check_rule_fits(regclass, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION meridian.capture_existing_rows(regclass) FROM PUBLIC;

-- The capture event trigger, now also checking rules recorded ahead and
-- capturing rows from before capture.
CREATE OR REPLACE FUNCTION meridian.on_ddl_end() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    nd        meridian.node;
    r         record;
    key_ok    bool;
    existing  bigint;
BEGIN
    IF current_setting('meridian.in_capture', true) = 'on' THEN
        RETURN;
    END IF;
    SELECT * INTO nd FROM meridian.node;
    IF NOT FOUND THEN
        RETURN;   -- not configured yet: nothing is replicated
    END IF;

    FOR r IN
        SELECT DISTINCT c.oid::regclass AS rel,
               n.nspname::text AS nsp,
               format('%I.%I', n.nspname, c.relname) AS name,
               EXISTS (SELECT 1 FROM pg_trigger t
                        WHERE t.tgrelid = c.oid AND t.tgname = 'meridian_capture') AS captured
          FROM pg_event_trigger_ddl_commands() d
          JOIN pg_class c ON c.oid = d.objid
          JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE d.classid = 'pg_class'::regclass
           AND c.relkind IN ('r', 'p')
           AND c.relpersistence <> 't'
           AND NOT c.relispartition
           AND n.nspname <> 'meridian'
    LOOP
        CONTINUE WHEN NOT (r.captured
                           OR r.nsp = ANY (nd.schemas)
                           OR EXISTS (SELECT 1 FROM meridian.replicated_table t WHERE t.tbl = r.name));

        IF r.captured THEN
            PERFORM meridian.follow_rename(r.rel);   -- its rules keep applying
        END IF;
        PERFORM meridian.check_rule_fits(r.rel, r.name);
        key_ok := EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = r.rel AND i.indisprimary)
               OR EXISTS (SELECT 1 FROM meridian.replicated_table t
                           WHERE t.tbl = r.name AND t.insert_only);
        IF key_ok THEN
            PERFORM meridian.enable_capture(r.rel);
            IF NOT r.captured THEN
                existing := meridian.capture_existing_rows(r.rel);
                IF existing > 0 THEN
                    RAISE NOTICE 'meridian: % is replicated from now on; its % existing rows were captured too', r.name, existing;
                END IF;
            END IF;
        ELSIF r.captured THEN
            PERFORM meridian.disable_capture(r.rel);
            RAISE WARNING 'capture of % stopped: %', r.name, meridian.no_key_message(r.name);
        ELSE
            RAISE NOTICE '%', meridian.no_key_message(r.name);
        END IF;
    END LOOP;
END
$$;

ALTER EVENT TRIGGER meridian_capture_ddl RENAME TO meridian_table_capture;
