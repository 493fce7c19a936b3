-- meridian migration 10: capture from the WAL instead of row triggers.
--
-- Until now every captured row cost a PL/pgSQL trigger inside the client's
-- transaction (a JSON image, a version upsert, a change row). Now nothing
-- runs in the client's transaction: Postgres' own WAL holds every committed
-- change, and meridian reads it through a logical replication slot
-- (pgoutput, publication "meridian"). meridian's capture task
-- (src/capture/wal.rs) stamps each decoded transaction with its HLC, in
-- commit order, and calls the table's generated capture function for each
-- row change, in batches of many transactions per local transaction, with
-- the slot position it reached (meridian.capture_progress) in the same
-- transaction. What the functions write is what the triggers wrote:
-- meridian.change, meridian.row_version, the rule engine's row states.
--
-- What stays inside the client's transaction is only what must refuse a
-- statement there: UPDATE and DELETE on insert-only tables, and updates that
-- move a grow-only merged column back (row triggers on those tables only).
--
-- Captured tables get REPLICA IDENTITY FULL, so the WAL holds each update's
-- and delete's whole old row (counters' deltas, the engine's per-column
-- versions, and the values of unchanged TOASTed columns come from it).
--
-- Transactions made by meridian's apply sessions carry a replication
-- origin (meridian.apply_session_setup) and are not captured again.
-- Schema changes reach the stream through meridian.ddl_out, a published
-- table, so they keep their place among the row changes.

CREATE TABLE meridian.capture_progress (
    single bool PRIMARY KEY DEFAULT true CHECK (single),
    lsn    pg_lsn NOT NULL,
    done   bigint NOT NULL,
    committed_at timestamptz
);
-- Nothing older than now can reach capture: the slot is made after this.
INSERT INTO meridian.capture_progress (lsn, done, committed_at) VALUES ('0/0', 0, now());

COMMENT ON TABLE meridian.capture_progress IS
    'Where capture is, written with the changes it recorded: the end LSN of the last whole '
    'transaction recorded (done = 0), or the commit LSN of one recorded in parts and how many '
    'of its changes are in; committed_at: when the last of them committed (bounds the floor).';

CREATE TABLE meridian.ddl_out (
    id    bigserial PRIMARY KEY,
    "row" jsonb NOT NULL
);

COMMENT ON TABLE meridian.ddl_out IS
    'Schema changes made here, in the WAL so capture sees them in commit order; pruned by housekeeping.';

-- A partitioned table's changes are published as its own (not its partitions').
CREATE PUBLICATION meridian WITH (publish_via_partition_root = true);
ALTER PUBLICATION meridian ADD TABLE meridian.ddl_out;

-- The slot's name: one per database (slots are cluster-wide).
CREATE FUNCTION meridian.slot_name() RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT 'meridian_' || d.oid FROM pg_database d WHERE d.datname = current_database()
$$;

-- Marks this session's transactions as applied by meridian, so capture
-- does not ship them again: the session takes a replication origin of this
-- database (meridian_<database oid>_<n>, n = 1..16; names and their state
-- are cluster-wide, and Postgres 15 lets one session at a time use an
-- origin, so each concurrent apply session needs its own).
CREATE FUNCTION meridian.apply_session_setup() RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    base text := (SELECT 'meridian_' || d.oid || '_' FROM pg_database d WHERE d.datname = current_database());
    name text;
BEGIN
    IF pg_replication_origin_session_is_setup() THEN
        RETURN;
    END IF;
    FOR i IN 1..16 LOOP
        name := base || i;
        BEGIN
            IF pg_replication_origin_oid(name) IS NULL THEN
                PERFORM pg_replication_origin_create(name);
            END IF;
            PERFORM pg_replication_origin_session_setup(name);
            RETURN;
        EXCEPTION WHEN object_in_use OR unique_violation THEN
            NULL;   -- another apply session has this one: try the next
        END;
    END LOOP;
    RAISE EXCEPTION 'all 16 replication origins for meridian''s apply sessions in this database are in use'
        USING ERRCODE = '53400';
END
$$;

-- The capture statement (migrations 1, 5, 6) without the grow-only check,
-- which moved to a trigger in the client's transaction (guard_growth).
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

-- This region's floor (migration 3): every change it captures from now on
-- has a row version above it. Capture stamps a transaction with its commit
-- time (src/capture/wal.rs), so a transaction committed but not recorded yet
-- bounds it too: the floor stays below the commit time of the last one
-- capture recorded (or its last sync point).
CREATE OR REPLACE FUNCTION meridian.local_floor(grace_ms bigint) RETURNS bigint
LANGUAGE sql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT ((floor(extract(epoch FROM least(
                clock_timestamp(),
                (SELECT min(a.xact_start) FROM pg_stat_activity a
                  WHERE a.datid = (SELECT d.oid FROM pg_database d WHERE d.datname = current_database())
                    AND a.backend_type = 'client backend'),
                (SELECT min(p.prepared) FROM pg_prepared_xacts p
                  WHERE p.database = current_database()),
                (SELECT c.committed_at FROM meridian.capture_progress c))) * 1000)::int8
             - 1704067200000 - grace_ms) << 22)
$$;

-- The keys of `decoded` with their values in `typed`: a row image as the
-- table is now (typed by its current columns) but holding only the columns
-- the WAL had when the change was made. A column added since is not
-- invented (it reaches peers with its own DDL and default).
CREATE FUNCTION meridian.decoded_image(typed jsonb, decoded jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE WHEN typed IS NULL THEN NULL
                ELSE coalesce((SELECT jsonb_object_agg(k, v) FROM jsonb_each(typed) AS e(k, v) WHERE decoded ? k), '{}')
           END
$$;

-- Refuses UPDATE and DELETE of an insert-only table's rows, in the client's
-- transaction (row trigger; arguments: the table's name).
CREATE FUNCTION meridian.refuse_change() RETURNS trigger
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
CREATE FUNCTION meridian.guard_growth() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM meridian.check_growth(TG_ARGV[0], TG_ARGV[1]::jsonb, to_jsonb(OLD), to_jsonb(NEW));
    RETURN NEW;
END
$$;

-- Creates trigger `trg` on rel running `fn` with `args`, or drops it when fn
-- is NULL; recreates it only when it differs.
CREATE FUNCTION meridian.ensure_trigger(rel regclass, trg text, timing text, fn text, args text[])
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

-- The change of a TRUNCATE, recorded by capture: every row of the table
-- gets a tombstone above its version.
CREATE FUNCTION meridian.capture_truncate(name text, pin text) RETURNS void
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
CREATE FUNCTION meridian.capture_ddl(ddl jsonb, pin text) RETURNS void
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$
    INSERT INTO meridian.change (origin, hlc, tx_hlc, via_proxy, tbl, op, pk, "row")
    SELECT n.region_id, substr(pin, 2)::int8, substr(pin, 2)::int8, starts_with(pin, 'P'), '', 'S', NULL, ddl
      FROM meridian.node n
$$;

-- The batch form of a table's capture, meridian.capture_rows_<oid>(ops,
-- news, olds, pins, helds, exact): what capture calls, once per table and
-- batch, with the batch's changes in stream order. For last-writer-wins
-- tables (with or without counters) and insert-only tables it is set-wise:
-- a few statements for the whole batch, each key's versions chained in SQL
-- (the i-th change of a key gets i + max(current version, max over j <= i
-- of (stamp_j - j)), which is max(stamp_i, previous + 1) unrolled). Tables
-- of the rule engine call their per-change function in order. `exact`: the
-- WAL's columns are the table's columns now, so images need no trimming.
CREATE FUNCTION meridian.make_bulk_capture(rel regclass, name text, region int, insert_only bool,
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
        SELECT ch.*, pg_catalog.row_number() OVER (PARTITION BY ch.pk ORDER BY ch.ord, ch.sub) AS i
          FROM ch
    ), chained AS (
        SELECT r.*, v.hlc AS cur_hlc, v.origin AS cur_origin,
               r.i OPERATOR(pg_catalog.+) GREATEST(v.hlc, pg_catalog.max(r.stamp OPERATOR(pg_catalog.-) r.i)
                   OVER (PARTITION BY r.pk ORDER BY r.ord, r.sub ROWS UNBOUNDED PRECEDING)) AS ver
          FROM ranked r
          LEFT JOIN meridian.row_version v ON v.tbl OPERATOR(pg_catalog.=) %1$L AND v.pk OPERATOR(pg_catalog.=) r.pk
    ), based AS (
        SELECT x.*,
               COALESCE(pg_catalog.lag(x.ver) OVER (PARTITION BY x.pk ORDER BY x.ord, x.sub), x.cur_hlc) AS base_hlc,
               CASE WHEN x.i OPERATOR(pg_catalog.=) 1 THEN x.cur_origin ELSE %2$s END AS base_origin,
               pg_catalog.row_number() OVER (PARTITION BY x.pk ORDER BY x.ord DESC, x.sub DESC) AS from_last
          FROM chained x
    ), logged AS (
        INSERT INTO meridian.change (origin, hlc, tx_hlc, via_proxy, tbl, op, pk, "row", old, base_hlc, base_origin)
        SELECT %2$s, b.ver, b.stamp, pg_catalog.starts_with(b.pin, 'P'), %1$L, b.op, b.pk, b."row", b.old,
               b.base_hlc, b.base_origin
          FROM based b ORDER BY b.ord, b.sub
    )
    INSERT INTO meridian.row_version AS v (tbl, pk, hlc, origin, deleted, base_hlc, base_origin)
    SELECT %1$L, b.pk, b.ver, %2$s, b.deleted, b.base_hlc, b.base_origin
      FROM based b WHERE b.from_last OPERATOR(pg_catalog.=) 1
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

-- Installs capture on a table: its capture function (called by the capture
-- task for each decoded change of the table), REPLICA IDENTITY FULL, its
-- place in the publication, the refusal triggers its rules need, and
-- region-disjoint sequences. Idempotent; called again on every ALTER TABLE
-- and when its rules change.
CREATE OR REPLACE FUNCTION meridian.enable_capture(rel regclass) RETURNS text
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
    IF nsp = 'meridian' THEN
        RAISE EXCEPTION 'cannot capture %: tables of schema meridian are never replicated', rel
            USING ERRCODE = '0A000';
    END IF;
    IF is_part THEN
        RAISE EXCEPTION 'cannot capture partition % on its own: capture its partitioned table', rel
            USING ERRCODE = '0A000';
    END IF;

    fn := 'capture_' || rel::oid;
    fn_oid := to_regprocedure(format('meridian.%I(text, jsonb, jsonb, text, bool)', fn));
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
        fn_oid := to_regprocedure(format('meridian.%I(text, jsonb, jsonb, text, bool)', fn));
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
    PERFORM set_config('meridian.in_capture', 'on', true);
    IF ident <> 'f' THEN
        EXECUTE format('ALTER TABLE %s REPLICA IDENTITY FULL', rel);
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_publication_rel pr JOIN pg_publication p ON p.oid = pr.prpubid
                    WHERE p.pubname = 'meridian' AND pr.prrelid = rel) THEN
        EXECUTE format('ALTER PUBLICATION meridian ADD TABLE %s', rel);
    END IF;
    PERFORM set_config('meridian.in_capture', 'off', true);

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
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    name text := meridian.table_name(rel);
BEGIN
    IF name IS NULL THEN
        RAISE EXCEPTION 'relation % does not exist', rel USING ERRCODE = '42P01';
    END IF;
    PERFORM set_config('meridian.in_capture', 'on', true);
    IF EXISTS (SELECT 1 FROM pg_publication_rel pr JOIN pg_publication p ON p.oid = pr.prpubid
                WHERE p.pubname = 'meridian' AND pr.prrelid = rel) THEN
        EXECUTE format('ALTER PUBLICATION meridian DROP TABLE %s', rel);
    END IF;
    PERFORM set_config('meridian.in_capture', 'off', true);
    PERFORM meridian.ensure_trigger(rel, 'meridian_insert_only', NULL, NULL, NULL);
    PERFORM meridian.ensure_trigger(rel, 'meridian_growth', NULL, NULL, NULL);
    EXECUTE format('DROP FUNCTION IF EXISTS meridian.%I(text, jsonb, jsonb, text, bool)', 'capture_' || rel::oid);
    EXECUTE format('DROP FUNCTION IF EXISTS meridian.%I(text[], jsonb[], jsonb[], text[], bool[], bool)',
                   'capture_rows_' || rel::oid);
    UPDATE meridian.replicated_table r SET captured = false WHERE r.tbl = name AND r.captured;
END
$$;

-- Captured-or-not, as the event trigger sees a table: its capture function exists.
CREATE FUNCTION meridian.is_captured(rel regclass) RETURNS bool
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT to_regprocedure(format('meridian.%I(text, jsonb, jsonb, text, bool)', 'capture_' || rel::oid)) IS NOT NULL
$$;

-- The event trigger after CREATE/ALTER TABLE (migration 8), with "captured"
-- now meaning: the table has its capture function.
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

-- Replicated schema changes (migration 7) now go to meridian.ddl_out, so
-- they reach capture in commit order among the row changes.
CREATE OR REPLACE FUNCTION meridian.on_ddl_replicate() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER
AS $$
DECLARE
    nd meridian.node;
    ctx pg_catalog.text;
    callers pg_catalog.text;
    stmt pg_catalog.text;
    relevant pg_catalog.bool;
    dropped pg_catalog.bool := pg_catalog.current_setting('meridian.dropped_replicated', true) OPERATOR(pg_catalog.=) 'on';
BEGIN
    IF dropped THEN
        PERFORM pg_catalog.set_config('meridian.dropped_replicated', '', true);
    END IF;
    SELECT * INTO nd FROM meridian.node;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    IF pg_catalog.starts_with(tg_tag, 'DROP') THEN
        relevant := dropped;
    ELSE
        SELECT pg_catalog.bool_or(d.schema_name OPERATOR(pg_catalog.=) ANY (nd.schemas) AND NOT d.in_extension)
          INTO relevant
          FROM pg_catalog.pg_event_trigger_ddl_commands() d;
    END IF;
    -- The first line of the call stack is this function; anything below it
    -- means the DDL ran inside a function or DO block.
    GET DIAGNOSTICS ctx = PG_CONTEXT;
    IF pg_catalog.strpos(ctx, pg_catalog.chr(10)) OPERATOR(pg_catalog.>) 0 THEN
        callers := pg_catalog.substr(ctx, pg_catalog.strpos(ctx, pg_catalog.chr(10)) OPERATOR(pg_catalog.+) 1);
        IF relevant AND pg_catalog.strpos(callers, 'function meridian.') OPERATOR(pg_catalog.=) 0 THEN
            RAISE EXCEPTION 'meridian cannot replicate this %: it runs inside a function or DO block, and only schema changes sent as statements are replicated to other regions', tg_tag
                USING ERRCODE = 'feature_not_supported',
                      HINT = 'Send the schema change as a statement of its own.';
        END IF;
        RETURN;   -- meridian's own (enable_capture), or not on replicated objects
    END IF;
    stmt := meridian.current_statement(pg_catalog.current_query(), tg_tag, relevant IS TRUE);
    IF relevant IS NOT TRUE THEN
        RETURN;
    END IF;
    IF tg_tag OPERATOR(pg_catalog.=) ANY (ARRAY['CREATE TABLE AS', 'SELECT INTO']) THEN
        RAISE EXCEPTION 'meridian cannot replicate %: the rows it writes are not captured', tg_tag
            USING ERRCODE = 'feature_not_supported',
                  HINT = 'Create the table with CREATE TABLE, then fill it with INSERT ... SELECT.';
    END IF;
    INSERT INTO meridian.ddl_out ("row")
    VALUES (pg_catalog.jsonb_build_object('sql', stmt, 'search_path', pg_catalog.current_setting('search_path'),
                                          'tag', tg_tag));
END
$$;

-- Every table captured by trigger so far moves to the new capture.
DO $$
DECLARE
    t text;
    fn regprocedure;
BEGIN
    FOR t IN SELECT r.tbl FROM meridian.replicated_table r WHERE r.captured LOOP
        IF to_regclass(t) IS NOT NULL THEN
            EXECUTE format('DROP TRIGGER IF EXISTS meridian_capture ON %s', t);
            EXECUTE format('DROP TRIGGER IF EXISTS meridian_capture_truncate ON %s', t);
            EXECUTE format('DROP FUNCTION IF EXISTS meridian.%I()', 'capture_' || to_regclass(t)::oid);
            PERFORM meridian.enable_capture(to_regclass(t));
        END IF;
    END LOOP;
END
$$;

-- What is left of trigger capture (tables no longer listed included).
DO $$
DECLARE
    f regprocedure;
BEGIN
    FOR f IN SELECT p.oid FROM pg_proc p
              WHERE p.pronamespace = 'meridian'::regnamespace AND p.pronargs = 0
                AND p.prorettype = 'trigger'::regtype
                AND (p.proname LIKE 'capture\_%' OR p.proname = 'capture_truncate') LOOP
        EXECUTE format('DROP FUNCTION %s CASCADE', f);
    END LOOP;
END
$$;

REVOKE ALL ON FUNCTION meridian.apply_session_setup() FROM PUBLIC;
REVOKE ALL ON FUNCTION meridian.capture_truncate(text, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION meridian.capture_ddl(jsonb, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION meridian.ensure_trigger(regclass, text, text, text, text[]) FROM PUBLIC;
REVOKE ALL ON FUNCTION meridian.make_bulk_capture(regclass, text, int, bool, text[], text[]) FROM PUBLIC;

-- Makes the local state an apply decides on exact. Capture records a local
-- transaction a moment after it commits, so before comparing a peer's
-- changes with the local rows' versions, the apply session (1) locks the
-- rows it will decide on (FOR UPDATE; from then on no local transaction can
-- change them until it commits), or, when some of a table's keys have no
-- row here (inserts, tombstones), the whole table against local writes
-- (SHARE ROW EXCLUSIVE, for the rest of its transaction), and then (2)
-- waits until capture has recorded every transaction committed before
-- (src/capture/wal.rs, Barrier). Insert-only tables need neither: their
-- keys are made per region and never meet.
CREATE FUNCTION meridian.lock_keys(changes jsonb) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    t      text;
    pks    jsonb;
    rel    regclass;
    cols   text;
    t_cols text;
    locked bigint;
BEGIN
    -- As apply_batch does: an apply that deadlocks with a local transaction
    -- is the one to give way (and is retried), and quickly.
    PERFORM set_config('deadlock_timeout', '20ms', true);
    FOR t, pks IN
        SELECT c ->> 'tbl', jsonb_agg(DISTINCT c -> 'pk')
          FROM jsonb_array_elements(changes) AS c
         WHERE c ->> 'op' IN ('I', 'U', 'D') AND jsonb_typeof(c -> 'pk') = 'object'
         GROUP BY 1 ORDER BY 1
    LOOP
        rel := to_regclass(t);
        CONTINUE WHEN rel IS NULL
                   OR EXISTS (SELECT 1 FROM meridian.replicated_table r WHERE r.tbl = t AND r.insert_only);
        SELECT string_agg(format('%I', a.attname), ', ' ORDER BY k.ord),
               string_agg(format('t.%I', a.attname), ', ' ORDER BY k.ord)
          INTO cols, t_cols
          FROM pg_index i
          CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
          JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
         WHERE i.indrelid = rel AND i.indisprimary;
        CONTINUE WHEN cols IS NULL;
        EXECUTE format('WITH l AS (SELECT 1 FROM %1$s t WHERE (%2$s) IN (SELECT %3$s FROM jsonb_populate_recordset(NULL::%1$s, $1))
                                   ORDER BY %2$s FOR UPDATE OF t)
                        SELECT count(*) FROM l', rel, t_cols, cols)
          INTO locked USING pks;
        IF locked < jsonb_array_length(pks) THEN
            EXECUTE format('LOCK TABLE %s IN SHARE ROW EXCLUSIVE MODE', rel);
        END IF;
    END LOOP;
END
$$;

REVOKE ALL ON FUNCTION meridian.lock_keys(jsonb) FROM PUBLIC;
