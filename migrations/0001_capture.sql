-- 0001_capture.sql: change capture for replicated tables.
--
-- Every committed INSERT, UPDATE, DELETE and TRUNCATE on a replicated table is
-- recorded as a row in meridian.change, in the same transaction as the write
-- itself, so a change exists if and only if the write committed. Each change
-- carries the hybrid logical clock (HLC) stamp of its transaction and a
-- per-row version, and is later read in order with meridian.read_changes()
-- and shipped to the other regions.
--
-- The migration runner applies this file once, inside one transaction, after
-- creating the schema meridian. Requires PostgreSQL 15 and a superuser (event
-- triggers and SECURITY DEFINER trigger functions).
--
-- HLC layout (64 bits, as produced by the proxy's clock):
--
--     (unix milliseconds - 1704067200000) << 22  |  22-bit counter
--
-- i.e. milliseconds since 2024-01-01 00:00:00 UTC in the high bits, a logical
-- counter in the low 22 bits.
--
-- Settings (custom GUCs) read or written here:
--
--   meridian.stamp       session-level, set by the proxy before each writing
--                        transaction: decimal text of the HLC for it.
--   meridian.stamp_used  session-level, set here: the last proxy stamp a
--                        transaction of this session was given.
--   meridian.tx_stamp    transaction-local, set here: the stamp pinned for the
--                        running transaction, 'P<hlc>' (stamped by the proxy)
--                        or 'B<hlc>' (bypassed the proxy, stamped here).
--   meridian.applying    'on' while the replication apply writes rows that
--                        came from another region: those are not captured.
--   meridian.in_capture  transaction-local, set here while enable_capture runs
--                        its own DDL, so the event trigger does not recurse.
--
-- Known limits (by design or not handled here):
--
--   * Any session can SET meridian.applying = on (custom settings cannot be
--     restricted without a C module) and so write without capture; so can a
--     session with session_replication_role = replica, which skips ordinary
--     triggers. Only trusted roles should write to replicated tables.
--   * Rows written by CREATE TABLE AS / SELECT INTO themselves are not
--     captured: the capture trigger is created when that command ends.
--   * Only sequences owned by a column (serial, identity) are made
--     region-disjoint; a default calling nextval() on some other sequence is
--     left alone.
--   * Partitioned tables are captured through the partitioned table (its
--     row triggers are cloned onto the partitions); partitions themselves are
--     not captured separately. TRUNCATE of a single partition is not captured,
--     and a captured table must have capture disabled before it is attached
--     as a partition of a captured table (the trigger names would clash).
--   * A captured table stays captured when it is renamed or moved to another
--     schema (its rules follow it, see follow_rename); disable_capture stops it.

--------------------------------------------------------------------------------
-- Configuration of this region
--------------------------------------------------------------------------------

-- The region this database belongs to. Exactly one row once configured
-- (enforced by the unique index on a constant below).
CREATE TABLE meridian.node (
    region_id       int    NOT NULL,
    region_name     text   NOT NULL,
    schemas         text[] NOT NULL,   -- schemas whose tables are replicated
    sequence_stride int    NOT NULL,   -- sequences step by this, see enable_capture
    CHECK (region_id >= 1 AND region_id < sequence_stride)
);
CREATE UNIQUE INDEX node_single_row ON meridian.node ((true));

COMMENT ON TABLE meridian.node IS
    'This database''s region: one row, written by meridian.configure().';

-- Persisted high-water mark of the proxy's HLC, so a restarted proxy never
-- issues a stamp below one it issued before. Written by the proxy with
-- INSERT ... ON CONFLICT (region_id) DO UPDATE SET high_water =
-- greatest(clock.high_water, excluded.high_water).
CREATE TABLE meridian.clock (
    region_id  int PRIMARY KEY,
    high_water bigint NOT NULL
);

COMMENT ON TABLE meridian.clock IS
    'Highest HLC the proxy of each region has handed out (written by the proxy).';

-- Per-table replication rules, mirrored from the conflict-rules files, plus
-- whether capture is currently installed on the table. tbl is the table's
-- qualified name as format('%I.%I', schema, table) spells it.
CREATE TABLE meridian.replicated_table (
    tbl         text PRIMARY KEY,
    insert_only bool   NOT NULL DEFAULT false,  -- rows are only ever inserted
    counters    text[] NOT NULL DEFAULT '{}',   -- numeric columns merged as deltas
    captured    bool   NOT NULL DEFAULT false   -- capture trigger installed
);

COMMENT ON TABLE meridian.replicated_table IS
    'Replication rules per table (from the conflict-rules files) and capture state.';

--------------------------------------------------------------------------------
-- Captured changes
--------------------------------------------------------------------------------

-- Orders changes within a transaction. Taken when the row is written, not at
-- commit, so it is not a commit order (see read_changes). Each session
-- reserves 32 values at a time (fewer writes to the sequence): values still
-- increase within a transaction, which is the only order seq has to give.
CREATE SEQUENCE meridian.change_seq AS bigint CACHE 32;

-- One row per captured row change (one per TRUNCATE).
--   origin    region the change was made in
--   hlc       version given to the row by this change (>= tx_hlc, and above
--             every earlier version of the same row, see row_version)
--   tx_hlc    the stamp of the whole transaction
--   via_proxy false when the write bypassed the proxy (stamped by db_stamp)
--   op        'I' insert, 'U' update, 'D' delete, 'T' truncate
--   pk        the row's key as a JSON object {column: value}; null for 'T'
--   row       the new row as to_jsonb(NEW) for 'I' and 'U'; else null
--   old       for 'U' on a table with counter columns, their old values
--             {column: value}; else null
-- Only the capture triggers write here. op has no CHECK constraint on purpose:
-- a CHECK is re-read from the catalog for every INSERT statement, i.e. for
-- every captured row.
CREATE TABLE meridian.change (
    xid       xid8   NOT NULL DEFAULT pg_current_xact_id(),
    seq       bigint NOT NULL DEFAULT nextval('meridian.change_seq'),
    origin    int    NOT NULL,
    hlc       bigint NOT NULL,
    tx_hlc    bigint NOT NULL,
    via_proxy bool   NOT NULL,
    tbl       text   COLLATE "C" NOT NULL,
    op        "char" NOT NULL,
    pk        jsonb,
    "row"     jsonb,
    old       jsonb,
    PRIMARY KEY (xid, seq)
);

ALTER SEQUENCE meridian.change_seq OWNED BY meridian.change.seq;

COMMENT ON TABLE meridian.change IS
    'Captured row changes, written by the capture triggers, read with meridian.read_changes().';

-- The current version of every captured row (tombstones for deleted rows stay,
-- so a re-inserted key still gets a version above the deleted one). Only hlc,
-- origin and deleted change on update and none of them is indexed, so with
-- free space left on each page the upsert done per captured row can be a HOT
-- update (no index insertion).
CREATE TABLE meridian.row_version (
    tbl     text   COLLATE "C" NOT NULL,
    pk      jsonb  NOT NULL,
    hlc     bigint NOT NULL,
    origin  int    NOT NULL,
    deleted bool   NOT NULL,
    PRIMARY KEY (tbl, pk)
) WITH (fillfactor = 70);

COMMENT ON TABLE meridian.row_version IS
    'Current version (HLC) of each captured row, keyed by table and primary key.';

--------------------------------------------------------------------------------
-- Stamps
--
-- The functions on the capture path (db_stamp, pin_stamp and the generated
-- trigger functions) run inside application transactions, as SECURITY DEFINER
-- or called from SECURITY DEFINER code, with the application's search_path.
-- They therefore name every object and operator with its schema
-- (OPERATOR(pg_catalog.=) and so on), so nothing an application role creates
-- can stand in for them. They carry no SET search_path clause: a SET clause
-- costs a settings save and restore on every call, i.e. on every captured row.
-- The administrative functions are not on that path and simply pin their
-- search_path.
--------------------------------------------------------------------------------

-- Low 22 bits of stamps made inside Postgres (values are unique; cached per
-- session like change_seq).
CREATE SEQUENCE meridian.stamp_counter AS bigint CACHE 32;

-- An HLC made inside Postgres, for writes that did not come through the proxy
-- (no meridian.stamp set): the physical part from clock_timestamp(), the
-- counter from meridian.stamp_counter modulo 2^22.
CREATE FUNCTION meridian.db_stamp() RETURNS bigint
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

-- The wall-clock time of an HLC (its physical part), for reading changes.
CREATE FUNCTION meridian.hlc_time(hlc bigint) RETURNS timestamptz
LANGUAGE sql IMMUTABLE STRICT
AS $$
    SELECT pg_catalog.to_timestamp(((hlc OPERATOR(pg_catalog.>>) 22)
                                    OPERATOR(pg_catalog.+) 1704067200000)
                                   OPERATOR(pg_catalog./) 1000.0)
$$;

-- Pins the stamp of the running transaction; called by the capture triggers
-- for the first captured row of each transaction (later rows find the pin in
-- meridian.tx_stamp). Returns the pin: 'P<hlc>' when the proxy stamped the
-- transaction, 'B<hlc>' when the write bypassed the proxy.
--
-- The proxy sets meridian.stamp at session level, so the same value is still
-- there for a second transaction of the session that the proxy did not stamp
-- afresh (several transactions in one Query string, or a failed injection).
-- meridian.stamp_used remembers the last proxy stamp used in this session; a
-- stamp not above it is replaced by stamp_used + 1, so every transaction of a
-- session gets its own, increasing stamp.
--
-- Both settings follow the transaction: if it (or the savepoint that pinned
-- the stamp) rolls back, the pin and stamp_used revert with the changes that
-- used them.
CREATE FUNCTION meridian.pin_stamp() RETURNS text
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    given pg_catalog.text := pg_catalog.current_setting('meridian.stamp', true);
    used  pg_catalog.text;
    stamp pg_catalog.int8;
    pin   pg_catalog.text;
    ignored pg_catalog.text;
BEGIN
    -- NULL if the setting was never defined in this session; '' once it has
    -- been defined and then reverted, or if set to the empty string.
    IF given IS NULL OR given OPERATOR(pg_catalog.=) '' THEN
        pin := pg_catalog.concat('B', meridian.db_stamp());
    ELSE
        stamp := given::pg_catalog.int8;
        used := pg_catalog.current_setting('meridian.stamp_used', true);
        IF used IS NOT NULL AND used OPERATOR(pg_catalog.<>) '' THEN
            IF used::pg_catalog.int8 OPERATOR(pg_catalog.>=) stamp THEN
                stamp := used::pg_catalog.int8 OPERATOR(pg_catalog.+) 1;
            END IF;
        END IF;
        -- (Assignments, not PERFORM: an assignment is evaluated directly,
        -- PERFORM runs a query.)
        ignored := pg_catalog.set_config('meridian.stamp_used', stamp::pg_catalog.text, false);
        pin := pg_catalog.concat('P', stamp);
    END IF;
    ignored := pg_catalog.set_config('meridian.tx_stamp', pin, true);
    RETURN pin;
END
$$;

--------------------------------------------------------------------------------
-- Configuration functions
--------------------------------------------------------------------------------

-- Checks that every counter column exists on rel and has a numeric type
-- (smallint, integer, bigint, numeric, real, double precision, or a domain
-- over one of them).
CREATE FUNCTION meridian.check_counters(rel regclass, counters text[]) RETURNS void
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

-- Sets this database's region. region_id can be set once and never changed:
-- region ids are never reused, and rows already captured carry it. The name,
-- the replicated schemas and the stride may change.
--
-- When the stride changes, capture is re-enabled on every captured table so
-- their sequences follow the new stride. Tables already existing in a newly
-- listed schema are not captured by this function: call enable_capture for
-- them (new tables are captured by the event trigger). The region id is
-- written into the generated trigger functions, but as capture cannot be
-- enabled before configure has run, there is nothing to regenerate when the
-- id is first set.
CREATE FUNCTION meridian.configure(region_id int, region_name text, schemas text[],
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

-- Records the conflict rules of one table that matter to capture: whether it
-- is insert-only and which columns are counters. If the table is captured its
-- trigger is regenerated to follow the new rules.
CREATE FUNCTION meridian.set_table_rule(tbl regclass, insert_only bool, counters text[])
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
-- Capture triggers
--------------------------------------------------------------------------------

-- The TRUNCATE trigger of every captured table (statement level): one 'T'
-- change, and every live version of the table's rows becomes a tombstone, so
-- a key inserted again later still gets a version above the truncated one.
CREATE FUNCTION meridian.capture_truncate() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
AS $$
DECLARE
    pin    pg_catalog.text := pg_catalog.current_setting('meridian.tx_stamp', true);
    stamp  pg_catalog.int8;
    proxy  pg_catalog.bool;
    region pg_catalog.int4;
    name   pg_catalog.text;
BEGIN
    IF pg_catalog.current_setting('meridian.applying', true) OPERATOR(pg_catalog.=) 'on' THEN
        RETURN NULL;
    END IF;
    IF pin IS NULL OR pin OPERATOR(pg_catalog.=) '' THEN
        pin := meridian.pin_stamp();
    END IF;
    stamp := pg_catalog.substr(pin, 2)::pg_catalog.int8;
    proxy := pg_catalog.starts_with(pin, 'P');
    SELECT n.region_id INTO region FROM meridian.node n;
    name := pg_catalog.format('%I.%I', TG_TABLE_SCHEMA, TG_TABLE_NAME);

    UPDATE meridian.row_version v
       SET hlc = GREATEST(stamp, v.hlc OPERATOR(pg_catalog.+) 1),
           origin = region,
           deleted = true
     WHERE v.tbl OPERATOR(pg_catalog.=) name AND NOT v.deleted;

    INSERT INTO meridian.change (origin, hlc, tx_hlc, via_proxy, tbl, op)
    VALUES (region, stamp, stamp, proxy, name, 'T');
    RETURN NULL;
END
$$;

-- Text shared by enable_capture and the event trigger when a table cannot be
-- captured for want of a primary key.
CREATE FUNCTION meridian.no_key_message(tbl text) RETURNS text
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT format('table %s has no primary key, so meridian cannot capture its changes. '
                  'Either add a primary key, or declare the table insert-only in its '
                  'conflict-rules file (insert_only = true under its [[table]]): an '
                  'insert-only table replicates each row once under a generated identity '
                  'and refuses UPDATE and DELETE', tbl)
$$;

-- Makes the sequences feeding rel's columns (serial and identity columns)
-- region-disjoint: every region's sequence steps by the stride, and region r
-- only hands out values v with v % stride = r % stride. The next value is the
-- smallest such value above the last one handed out (at or above the start if
-- none was), so values already used are never handed out again. A sequence
-- already in that state is not touched, so calling this twice changes nothing.
-- Descending sequences become ascending.
CREATE FUNCTION meridian.align_sequences(rel regclass, region int, stride int) RETURNS void
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
CREATE FUNCTION meridian.alter_sequence(rel regclass, col text, seq regclass, change text)
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
        -- The event trigger must not react to this ALTER TABLE.
        PERFORM set_config('meridian.in_capture', 'on', true);
        -- (ALTER COLUMN ... SET INCREMENT BY n, but ALTER COLUMN ... RESTART WITH n.)
        EXECUTE format('ALTER TABLE %s ALTER COLUMN %I %s%s', rel, col,
                       CASE WHEN change LIKE 'RESTART%' THEN '' ELSE 'SET ' END, change);
        PERFORM set_config('meridian.in_capture', 'off', true);
    END;
END
$$;

-- One statement of a generated capture function: upserts the row's version
-- in meridian.row_version (above the stamp and above its previous version)
-- and records the change with that version, in one SQL statement so a change
-- costs one executor run. key_args are jsonb_build_object arguments; row_expr
-- and old_expr are SQL expressions (or NULL); indent is the indentation of
-- the statement's lines after the first. The function it is placed in
-- provides the variable pin (see pin_stamp).
CREATE FUNCTION meridian.change_stmt(tbl text, region int, op "char", key_args text,
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
           origin = excluded.origin, deleted = excluded.deleted
    RETURNING v.pk, v.hlc)
INSERT INTO meridian.change (origin, hlc, tx_hlc, via_proxy, tbl, op, pk, "row", old)
SELECT %2$s, ver.hlc, pg_catalog.substr(pin, 2)::pg_catalog.int8,
       pg_catalog.starts_with(pin, 'P'), %1$L, %3$L, ver.pk, %6$s, %7$s
  FROM ver;$stmt$,
                          tbl, region, op, key_args,
                          CASE WHEN deleted THEN 'true' ELSE 'false' END,
                          row_expr, old_expr),
                   E'\n', E'\n' || repeat(' ', indent))
$$;

-- If rel was renamed or moved to another schema since its capture function
-- was generated, moves its rule row in meridian.replicated_table to the new
-- name (unless the new name already has one). The name the function was
-- generated for is kept in the function's comment. Versions recorded in
-- meridian.row_version stay under the old name.
CREATE FUNCTION meridian.follow_rename(rel regclass) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    fn_oid   oid := to_regprocedure(format('meridian.%I()', 'capture_' || rel::oid));
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
    EXECUTE format('COMMENT ON FUNCTION meridian.%I() IS %L', 'capture_' || rel::oid, name);
END
$$;

-- Installs (or refreshes) capture on one table and returns 'captured' or
-- 'captured (insert-only)'. Safe to call again at any time; it is called by
-- the event trigger after every ALTER TABLE of a replicated table, so key and
-- rule changes are picked up.
--
-- A table needs a primary key to be captured, unless meridian.replicated_table
-- declares it insert-only; without either this raises SQLSTATE 55000
-- (object_not_in_prerequisite_state, as Postgres itself uses for a table that
-- lacks a replica identity).
--
-- It installs:
--   * meridian.capture_<table oid>(), a trigger function generated for this
--     table, with its key columns, counter columns, name and the region id
--     written in (no lookups per row);
--   * trigger meridian_capture: AFTER INSERT OR UPDATE OR DELETE FOR EACH ROW;
--   * trigger meridian_capture_truncate: AFTER TRUNCATE FOR EACH STATEMENT.
-- Existing triggers are kept as they are (a trigger disabled with ALTER TABLE
-- ... DISABLE TRIGGER stays disabled); the function is replaced only if its
-- text changed. It then aligns the table's sequences (align_sequences) and
-- marks the table captured.
--
-- If the table was renamed or moved to another schema since capture was
-- installed, its rule row moves with it (follow_rename).
CREATE FUNCTION meridian.enable_capture(rel regclass) RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $enable$
DECLARE
    nd        meridian.node;
    kind      "char";
    persist   "char";
    is_part   bool;
    nsp       text;
    name      text;
    fn        text;
    fn_oid    oid;
    rule      meridian.replicated_table;
    pk_cols   text[];
    key_new   text;
    key_old   text;
    key_same  text;
    key_found text;
    n_found   int;
    counters  text;
    body      text;
    trg_state "char";
    trg_fn    oid;
BEGIN
    IF rel IS NULL THEN
        RAISE EXCEPTION 'enable_capture: table must not be NULL' USING ERRCODE = '22004';
    END IF;
    SELECT * INTO nd FROM meridian.node;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'meridian is not configured in this database: call meridian.configure() first'
            USING ERRCODE = '55000';
    END IF;

    SELECT c.relkind, c.relpersistence, c.relispartition, n.nspname,
           format('%I.%I', n.nspname, c.relname)
      INTO kind, persist, is_part, nsp, name
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
    fn_oid := to_regprocedure(format('meridian.%I()', fn));
    PERFORM meridian.follow_rename(rel);

    SELECT * INTO rule FROM meridian.replicated_table r WHERE r.tbl = name;
    IF NOT FOUND THEN
        rule := ROW(name, false, '{}', false)::meridian.replicated_table;
    END IF;
    PERFORM meridian.check_counters(rel, rule.counters);

    -- Primary-key columns in key order.
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
        -- are kept (the row never changes). UPDATE and DELETE are refused:
        -- they could not be replicated.
        body := format($tpl$
-- Generated by meridian.enable_capture() for table %2$s (insert-only), region %3$s.
-- Regenerated on every enable_capture and ALTER TABLE: do not edit.
DECLARE
    pin   pg_catalog.text := pg_catalog.current_setting('meridian.tx_stamp', true);
    stamp pg_catalog.int8;
    s     pg_catalog.int8;
BEGIN
    IF pg_catalog.current_setting('meridian.applying', true) OPERATOR(pg_catalog.=) 'on' THEN
        RETURN NULL;
    END IF;
    IF TG_OP OPERATOR(pg_catalog.<>) 'INSERT' THEN
        RAISE EXCEPTION USING ERRCODE = '0A000', MESSAGE = pg_catalog.concat('cannot ', TG_OP, %4$L);
    END IF;
    IF pin IS NULL OR pin OPERATOR(pg_catalog.=) '' THEN
        pin := meridian.pin_stamp();
    END IF;
    stamp := pg_catalog.substr(pin, 2)::pg_catalog.int8;
    s := pg_catalog.nextval('meridian.change_seq'::pg_catalog.regclass);
    INSERT INTO meridian.change (seq, origin, hlc, tx_hlc, via_proxy, tbl, op, pk, "row")
    VALUES (s, %3$s, stamp, stamp, pg_catalog.starts_with(pin, 'P'), %2$L, 'I',
            pg_catalog.jsonb_build_object('meridian_row', pg_catalog.concat(%5$L, s)),
            pg_catalog.to_jsonb(NEW));
    RETURN NULL;
END
$tpl$,
            fn, name, nd.region_id,
            format(' rows of table %s: the table is declared insert-only in its conflict-rules '
                   'file, so updates and deletes would not replicate', name),
            nd.region_id || '-');
    ELSE
        -- The key as arguments of jsonb_build_object, from NEW and from OLD.
        SELECT string_agg(format('%L, NEW.%I', c, c), ', ' ORDER BY o),
               string_agg(format('%L, OLD.%I', c, c), ', ' ORDER BY o)
          INTO key_new, key_old
          FROM unnest(pk_cols) WITH ORDINALITY AS u(c, o);

        -- Key comparisons use the primary key's own btree equality
        -- operators: NEW against OLD (is the key unchanged?) and a table row
        -- against OLD (does a row hold the old key?).
        SELECT string_agg(format('NEW.%I OPERATOR(%I.%s) OLD.%I', a.attname, opn.nspname, op.oprname, a.attname),
                          ' AND ' ORDER BY k.ord),
               string_agg(format('t.%I OPERATOR(%I.%s) OLD.%I', a.attname, opn.nspname, op.oprname, a.attname),
                          ' AND ' ORDER BY k.ord),
               count(*)
          INTO key_same, key_found, n_found
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
-- Generated by meridian.enable_capture() for table %2$s, region %3$s.
-- Regenerated on every enable_capture and ALTER TABLE: do not edit.
-- Each change is one statement: the row's version upsert and the change row.
DECLARE
    pin pg_catalog.text := pg_catalog.current_setting('meridian.tx_stamp', true);
BEGIN
    IF pg_catalog.current_setting('meridian.applying', true) OPERATOR(pg_catalog.=) 'on' THEN
        RETURN NULL;
    END IF;
    IF pin IS NULL OR pin OPERATOR(pg_catalog.=) '' THEN
        pin := meridian.pin_stamp();
    END IF;

    IF TG_OP OPERATOR(pg_catalog.=) 'UPDATE' THEN
        IF %4$s THEN
            %5$s
            RETURN NULL;
        END IF;
        -- The key changed: a delete of the old key and an insert of the new
        -- one. Row triggers fire after the whole statement, so when keys are
        -- shifted or swapped (SET id = id + 1) another row may hold the old
        -- key by now; its own insert covers that key, and a delete here would
        -- wrongly follow it.
        IF NOT EXISTS (SELECT FROM %6$s t WHERE %7$s) THEN
            %8$s
        END IF;
    ELSIF TG_OP OPERATOR(pg_catalog.=) 'DELETE' THEN
        %10$s
        RETURN NULL;
    END IF;

    -- INSERT, or the new key of a key-changing UPDATE.
    %9$s
    RETURN NULL;
END
$tpl$,
            fn, name, nd.region_id,
            key_same,
            meridian.change_stmt(name, nd.region_id, 'U', key_new, false, 'pg_catalog.to_jsonb(NEW)', counters, 12),
            CASE WHEN kind = 'r' THEN 'ONLY ' ELSE '' END || name,
            key_found,
            meridian.change_stmt(name, nd.region_id, 'D', key_old, true, 'NULL', 'NULL', 12),
            meridian.change_stmt(name, nd.region_id, 'I', key_new, false, 'pg_catalog.to_jsonb(NEW)', 'NULL', 4),
            meridian.change_stmt(name, nd.region_id, 'D', key_old, true, 'NULL', 'NULL', 8));
    END IF;

    IF fn_oid IS NULL OR (SELECT p.prosrc FROM pg_proc p WHERE p.oid = fn_oid) IS DISTINCT FROM body THEN
        EXECUTE format('CREATE OR REPLACE FUNCTION meridian.%I() RETURNS trigger '
                       'LANGUAGE plpgsql SECURITY DEFINER AS %L', fn, body);
        EXECUTE format('REVOKE ALL ON FUNCTION meridian.%I() FROM PUBLIC', fn);
        fn_oid := to_regprocedure(format('meridian.%I()', fn));
    END IF;
    IF obj_description(fn_oid, 'pg_proc') IS DISTINCT FROM name THEN
        EXECUTE format('COMMENT ON FUNCTION meridian.%I() IS %L', fn, name);
    END IF;

    -- Row trigger: created if missing, or recreated if it calls something else.
    SELECT t.tgenabled, t.tgfoid INTO trg_state, trg_fn
      FROM pg_trigger t WHERE t.tgrelid = rel AND t.tgname = 'meridian_capture';
    IF trg_fn IS DISTINCT FROM fn_oid THEN
        IF trg_fn IS NOT NULL THEN
            EXECUTE format('DROP TRIGGER meridian_capture ON %s', rel);
        END IF;
        EXECUTE format('CREATE TRIGGER meridian_capture AFTER INSERT OR UPDATE OR DELETE ON %s '
                       'FOR EACH ROW EXECUTE FUNCTION meridian.%I()', rel, fn);
    END IF;
    trg_fn := NULL;
    SELECT t.tgfoid INTO trg_fn
      FROM pg_trigger t WHERE t.tgrelid = rel AND t.tgname = 'meridian_capture_truncate';
    IF trg_fn IS DISTINCT FROM 'meridian.capture_truncate()'::regprocedure THEN
        IF trg_fn IS NOT NULL THEN
            EXECUTE format('DROP TRIGGER meridian_capture_truncate ON %s', rel);
        END IF;
        EXECUTE format('CREATE TRIGGER meridian_capture_truncate AFTER TRUNCATE ON %s '
                       'FOR EACH STATEMENT EXECUTE FUNCTION meridian.capture_truncate()', rel);
    END IF;

    PERFORM meridian.align_sequences(rel, nd.region_id, nd.sequence_stride);

    INSERT INTO meridian.replicated_table AS r (tbl, captured)
    VALUES (name, true)
    ON CONFLICT ON CONSTRAINT replicated_table_pkey DO UPDATE SET captured = true
    WHERE NOT r.captured;

    RETURN CASE WHEN rule.insert_only THEN 'captured (insert-only)' ELSE 'captured' END
        || CASE WHEN trg_state = 'D' THEN ' (trigger meridian_capture is disabled)' ELSE '' END;
END
$enable$;

-- Removes capture from a table: drops its triggers and generated function and
-- marks it not captured. Its rules and row versions are kept; sequences keep
-- their region-disjoint stride.
CREATE FUNCTION meridian.disable_capture(rel regclass) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    name text;
BEGIN
    SELECT format('%I.%I', n.nspname, c.relname) INTO name
      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE c.oid = rel;
    IF name IS NULL THEN
        RAISE EXCEPTION 'relation % does not exist', rel USING ERRCODE = '42P01';
    END IF;
    IF EXISTS (SELECT 1 FROM pg_trigger t WHERE t.tgrelid = rel AND t.tgname = 'meridian_capture') THEN
        EXECUTE format('DROP TRIGGER meridian_capture ON %s', rel);
    END IF;
    IF EXISTS (SELECT 1 FROM pg_trigger t WHERE t.tgrelid = rel AND t.tgname = 'meridian_capture_truncate') THEN
        EXECUTE format('DROP TRIGGER meridian_capture_truncate ON %s', rel);
    END IF;
    IF to_regprocedure(format('meridian.%I()', 'capture_' || rel::oid)) IS NOT NULL THEN
        EXECUTE format('DROP FUNCTION meridian.%I()', 'capture_' || rel::oid);
    END IF;
    UPDATE meridian.replicated_table r SET captured = false WHERE r.tbl = name AND r.captured;
END
$$;

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
CREATE FUNCTION meridian.read_changes(after_xid xid8, after_seq bigint, lim int)
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

-- Changes in readable form, for debugging.
CREATE VIEW meridian.changes AS
SELECT c.xid,
       c.seq,
       c.origin,
       n.region_name AS origin_name,   -- NULL for changes from other regions
       c.hlc,
       c.tx_hlc,
       meridian.hlc_time(c.tx_hlc) AS tx_time,
       c.via_proxy,
       c.tbl AS "table",
       CASE c.op WHEN 'I' THEN 'insert' WHEN 'U' THEN 'update'
                 WHEN 'D' THEN 'delete' WHEN 'T' THEN 'truncate'
                 WHEN 'S' THEN 'schema' END AS operation,   -- 'S': see 0002
       c.pk AS key,
       c."row",
       c.old
  FROM meridian.change c
  LEFT JOIN meridian.node n ON n.region_id = c.origin;

--------------------------------------------------------------------------------
-- Capturing new and altered tables automatically
--------------------------------------------------------------------------------

-- After CREATE TABLE, CREATE TABLE AS, SELECT INTO and ALTER TABLE: every
-- permanent table (not a partition, not in schema meridian) that is in a
-- replicated schema, has a rule row, or is already captured gets capture
-- installed or refreshed (refreshing after every ALTER TABLE picks up primary
-- key and column changes; it only rewrites the trigger function if its text
-- changed). A table that has no primary key and is not
-- insert-only is left uncaptured with a NOTICE (a WARNING if it was captured
-- until now, e.g. its primary key was dropped). Tables outside that scope
-- are not looked at beyond the scope test. Runs as its owner, so any role may
-- create tables in replicated schemas.
CREATE FUNCTION meridian.on_ddl_end() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    nd        meridian.node;
    r         record;
    key_ok    bool;
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
        key_ok := EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = r.rel AND i.indisprimary)
               OR EXISTS (SELECT 1 FROM meridian.replicated_table t
                           WHERE t.tbl = r.name AND t.insert_only);
        IF key_ok THEN
            PERFORM meridian.enable_capture(r.rel);
        ELSIF r.captured THEN
            PERFORM meridian.disable_capture(r.rel);
            RAISE WARNING 'capture of % stopped: %', r.name, meridian.no_key_message(r.name);
        ELSE
            RAISE NOTICE '%', meridian.no_key_message(r.name);
        END IF;
    END LOOP;
END
$$;

CREATE EVENT TRIGGER meridian_capture_ddl ON ddl_command_end
    WHEN TAG IN ('CREATE TABLE', 'CREATE TABLE AS', 'SELECT INTO', 'ALTER TABLE')
    EXECUTE FUNCTION meridian.on_ddl_end();

-- A dropped table takes its triggers with it; this drops its generated
-- function too and marks its rule row not captured.
CREATE FUNCTION meridian.on_sql_drop() RETURNS event_trigger
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
        IF to_regprocedure(format('meridian.%I()', 'capture_' || r.objid)) IS NOT NULL THEN
            EXECUTE format('DROP FUNCTION meridian.%I()', 'capture_' || r.objid);
        END IF;
        UPDATE meridian.replicated_table t SET captured = false
         WHERE t.tbl = r.name AND t.captured;
    END LOOP;
END
$$;

CREATE EVENT TRIGGER meridian_capture_drop ON sql_drop
    WHEN TAG IN ('DROP TABLE', 'DROP SCHEMA', 'DROP OWNED')
    EXECUTE FUNCTION meridian.on_sql_drop();

--------------------------------------------------------------------------------
-- Privileges
--------------------------------------------------------------------------------

-- Nothing in schema meridian is granted to PUBLIC. The capture triggers run as
-- the owner of their functions (SECURITY DEFINER), so application roles need
-- privileges on their own tables only.
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA meridian FROM PUBLIC;
