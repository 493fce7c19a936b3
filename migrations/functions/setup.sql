-- Setting up capture: the region's configuration, installing and removing
-- capture on a table (its capture functions, REPLICA IDENTITY FULL, its place
-- in the publication, region-disjoint sequences, the refusal triggers its
-- rules need) and the event triggers that keep it installed as tables are
-- created, altered, renamed and dropped.
--
-- Re-applied by every `meridian migrate` (CREATE OR REPLACE, with
-- check_function_bodies off, after the versioned migrations): each of
-- meridian's functions is defined here and nowhere else. See
-- migrations/README.md.

-- Sets this database's region. region_id can be set once and never changed:
-- region ids are never reused, and rows already captured carry it. The name,
-- the replicated schemas and the stride may change.
--
-- When the stride changes, capture is re-enabled on every captured table so
-- their sequences follow the new stride. Tables already existing in a newly
-- listed schema are not captured by this function: call enable_capture for
-- them (new tables are captured by the event trigger). The region id is
-- written into the generated capture functions, but as capture cannot be
-- enabled before configure has run, there is nothing to regenerate when the
-- id is first set.
CREATE OR REPLACE FUNCTION meridian.configure(region_id int, region_name text, schemas text[],
                                   sequence_stride int) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    cur  meridian.node;
    t    text;
BEGIN
    IF configure.region_id IS NULL OR configure.sequence_stride IS NULL
       OR configure.region_id < 1 OR configure.region_id >= configure.sequence_stride THEN
        RAISE EXCEPTION 'invalid region id % with sequence stride %: need 1 <= region id < stride',
            coalesce(configure.region_id::text, 'NULL'), coalesce(configure.sequence_stride::text, 'NULL')
            USING ERRCODE = '22023';   -- invalid_parameter_value
    END IF;
    IF coalesce(configure.region_name, '') = '' THEN
        RAISE EXCEPTION 'region name must not be empty' USING ERRCODE = '22023';
    END IF;
    IF configure.schemas IS NULL OR array_position(configure.schemas, NULL) IS NOT NULL THEN
        RAISE EXCEPTION 'replicated schemas must be an array without NULLs' USING ERRCODE = '22023';
    END IF;

    LOCK TABLE meridian.node IN EXCLUSIVE MODE;
    SELECT * INTO cur FROM meridian.node;
    IF NOT FOUND THEN
        INSERT INTO meridian.node (region_id, region_name, schemas, sequence_stride)
        VALUES (configure.region_id, configure.region_name, configure.schemas,
                configure.sequence_stride);
        RETURN;
    END IF;

    IF cur.region_id <> configure.region_id THEN
        RAISE EXCEPTION 'this database is already region %, it cannot become region %: region ids are never changed or reused',
            cur.region_id, configure.region_id
            USING ERRCODE = '55000';   -- object_not_in_prerequisite_state
    END IF;

    UPDATE meridian.node n
       SET region_name = configure.region_name,
           schemas = configure.schemas,
           sequence_stride = configure.sequence_stride;

    IF cur.sequence_stride <> configure.sequence_stride THEN
        FOR t IN SELECT r.tbl FROM meridian.replicated_table r WHERE r.captured ORDER BY r.tbl LOOP
            IF to_regclass(t) IS NOT NULL THEN
                PERFORM meridian.enable_capture(to_regclass(t));
            END IF;
        END LOOP;
    END IF;
END
$$;


-- Installs capture on a table: its capture function (called by the capture
-- task for each decoded change of the table), REPLICA IDENTITY FULL, its
-- place in the publication, the refusal triggers its rules need, and
-- region-disjoint sequences. Idempotent; called again on every ALTER TABLE
-- and when its rules change.
-- Runs as its owner, meridian's owner role: the publication and capture
-- functions are the owner's, also when the apply role reloads rules.
CREATE OR REPLACE FUNCTION meridian.enable_capture(rel regclass) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    result text;
BEGIN
    PERFORM meridian.own_ddl(true);
    result := meridian.install_capture(rel);
    PERFORM meridian.own_ddl(false);
    RETURN result;
END
$$;


-- enable_capture's work, always run as meridian's own schema change.
CREATE OR REPLACE FUNCTION meridian.install_capture(rel regclass) RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $enable$
DECLARE
    nd        meridian.node;
    kind      "char";
    persist   "char";
    is_part   bool;
    ident     "char";
    nsp       text;
    name      text;
    fn        text;
    fn_oid    oid;
    rule      meridian.replicated_table;
    pk_cols   text[];
    key_new   text;
    key_old   text;
    key_same  text;
    n_found   int;
    counters  text;
    grow      jsonb;
    body      text;
    image     text := 'meridian.decoded_image(pg_catalog.to_jsonb(NEW), new_row)';
BEGIN
    IF rel IS NULL THEN
        RAISE EXCEPTION 'enable_capture: table must not be NULL' USING ERRCODE = '22004';
    END IF;
    SELECT * INTO nd FROM meridian.node;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'meridian is not configured in this database: call meridian.configure() first'
            USING ERRCODE = '55000';
    END IF;

    SELECT c.relkind, c.relpersistence, c.relispartition, c.relreplident, n.nspname,
           format('%I.%I', n.nspname, c.relname)
      INTO kind, persist, is_part, ident, nsp, name
      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE c.oid = rel;
    IF kind IS NULL OR kind NOT IN ('r', 'p') THEN
        RAISE EXCEPTION 'cannot capture %: not a table', rel USING ERRCODE = '42809';
    END IF;
    IF persist = 't' THEN
        RAISE EXCEPTION 'cannot capture %: temporary tables are never replicated', rel
            USING ERRCODE = '0A000';
    END IF;
    IF NOT pg_has_role(current_user, (SELECT c.relowner FROM pg_class c WHERE c.oid = rel), 'USAGE') THEN
        RAISE EXCEPTION 'meridian cannot capture %: it belongs to role %, which meridian''s owner role % may not act for, so it cannot set REPLICA IDENTITY FULL on it or publish it',
                rel, (SELECT c.relowner::regrole FROM pg_class c WHERE c.oid = rel), current_user
            USING ERRCODE = '42501',
                  HINT = format('A superuser can run GRANT %s TO %s (or meridian migrate --as SUPERUSER, which grants every owner of the replicated schemas'' tables).',
                                (SELECT c.relowner::regrole FROM pg_class c WHERE c.oid = rel), current_user);
    END IF;
    IF persist = 'u' THEN
        RAISE EXCEPTION 'meridian cannot replicate unlogged table %: its rows are not written to the WAL, which is where meridian captures changes', rel
            USING ERRCODE = '0A000',
                  HINT = 'Create it as an ordinary table, or in a schema that is not replicated.';
    END IF;
    IF nsp = 'meridian' THEN
        RAISE EXCEPTION 'cannot capture %: tables of schema meridian are never replicated', rel
            USING ERRCODE = '0A000';
    END IF;
    IF is_part THEN
        RAISE EXCEPTION 'cannot capture partition % on its own: capture its partitioned table', rel
            USING ERRCODE = '0A000';
    END IF;

    fn := 'capture_' || rel::oid;
    fn_oid := meridian.capture_function(rel);
    PERFORM meridian.follow_rename(rel);

    SELECT * INTO rule FROM meridian.replicated_table r WHERE r.tbl = name;
    IF NOT FOUND THEN
        rule := ROW(name, false, '{}', false)::meridian.replicated_table;
    END IF;
    PERFORM meridian.check_counters(rel, rule.counters);

    SELECT array_agg(a.attname::text ORDER BY k.ord)
      INTO pk_cols
      FROM pg_index i
      CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
      JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
     WHERE i.indrelid = rel AND i.indisprimary;

    IF pk_cols IS NULL AND NOT rule.insert_only THEN
        RAISE EXCEPTION '%', meridian.no_key_message(name) USING ERRCODE = '55000';
    END IF;

    IF rule.insert_only THEN
        -- Each row gets the identity '<region>-<change seq>'; no row versions
        -- are kept (the row never changes).
        body := format($tpl$
-- Generated by meridian.enable_capture() for table %1$s (insert-only), region %2$s.
-- Regenerated on every enable_capture and ALTER TABLE: do not edit.
DECLARE
    NEW   %1$s := pg_catalog.jsonb_populate_record(NULL::%1$s, new_row);
    stamp pg_catalog.int8 := pg_catalog.substr(pin, 2)::pg_catalog.int8;
    s     pg_catalog.int8 := pg_catalog.nextval('meridian.change_seq'::pg_catalog.regclass);
BEGIN
    INSERT INTO meridian.change (seq, origin, hlc, tx_hlc, via_proxy, tbl, op, pk, "row")
    VALUES (s, %2$s, stamp, stamp, pg_catalog.starts_with(pin, 'P'), %1$L, 'I',
            pg_catalog.jsonb_build_object('meridian_row', pg_catalog.concat(%3$L, s)),
            %4$s);
END
$tpl$,
            name, nd.region_id, nd.region_id || '-', image);
    ELSE
        SELECT string_agg(format('%L, NEW.%I', c, c), ', ' ORDER BY o),
               string_agg(format('%L, OLD.%I', c, c), ', ' ORDER BY o)
          INTO key_new, key_old
          FROM unnest(pk_cols) WITH ORDINALITY AS u(c, o);

        -- NEW against OLD with the primary key's own btree equality operators.
        SELECT string_agg(format('NEW.%I OPERATOR(%I.%s) OLD.%I', a.attname, opn.nspname, op.oprname, a.attname),
                          ' AND ' ORDER BY k.ord),
               count(*)
          INTO key_same, n_found
          FROM pg_index i
          CROSS JOIN LATERAL unnest(i.indkey, i.indclass) WITH ORDINALITY AS k(attnum, opc, ord)
          JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
          JOIN pg_opclass oc ON oc.oid = k.opc
          JOIN pg_amop am ON am.amopfamily = oc.opcfamily AND am.amoplefttype = oc.opcintype
                         AND am.amoprighttype = oc.opcintype AND am.amopstrategy = 3
                         AND am.amopmethod = (SELECT oid FROM pg_am WHERE amname = 'btree')
          JOIN pg_operator op ON op.oid = am.amopopr
          JOIN pg_namespace opn ON opn.oid = op.oprnamespace
         WHERE i.indrelid = rel AND i.indisprimary;
        IF n_found <> cardinality(pk_cols) THEN
            RAISE EXCEPTION 'cannot capture %: no btree equality operator found for its primary key', name
                USING ERRCODE = '42883';
        END IF;

        SELECT CASE WHEN cardinality(rule.counters) = 0 THEN 'NULL'
                    ELSE 'pg_catalog.jsonb_build_object('
                         || string_agg(format('%L, OLD.%I', c, c), ', ' ORDER BY o) || ')'
               END
          INTO counters
          FROM unnest(rule.counters) WITH ORDINALITY AS u(c, o);

        body := format($tpl$
-- Generated by meridian.enable_capture() for table %1$s, region %2$s.
-- Regenerated on every enable_capture and ALTER TABLE: do not edit.
-- Each change is one statement: the row's version upsert and the change row.
-- old_key_held: for an update that changed the key, whether the old key is
-- held by another row at the end of the transaction (keys shifted or
-- swapped), so no delete of it is recorded.
DECLARE
    NEW %1$s := pg_catalog.jsonb_populate_record(NULL::%1$s, new_row);
    OLD %1$s := pg_catalog.jsonb_populate_record(NULL::%1$s, old_row);
BEGIN
    IF tg_op OPERATOR(pg_catalog.=) 'UPDATE' THEN
        IF %3$s THEN
            %4$s
            RETURN;
        END IF;
        IF NOT old_key_held THEN
            %5$s
        END IF;
    ELSIF tg_op OPERATOR(pg_catalog.=) 'DELETE' THEN
        %7$s
        RETURN;
    END IF;
    -- INSERT, or the new key of a key-changing UPDATE.
    %6$s
END
$tpl$,
            name, nd.region_id,
            key_same,
            meridian.change_stmt(name, nd.region_id, 'U', key_new, false, image, counters, 12),
            meridian.change_stmt(name, nd.region_id, 'D', key_old, true, 'NULL', 'NULL', 12),
            meridian.change_stmt(name, nd.region_id, 'I', key_new, false, image, 'NULL', 4),
            meridian.change_stmt(name, nd.region_id, 'D', key_old, true, 'NULL', 'NULL', 8));
    END IF;

    IF fn_oid IS NULL OR (SELECT p.prosrc FROM pg_proc p WHERE p.oid = fn_oid) IS DISTINCT FROM body THEN
        EXECUTE format('CREATE OR REPLACE FUNCTION meridian.%I(tg_op text, new_row jsonb, old_row jsonb, '
                       'pin text, old_key_held bool) RETURNS void LANGUAGE plpgsql AS %L', fn, body);
        EXECUTE format('REVOKE ALL ON FUNCTION meridian.%I(text, jsonb, jsonb, text, bool) FROM PUBLIC', fn);
        fn_oid := meridian.capture_function(rel);
    END IF;
    IF obj_description(fn_oid, 'pg_proc') IS DISTINCT FROM name THEN
        EXECUTE format('COMMENT ON FUNCTION meridian.%I(text, jsonb, jsonb, text, bool) IS %L', fn, name);
    END IF;

    PERFORM meridian.make_bulk_capture(rel, name, nd.region_id, rule.insert_only, pk_cols, rule.counters);

    -- What must refuse a statement in the client's transaction.
    SELECT jsonb_object_agg(k, r) INTO grow
      FROM meridian.engine_table e, jsonb_each(e.columns) AS x(k, r)
     WHERE e.tbl = name AND r NOT IN ('"counter"', '"last-writer-wins"');
    PERFORM meridian.ensure_trigger(rel, 'meridian_insert_only', 'BEFORE UPDATE OR DELETE',
                                    CASE WHEN rule.insert_only THEN 'meridian.refuse_change' END, ARRAY[name]);
    PERFORM meridian.ensure_trigger(rel, 'meridian_growth', 'BEFORE UPDATE',
                                    CASE WHEN grow IS NOT NULL AND NOT rule.insert_only THEN 'meridian.guard_growth' END,
                                    ARRAY[name, grow::text]);

    -- The WAL must hold whole old rows, and the table must be published.
    IF ident <> 'f' THEN
        EXECUTE format('ALTER TABLE %s REPLICA IDENTITY FULL', rel);
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_publication_rel pr JOIN pg_publication p ON p.oid = pr.prpubid
                    WHERE p.pubname = 'meridian' AND pr.prrelid = rel) THEN
        EXECUTE format('ALTER PUBLICATION meridian ADD TABLE %s', rel);
    END IF;

    PERFORM meridian.align_sequences(rel, nd.region_id, nd.sequence_stride);

    INSERT INTO meridian.replicated_table AS r (tbl, captured)
    VALUES (name, true)
    ON CONFLICT ON CONSTRAINT replicated_table_pkey DO UPDATE SET captured = true
    WHERE NOT r.captured;

    RETURN CASE WHEN rule.insert_only THEN 'captured (insert-only)' ELSE 'captured' END;
END
$enable$;


-- Removes capture from a table: out of the publication, its capture function
-- and refusal triggers dropped, marked not captured. Its rules and row
-- versions are kept; sequences keep their region-disjoint stride.
CREATE OR REPLACE FUNCTION meridian.disable_capture(rel regclass) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    name text := meridian.table_name(rel);
BEGIN
    IF name IS NULL THEN
        RAISE EXCEPTION 'relation % does not exist', rel USING ERRCODE = '42P01';
    END IF;
    PERFORM meridian.own_ddl(true);
    IF EXISTS (SELECT 1 FROM pg_publication_rel pr JOIN pg_publication p ON p.oid = pr.prpubid
                WHERE p.pubname = 'meridian' AND pr.prrelid = rel) THEN
        EXECUTE format('ALTER PUBLICATION meridian DROP TABLE %s', rel);
    END IF;
    PERFORM meridian.ensure_trigger(rel, 'meridian_insert_only', NULL, NULL, NULL);
    PERFORM meridian.ensure_trigger(rel, 'meridian_growth', NULL, NULL, NULL);
    PERFORM meridian.drop_capture_functions(rel);
    PERFORM meridian.own_ddl(false);
    UPDATE meridian.replicated_table r SET captured = false WHERE r.tbl = name AND r.captured;
END
$$;


-- Creates trigger `trg` on rel running `fn` with `args`, or drops it when fn
-- is NULL; recreates it only when it differs.
CREATE OR REPLACE FUNCTION meridian.ensure_trigger(rel regclass, trg text, timing text, fn text, args text[])
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    want text;
    have text;
BEGIN
    SELECT pg_get_triggerdef(t.oid) INTO have FROM pg_trigger t WHERE t.tgrelid = rel AND t.tgname = trg;
    IF fn IS NOT NULL THEN
        want := format('CREATE TRIGGER %I %s ON %s FOR EACH ROW EXECUTE FUNCTION %s(%s)', trg, timing, rel, fn,
                       (SELECT string_agg(quote_literal(a), ', ') FROM unnest(args) a));
    END IF;
    IF have IS NOT NULL AND (want IS NULL OR have <> want) THEN
        EXECUTE format('DROP TRIGGER %I ON %s', trg, rel);
        have := NULL;
    END IF;
    IF want IS NOT NULL AND have IS NULL THEN
        EXECUTE want;
    END IF;
END
$$;


-- The per-change capture function enable_capture generated for table rel
-- (by oid, so a dropped table's too), or NULL. Its comment holds the name
-- of the table it was generated for.
CREATE OR REPLACE FUNCTION meridian.capture_function(rel oid) RETURNS regprocedure
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT to_regprocedure(format('meridian.%I(text, jsonb, jsonb, text, bool)', 'capture_' || rel))
$$;


-- Drops the capture functions generated for table rel (by oid).
CREATE OR REPLACE FUNCTION meridian.drop_capture_functions(rel oid) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    EXECUTE format('DROP FUNCTION IF EXISTS meridian.%I(text, jsonb, jsonb, text, bool)', 'capture_' || rel);
    EXECUTE format('DROP FUNCTION IF EXISTS meridian.%I(text[], jsonb[], jsonb[], text[], bool[], bool)',
                   'capture_rows_' || rel);
END
$$;


-- Captured-or-not, as the event trigger sees a table: its capture function exists.
CREATE OR REPLACE FUNCTION meridian.is_captured(rel regclass) RETURNS bool
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT meridian.capture_function(rel) IS NOT NULL
$$;


-- If rel was renamed or moved to another schema since its capture function
-- was generated, moves its rule row in meridian.replicated_table to the new
-- name (unless the new name already has one). The name the function was
-- generated for is kept in the function's comment. Versions recorded in
-- meridian.row_version stay under the old name.
CREATE OR REPLACE FUNCTION meridian.follow_rename(rel regclass) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    fn_oid   regprocedure := meridian.capture_function(rel);
    old_name text;
    name     text;
BEGIN
    IF fn_oid IS NULL THEN
        RETURN;
    END IF;
    old_name := obj_description(fn_oid, 'pg_proc');
    SELECT format('%I.%I', n.nspname, c.relname) INTO name
      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE c.oid = rel;
    IF old_name IS NULL OR old_name = name THEN
        RETURN;
    END IF;
    IF EXISTS (SELECT 1 FROM meridian.replicated_table r WHERE r.tbl = name) THEN
        UPDATE meridian.replicated_table r SET captured = false WHERE r.tbl = old_name;
    ELSE
        UPDATE meridian.replicated_table r SET tbl = name WHERE r.tbl = old_name;
    END IF;
    EXECUTE format('COMMENT ON FUNCTION %s IS %L', fn_oid, name);
END
$$;


-- Makes the sequences feeding rel's columns (serial and identity columns)
-- region-disjoint: every region's sequence steps by the stride, and region r
-- only hands out values v with v % stride = r % stride. The next value is the
-- smallest such value above the last one handed out (at or above the start if
-- none was), so values already used are never handed out again. A sequence
-- already in that state is not touched, so calling this twice changes nothing.
-- Descending sequences become ascending.
CREATE OR REPLACE FUNCTION meridian.align_sequences(rel regclass, region int, stride int) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    col      text;
    seq      regclass;
    inc      bigint;
    maxv     bigint;
    last     bigint;
    called   bool;
    base     bigint;
    nextv    bigint;
BEGIN
    FOR col, seq IN
        SELECT a.attname,
               pg_get_serial_sequence(format('%I.%I', n.nspname, c.relname), a.attname)::regclass
          FROM pg_attribute a
          JOIN pg_class c ON c.oid = a.attrelid
          JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE a.attrelid = rel AND a.attnum > 0 AND NOT a.attisdropped
         ORDER BY a.attnum
    LOOP
        CONTINUE WHEN seq IS NULL;

        SELECT s.seqincrement INTO inc FROM pg_sequence s WHERE s.seqrelid = seq;
        EXECUTE format('SELECT last_value, is_called FROM %s', seq) INTO last, called;
        nextv := CASE WHEN called THEN last + inc ELSE last END;
        CONTINUE WHEN inc = stride AND ((nextv - region) % stride) = 0;

        -- Changing the increment first takes the sequence's lock (nextval
        -- waits for it until this transaction ends), so the last value read
        -- next cannot move before the restart below.
        PERFORM meridian.alter_sequence(rel, col, seq, format('INCREMENT BY %s', stride));
        EXECUTE format('SELECT last_value, is_called FROM %s', seq) INTO last, called;
        SELECT s.seqmax INTO maxv FROM pg_sequence s WHERE s.seqrelid = seq;

        base := CASE WHEN called THEN last + 1 ELSE last END;
        nextv := base + (((region - base) % stride) + stride) % stride;
        IF nextv > maxv THEN
            RAISE EXCEPTION 'sequence % of %.% is exhausted: next value for region % would be %, above its maximum %',
                seq, rel, quote_ident(col), region, nextv, maxv
                USING ERRCODE = '2200H';   -- sequence_generator_limit_exceeded
        END IF;
        PERFORM meridian.alter_sequence(rel, col, seq, format('RESTART WITH %s', nextv));
    END LOOP;
END
$$;


-- ALTER SEQUENCE on a column's sequence; for an identity sequence, if that
-- is refused, the equivalent ALTER TABLE ... ALTER COLUMN ... SET.
CREATE OR REPLACE FUNCTION meridian.alter_sequence(rel regclass, col text, seq regclass, change text)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    BEGIN
        EXECUTE format('ALTER SEQUENCE %s %s', seq, change);
    EXCEPTION WHEN feature_not_supported OR wrong_object_type OR object_not_in_prerequisite_state THEN
        IF NOT EXISTS (SELECT 1 FROM pg_attribute a
                        WHERE a.attrelid = rel AND a.attname = col AND a.attidentity <> '') THEN
            RAISE;
        END IF;
        -- (ALTER COLUMN ... SET INCREMENT BY n, but ALTER COLUMN ... RESTART WITH n.)
        -- Only ever run inside enable_capture, whose own_ddl mark keeps the
        -- event triggers off this ALTER TABLE.
        EXECUTE format('ALTER TABLE %s ALTER COLUMN %I %s%s', rel, col,
                       CASE WHEN change LIKE 'RESTART%' THEN '' ELSE 'SET ' END, change);
    END;
END
$$;


-- The slot's name: one per database (slots are cluster-wide).
CREATE OR REPLACE FUNCTION meridian.slot_name() RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT 'meridian_' || d.oid FROM pg_database d WHERE d.datname = current_database()
$$;


--------------------------------------------------------------------------------
-- Capturing new and altered tables automatically
--------------------------------------------------------------------------------

-- After CREATE TABLE, CREATE TABLE AS, SELECT INTO and ALTER TABLE: every
-- permanent table (not a partition, not in schema meridian) that is in a
-- replicated schema, has a rule row, or is already captured is checked
-- against a rule recorded ahead for it (check_rule_fits) and gets capture
-- installed or refreshed (refreshing after every ALTER TABLE picks up primary
-- key and column changes; the capture function is only rewritten if its text
-- changed). When a table is captured for the first time, the rows it already
-- holds are captured as inserts (capture_existing_rows). A table that has no
-- primary key and is not insert-only is left uncaptured with a NOTICE (a
-- WARNING if it was captured until now, e.g. its primary key was dropped).
-- Tables outside that scope are not looked at beyond the scope test. Runs as
-- its owner, so any role may create tables in replicated schemas.
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
    IF meridian.in_own_ddl() THEN
        RETURN;   -- enable_capture's own ALTER TABLE
    END IF;
    SELECT * INTO nd FROM meridian.node;
    IF NOT FOUND THEN
        RETURN;   -- not configured yet: nothing is replicated
    END IF;

    FOR r IN
        SELECT DISTINCT c.oid::regclass AS rel,
               n.nspname::text AS nsp,
               format('%I.%I', n.nspname, c.relname) AS name,
               meridian.is_captured(c.oid) AS captured
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


-- A dropped table takes its triggers with it; this drops its generated
-- capture functions too and marks its rule row not captured.
CREATE OR REPLACE FUNCTION meridian.on_sql_drop() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    r record;
BEGIN
    FOR r IN
        SELECT d.objid, format('%I.%I', d.schema_name, d.object_name) AS name
          FROM pg_event_trigger_dropped_objects() d
         WHERE d.classid = 'pg_class'::regclass AND d.objsubid = 0
           AND d.object_type = 'table' AND d.schema_name <> 'meridian'
    LOOP
        PERFORM meridian.drop_capture_functions(r.objid);
        UPDATE meridian.replicated_table t SET captured = false
         WHERE t.tbl = r.name AND t.captured;
    END LOOP;
END
$$;


-- Refuses UPDATE and DELETE of an insert-only table's rows, in the client's
-- transaction (row trigger; arguments: the table's name).
CREATE OR REPLACE FUNCTION meridian.refuse_change() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RAISE EXCEPTION USING ERRCODE = '0A000', MESSAGE = concat('cannot ', TG_OP,
        format(' rows of table %s: the table is declared insert-only in its conflict-rules '
               'file, so updates and deletes would not replicate', TG_ARGV[0]));
END
$$;


-- Refuses an update that moves a grow-only merged column back, in the
-- client's transaction (row trigger; arguments: table name, column rules).
-- Runs as its owner: application roles have no USAGE on schema meridian.
CREATE OR REPLACE FUNCTION meridian.guard_growth() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM meridian.check_growth(TG_ARGV[0], TG_ARGV[1]::jsonb, to_jsonb(OLD), to_jsonb(NEW));
    RETURN NEW;
END
$$;
