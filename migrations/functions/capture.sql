-- Recording captured changes. meridian's capture task (src/capture/wal.rs)
-- reads every committed change of the replicated tables from the WAL through
-- the logical replication slot (pgoutput, publication "meridian"), stamps
-- each transaction with its HLC in commit order, and records them in batches
-- of many transactions per local transaction by calling each table's
-- generated meridian.capture_rows_<oid> (made by make_bulk_capture), with
-- the slot position it reached (meridian.capture_progress) in the same
-- transaction. What is recorded: a row in meridian.change per row change and
-- the row's version in meridian.row_version (tombstones included), plus the
-- rule engine's row states. read_changes reads them back for shipping.
--
-- HLC layout (64 bits, as made by src/clock.rs):
--
--     (unix milliseconds - 1704067200000) << 22  |  22-bit counter
--
-- i.e. milliseconds since 2024-01-01 00:00:00 UTC in the high bits, a logical
-- counter in the low 22 bits. A stamp travels as text 'B<hlc>' ("pin").
--
-- Functions that run in an application's transaction (the refusal triggers,
-- the event triggers, and what they call) are SECURITY DEFINER or called
-- from SECURITY DEFINER code: they name every object and operator with its
-- schema (OPERATOR(pg_catalog.=) and so on) or pin their search_path, so
-- nothing an application role creates can stand in for them.
--
-- Re-applied by every `meridian migrate` (CREATE OR REPLACE, with
-- check_function_bodies off, after the versioned migrations): each of
-- meridian's functions is defined here and nowhere else. See
-- migrations/README.md.

-- The wall-clock time of an HLC (its physical part), for reading changes.
CREATE OR REPLACE FUNCTION meridian.hlc_time(hlc bigint) RETURNS timestamptz
LANGUAGE sql IMMUTABLE STRICT
AS $$
    SELECT pg_catalog.to_timestamp(((hlc OPERATOR(pg_catalog.>>) 22)
                                    OPERATOR(pg_catalog.+) 1704067200000)
                                   OPERATOR(pg_catalog./) 1000.0)
$$;


-- An HLC made inside Postgres, for the rows capture_existing_rows records in
-- a schema change's transaction: the physical part from clock_timestamp(),
-- the counter from meridian.stamp_counter modulo 2^22.
CREATE OR REPLACE FUNCTION meridian.db_stamp() RETURNS bigint
LANGUAGE sql VOLATILE
AS $$
    SELECT ((pg_catalog.floor(pg_catalog.date_part('epoch', pg_catalog.clock_timestamp())
                              OPERATOR(pg_catalog.*) 1000)::pg_catalog.int8
             OPERATOR(pg_catalog.-) 1704067200000)
            OPERATOR(pg_catalog.<<) 22)
           OPERATOR(pg_catalog.|)
           (pg_catalog.nextval('meridian.stamp_counter'::pg_catalog.regclass)
            OPERATOR(pg_catalog.%) 4194304)
$$;


-- The keys of `decoded` with their values in `typed`: a row image as the
-- table is now (typed by its current columns) but holding only the columns
-- the WAL had when the change was made. A column added since is not
-- invented (it reaches peers with its own DDL and default).
CREATE OR REPLACE FUNCTION meridian.decoded_image(typed jsonb, decoded jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE WHEN typed IS NULL THEN NULL
                ELSE coalesce((SELECT jsonb_object_agg(k, v) FROM jsonb_each(typed) AS e(k, v) WHERE decoded ? k), '{}')
           END
$$;


-- The batch form of a table's capture, meridian.capture_rows_<oid>(ops,
-- news, olds, pins, helds, exact): what capture calls, once per table and
-- batch, with the batch's changes in stream order. For last-writer-wins
-- tables (with or without counters) and insert-only tables it is set-wise:
-- a few statements for the whole batch, each key's versions chained in SQL
-- (the i-th change of a key gets i + max(current version, max over j <= i
-- of (stamp_j - j)), which is max(stamp_i, previous + 1) unrolled), in two
-- window passes whose partition key starts with the key's hash (comparing
-- jsonb keys in sorts was where capture's time went), each change looking
-- its row's version up by index. Tables of the rule engine call their
-- per-change function in order. `exact`: the WAL's columns are the table's
-- columns now, so images need no trimming.
CREATE OR REPLACE FUNCTION meridian.make_bulk_capture(rel regclass, name text, region int, insert_only bool,
                                           pk_cols text[], counters text[]) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $make$
DECLARE
    fn       text := 'capture_rows_' || rel::oid;
    sig      text := '(text[], jsonb[], jsonb[], text[], bool[], bool)';
    fn_oid   oid := to_regprocedure(format('meridian.%I%s', fn, sig));
    image    text := 'CASE WHEN exact THEN pg_catalog.to_jsonb(c.n) ELSE meridian.decoded_image(pg_catalog.to_jsonb(c.n), c.new_row) END';
    key_n    text;
    key_o    text;
    same     text;
    old_cnt  text;
    body     text;
BEGIN
    IF insert_only THEN
        body := format($tpl$
-- Generated by meridian.make_bulk_capture() for table %1$s (insert-only), region %2$s.
BEGIN
    INSERT INTO meridian.change (seq, origin, hlc, tx_hlc, via_proxy, tbl, op, pk, "row")
    SELECT x.s, %2$s, x.stamp, x.stamp, pg_catalog.starts_with(x.pin, 'P'), %1$L, 'I',
           pg_catalog.jsonb_build_object('meridian_row', pg_catalog.concat(%3$L, x.s)), x.img
      FROM (SELECT pg_catalog.nextval('meridian.change_seq'::pg_catalog.regclass) AS s,
                   pg_catalog.substr(c.pin, 2)::pg_catalog.int8 AS stamp, c.pin, %4$s AS img
              FROM (SELECT u.ord, u.pin, u.new_row, pg_catalog.jsonb_populate_record(NULL::%1$s, u.new_row) AS n
                      FROM ROWS FROM (pg_catalog.unnest(ops), pg_catalog.unnest(news), pg_catalog.unnest(pins)) WITH ORDINALITY AS u(op, new_row, pin, ord)
                     WHERE u.op OPERATOR(pg_catalog.=) 'INSERT') c
             ORDER BY c.ord) x;
END
$tpl$, name, region, region || '-', image);
    ELSIF EXISTS (SELECT 1 FROM meridian.engine_table e WHERE e.tbl = name) THEN
        body := format($tpl$
-- Generated by meridian.make_bulk_capture() for table %1$s (rule engine), region %2$s.
BEGIN
    PERFORM meridian.%3$I(u.op, u.new_row, u.old_row, u.pin, u.held)
       FROM ROWS FROM (pg_catalog.unnest(ops), pg_catalog.unnest(news), pg_catalog.unnest(olds), pg_catalog.unnest(pins), pg_catalog.unnest(helds))
            WITH ORDINALITY AS u(op, new_row, old_row, pin, held, ord)
      ORDER BY u.ord;
END
$tpl$, name, region, 'capture_' || rel::oid);
    ELSE
        SELECT string_agg(format('%L, (c.n).%I', k, k), ', ' ORDER BY o),
               string_agg(format('%L, (c.o).%I', k, k), ', ' ORDER BY o)
          INTO key_n, key_o
          FROM unnest(pk_cols) WITH ORDINALITY AS u(k, o);
        SELECT string_agg(format('(c.n).%I OPERATOR(%I.%s) (c.o).%I', a.attname, opn.nspname, op.oprname, a.attname),
                          ' AND ' ORDER BY k.ord)
          INTO same
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
        SELECT CASE WHEN cardinality(counters) = 0 THEN 'NULL::pg_catalog.jsonb'
                    ELSE 'pg_catalog.jsonb_build_object('
                         || string_agg(format('%L, (c.o).%I', k, k), ', ' ORDER BY o) || ')'
               END
          INTO old_cnt
          FROM unnest(counters) WITH ORDINALITY AS u(k, o);
        body := format($tpl$
-- Generated by meridian.make_bulk_capture() for table %1$s, region %2$s.
-- A key-changing update is a delete of the old key (unless the transaction
-- gives another row that key: helds) and an insert of the new one.
BEGIN
    WITH c AS (
        SELECT u.ord, u.op, u.pin, pg_catalog.substr(u.pin, 2)::pg_catalog.int8 AS stamp, u.new_row, u.held,
               pg_catalog.jsonb_populate_record(NULL::%1$s, u.new_row) AS n,
               pg_catalog.jsonb_populate_record(NULL::%1$s, u.old_row) AS o
          FROM ROWS FROM (pg_catalog.unnest(ops), pg_catalog.unnest(news), pg_catalog.unnest(olds), pg_catalog.unnest(pins), pg_catalog.unnest(helds))
            WITH ORDINALITY AS u(op, new_row, old_row, pin, held, ord)
    ), ch AS (
        SELECT c.ord, 0 AS sub, 'D'::"char" AS op, pg_catalog.jsonb_build_object(%4$s) AS pk,
               NULL::pg_catalog.jsonb AS "row", NULL::pg_catalog.jsonb AS old, true AS deleted, c.stamp, c.pin
          FROM c
         WHERE c.op OPERATOR(pg_catalog.=) 'DELETE'
            OR (c.op OPERATOR(pg_catalog.=) 'UPDATE' AND NOT (%5$s) AND NOT c.held)
        UNION ALL
        SELECT c.ord, 1,
               CASE WHEN c.op OPERATOR(pg_catalog.=) 'UPDATE' AND (%5$s) THEN 'U' ELSE 'I' END::"char",
               pg_catalog.jsonb_build_object(%3$s), %6$s,
               CASE WHEN c.op OPERATOR(pg_catalog.=) 'UPDATE' AND (%5$s) THEN %7$s END,
               false, c.stamp, c.pin
          FROM c
         WHERE c.op OPERATOR(pg_catalog.<>) 'DELETE'
    ), ranked AS (
        -- Each key's changes in stream order. The partition key starts with
        -- the key's hash, so the sort compares integers and compares the
        -- jsonb keys themselves only within one hash (jsonb_hash agrees with
        -- jsonb equality).
        SELECT h.*,
               pg_catalog.row_number() OVER w AS i,
               pg_catalog.count(*) OVER (PARTITION BY h.kh, h.pk) AS n
          FROM (SELECT ch.*, pg_catalog.jsonb_hash(ch.pk) AS kh FROM ch) h
        WINDOW w AS (PARTITION BY h.kh, h.pk ORDER BY h.ord, h.sub)
    ), based AS (
        -- ver_i = i + max(current version, max over j <= i of (stamp_j - j));
        -- the base of the i-th change is the (i-1)-th's version (the same
        -- formula over j < i), or the current version for the first.
        SELECT x.*,
               x.i OPERATOR(pg_catalog.+) GREATEST(x.cur_hlc, x.m) AS ver,
               CASE WHEN x.i OPERATOR(pg_catalog.=) 1 THEN x.cur_hlc
                    ELSE x.i OPERATOR(pg_catalog.-) 1 OPERATOR(pg_catalog.+) GREATEST(x.cur_hlc, x.m_prev) END AS base_hlc,
               CASE WHEN x.i OPERATOR(pg_catalog.=) 1 THEN x.cur_origin ELSE %2$s END AS base_origin
          FROM (SELECT r.*, v.hlc AS cur_hlc, v.origin AS cur_origin,
                       pg_catalog.max(r.stamp OPERATOR(pg_catalog.-) r.i) OVER (w ROWS UNBOUNDED PRECEDING) AS m,
                       pg_catalog.max(r.stamp OPERATOR(pg_catalog.-) r.i) OVER (w ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS m_prev
                  FROM ranked r
                  -- One index lookup per change, whatever the statistics say:
                  -- as a plain join, a row_version whose statistics predate
                  -- its growth was scanned whole for every change.
                  LEFT JOIN LATERAL (SELECT v.hlc, v.origin FROM meridian.row_version v
                                      WHERE v.tbl OPERATOR(pg_catalog.=) %1$L AND v.pk OPERATOR(pg_catalog.=) r.pk
                                      LIMIT 1) v ON true
                WINDOW w AS (PARTITION BY r.kh, r.pk ORDER BY r.ord, r.sub)) x
    ), logged AS (
        INSERT INTO meridian.change (origin, hlc, tx_hlc, via_proxy, tbl, op, pk, "row", old, base_hlc, base_origin)
        SELECT %2$s, b.ver, b.stamp, pg_catalog.starts_with(b.pin, 'P'), %1$L, b.op, b.pk, b."row", b.old,
               b.base_hlc, b.base_origin
          FROM based b ORDER BY b.ord, b.sub
    )
    INSERT INTO meridian.row_version AS v (tbl, pk, hlc, origin, deleted, base_hlc, base_origin)
    SELECT %1$L, b.pk, b.ver, %2$s, b.deleted, b.base_hlc, b.base_origin
      FROM based b WHERE b.i OPERATOR(pg_catalog.=) b.n
    ON CONFLICT (tbl, pk) DO UPDATE
       SET hlc = excluded.hlc, origin = excluded.origin, deleted = excluded.deleted,
           base_hlc = excluded.base_hlc, base_origin = excluded.base_origin,
           winner_hlc = NULL, winner_origin = NULL;
END
$tpl$, name, region, key_n, key_o, same, image, old_cnt);
    END IF;
    IF fn_oid IS NULL OR (SELECT p.prosrc FROM pg_proc p WHERE p.oid = fn_oid) IS DISTINCT FROM body THEN
        EXECUTE format('CREATE OR REPLACE FUNCTION meridian.%I(ops text[], news jsonb[], olds jsonb[], pins text[], '
                       'helds bool[], exact bool) RETURNS void LANGUAGE plpgsql AS %L', fn, body);
        EXECUTE format('REVOKE ALL ON FUNCTION meridian.%I%s FROM PUBLIC', fn, sig);
    END IF;
END
$make$;


-- One statement of a table's per-change capture function (rule-engine
-- tables): upserts the row's version in meridian.row_version (above the stamp
-- and above its previous version) and records the change with that version,
-- its base (the version it was made on) and, for the rule engine, the
-- write's incarnation, epoch and merged-column metadata; a local write also
-- clears the row's winner. One SQL statement, so a change costs one executor
-- run. key_args are jsonb_build_object arguments; row_expr and old_expr are
-- SQL expressions (or NULL); indent is the indentation of the statement's
-- lines after the first. The function it is placed in provides the
-- variable pin ('B<hlc>').
CREATE OR REPLACE FUNCTION meridian.change_stmt(tbl text, region int, op "char", key_args text,
                                                deleted bool, row_expr text, old_expr text,
                                                indent int) RETURNS text
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    rules jsonb;
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
        -- The version a pre-existing row's unchanged columns count as
        -- written by: its winner, else its version (0, 0 for a row from
        -- before capture, as the receiver reads it).
        stmt := format($stmt$WITH ver AS (
    INSERT INTO meridian.row_version AS v (tbl, pk, hlc, origin, deleted, gen, tag_hlc, tag_origin, epoch, cols)
    VALUES (%1$L, pg_catalog.jsonb_build_object(%4$s),
            pg_catalog.substr(pin, 2)::pg_catalog.int8, %2$s, %5$s, 0,
            %9$s, %10$s, %11$s, %12$s)
    ON CONFLICT (tbl, pk) DO UPDATE
       SET hlc = %8$s,
           origin = excluded.origin, deleted = excluded.deleted,
           base_hlc = v.hlc, base_origin = v.origin,
           winner_hlc = NULL, winner_origin = NULL,
           gen = COALESCE(v.gen, 0) OPERATOR(pg_catalog.+) %13$s,
           tag_hlc = %14$s,
           tag_origin = %15$s,
           epoch = COALESCE(v.epoch, 0) OPERATOR(pg_catalog.+) 1,
           cols = %16$s
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
            -- 9-12: a key without a version: new here (insert), or a row
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
            -- 13-15: an insert on a tombstone starts the next incarnation
            CASE WHEN op = 'I' THEN 'CASE WHEN v.deleted THEN 1 ELSE 0 END' ELSE '0' END,
            CASE WHEN op = 'I' THEN format('CASE WHEN v.deleted THEN %s ELSE COALESCE(v.tag_hlc, v.winner_hlc, v.hlc) END', new_hlc)
                 ELSE 'COALESCE(v.tag_hlc, v.winner_hlc, v.hlc)' END,
            CASE WHEN op = 'I' THEN 'CASE WHEN v.deleted THEN excluded.origin ELSE COALESCE(v.tag_origin, v.winner_origin, v.origin) END'
                 ELSE 'COALESCE(v.tag_origin, v.winner_origin, v.origin)' END,
            -- 16: merged-column metadata
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


-- The change of a TRUNCATE, recorded by capture: every row of the table
-- gets a tombstone above its version.
CREATE OR REPLACE FUNCTION meridian.capture_truncate(name text, pin text) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    stamp  int8 := substr(pin, 2)::int8;
    region int;
BEGIN
    SELECT n.region_id INTO region FROM meridian.node n;
    UPDATE meridian.row_version v
       SET hlc = GREATEST(stamp, v.hlc + 1), origin = region, deleted = true
     WHERE v.tbl = name AND NOT v.deleted;
    INSERT INTO meridian.change (origin, hlc, tx_hlc, via_proxy, tbl, op)
    VALUES (region, stamp, stamp, starts_with(pin, 'P'), name, 'T');
END
$$;


-- A schema change read from meridian.ddl_out, recorded in stream order.
CREATE OR REPLACE FUNCTION meridian.capture_ddl(ddl jsonb, pin text) RETURNS void
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$
    INSERT INTO meridian.change (origin, hlc, tx_hlc, via_proxy, tbl, op, pk, "row")
    SELECT n.region_id, substr(pin, 2)::int8, substr(pin, 2)::int8, starts_with(pin, 'P'), '', 'S', NULL, ddl
      FROM meridian.node n
$$;


-- Captures the rows rel holds now as inserts, in the running transaction
-- (the schema change that gave rel its key), and returns how many. Capture
-- proper only sees changes from now on, so these are recorded here, with the
-- per-change capture statement (change_stmt) run over the rows, under one
-- stamp made in Postgres for the transaction (db_stamp, kept as a
-- transaction mark for the transaction's other tables; see marks.sql).
CREATE OR REPLACE FUNCTION meridian.capture_existing_rows(rel regclass) RETURNS bigint
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
    pin pg_catalog.text := meridian.marked('tx_stamp', true);
    r %s;
BEGIN
    IF pin IS NULL OR pin OPERATOR(pg_catalog.=) '' THEN
        pin := pg_catalog.concat('B', meridian.db_stamp());
        PERFORM meridian.mark('tx_stamp', pin);
    END IF;
    %s
END
$body$$do$, rel, stmt);
    RETURN n;
END
$fn$;


--------------------------------------------------------------------------------
-- Reading changes
--------------------------------------------------------------------------------

-- Up to lim changes after position (after_xid, after_seq), in (xid, seq)
-- order. Start with ('0', 0); continue from the last row returned.
--
-- Why the xid bound: seq is taken when a row is written, not when its
-- transaction commits, and a transaction's changes only become visible at
-- commit. Reading "everything visible after my position" could therefore
-- step past changes of a transaction that is still running and that will
-- commit later with positions below the ones already read; those would never
-- be shipped. Only transactions with an xid below the xmin of a snapshot
-- (the oldest transaction still running when it was taken) are certainly
-- finished, committed or aborted. So only their changes are returned, and the
-- position never moves past a change that may still commit.
--
-- The bound must come from the same snapshot the rows are read with (or an
-- older one): a bound from a newer snapshot could admit a transaction that
-- committed after the rows were read, whose changes the read did not see. Both
-- come from one query here: pg_current_snapshot() returns the snapshot that
-- query reads with. The function is STABLE, so it runs in the caller's
-- snapshot and may be inlined into the calling query; the scan is a range
-- scan of change's primary key.
CREATE OR REPLACE FUNCTION meridian.read_changes(after_xid xid8, after_seq bigint, lim int)
RETURNS SETOF meridian.change
LANGUAGE sql STABLE
AS $$
    SELECT c.*
      FROM meridian.change c
     WHERE (c.xid, c.seq) OPERATOR(pg_catalog.>) (after_xid, after_seq)
       AND c.xid OPERATOR(pg_catalog.<) pg_catalog.pg_snapshot_xmin(pg_catalog.pg_current_snapshot())
     ORDER BY c.xid, c.seq
     LIMIT lim
$$;
