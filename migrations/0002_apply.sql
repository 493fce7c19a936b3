-- meridian migration 0002: applying changes from other regions.
--
-- A receiving region applies each batch of an origin's changes in one
-- transaction, together with the position it has applied up to for that
-- origin (meridian.applied), so a restart resumes exactly there: nothing lost,
-- nothing applied twice.
--
-- Conflicts are decided row by row by version, last writer wins: a change
-- whose (hlc, origin) is not above the row's current version in
-- meridian.row_version is skipped. Deletes leave their version behind as a
-- tombstone (row_version.deleted), so a late, older insert or update cannot
-- bring a deleted row back. An update of a row this region does not have yet
-- (its insert comes from a third region, later) inserts the full row image it
-- carries; a delete of a missing row only records the tombstone. Whatever the
-- arrival order, every region ends with the row of the highest version.
--
-- Applied changes are not captured again: the batch runs with
-- session_replication_role = replica (the capture triggers, like all ordinary
-- triggers, do not fire) and meridian.applying = on (which the capture
-- triggers also check). Replica mode also skips foreign-key checks, on
-- purpose: within a batch, changes come in (transaction id, sequence) order,
-- not commit order, and a child can come before its parent; requiring
-- order there would stall replication. Orphans left by a concurrent delete of
-- a parent in another region are a matter for the conflict rules.
--
-- A change that cannot be applied (its table does not exist here yet, a type
-- or constraint error) is not dropped and does not block anything else: it is
-- kept in meridian.held with the error, and the batch goes on. (A deadlock
-- or serialization failure aborts the whole batch instead; the receiver
-- retries it.)

CREATE TABLE meridian.applied (
    origin     int         PRIMARY KEY,
    xid        bigint      NOT NULL,
    seq        bigint      NOT NULL,
    changes    bigint      NOT NULL DEFAULT 0,
    applied_at timestamptz NOT NULL DEFAULT now()
);

COMMENT ON TABLE meridian.applied IS
    'Per origin region: the last change applied here (its xid and seq in the origin), updated in the same transaction as the changes.';

CREATE TABLE meridian.held (
    origin  int         NOT NULL,
    xid     bigint      NOT NULL,
    seq     bigint      NOT NULL,
    tbl     text        NOT NULL,
    change  jsonb       NOT NULL,
    error   text        NOT NULL,
    sqlstate text       NOT NULL,
    held_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (origin, xid, seq)
);

COMMENT ON TABLE meridian.held IS
    'Changes from other regions that could not be applied yet, with the reason; never dropped.';

-- The column lists the apply statements are built from, for table rel:
-- its primary key (plain, and prefixed t. and d.; NULL without a key), and
-- every stored column (plain, and as EXCLUDED.col).
CREATE FUNCTION meridian.apply_columns(rel regclass,
                                       OUT key_cols text, OUT t_keys text, OUT d_keys text,
                                       OUT all_cols text, OUT excluded_cols text)
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT (SELECT string_agg(quote_ident(a.attname), ', ' ORDER BY k.ord)
              FROM pg_index i
              CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
              JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
             WHERE i.indrelid = rel AND i.indisprimary),
           (SELECT string_agg('t.' || quote_ident(a.attname), ', ' ORDER BY k.ord)
              FROM pg_index i
              CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
              JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
             WHERE i.indrelid = rel AND i.indisprimary),
           (SELECT string_agg('d.' || quote_ident(a.attname), ', ' ORDER BY k.ord)
              FROM pg_index i
              CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
              JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
             WHERE i.indrelid = rel AND i.indisprimary),
           string_agg(quote_ident(attname), ', ' ORDER BY attnum),
           string_agg('EXCLUDED.' || quote_ident(attname), ', ' ORDER BY attnum)
      FROM pg_attribute
     WHERE attrelid = rel AND attnum > 0 AND NOT attisdropped AND attgenerated = ''
$$;

-- Applies one change under last-writer-wins. Returns 'applied' or 'older'.
CREATE FUNCTION meridian.apply_change(tbl text, op "char", pk jsonb, new_row jsonb,
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
    excluded_cols text;
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

    SELECT c.key_cols, c.all_cols, c.excluded_cols INTO key_cols, all_cols, excluded_cols
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
                            ON CONFLICT (%s) DO UPDATE SET (%s) = ROW(%s)',
                           rel, all_cols, all_cols, rel, key_cols, all_cols, excluded_cols)
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

-- Applies the changes of one batch for one table set-wise (no TRUNCATE
-- among them): a few statements per table instead of several per change,
-- with the same rules as apply_change: the newest change per key in the
-- batch, applied only if its version is above the row's current one; rows
-- locked before their versions, in key order. Returns {"applied", "older"}.
CREATE FUNCTION meridian.apply_table(tbl text, changes jsonb, origin int) RETURNS jsonb
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
    excluded_cols text;
    newest jsonb;
    winners jsonb;
    n_in int;
    n_win int;
BEGIN
    IF changes IS NULL OR jsonb_array_length(changes) = 0 THEN
        RETURN jsonb_build_object('applied', 0, 'older', 0);
    END IF;
    SELECT * INTO key_cols, t_keys, d_keys, all_cols, excluded_cols FROM meridian.apply_columns(rel);

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
        RETURN jsonb_build_object('applied', 0, 'older', n_in);
    END IF;

    EXECUTE format('DELETE FROM %1$s t USING jsonb_populate_recordset(NULL::%1$s, $1) d WHERE (%2$s) = (%3$s)',
                   rel, t_keys, d_keys)
    USING (SELECT jsonb_agg(w -> 'pk') FROM jsonb_array_elements(winners) w WHERE w ->> 'op' = 'D');
    EXECUTE format('INSERT INTO %1$s (%2$s) OVERRIDING SYSTEM VALUE SELECT %2$s FROM jsonb_populate_recordset(NULL::%1$s, $1)
                    ON CONFLICT (%3$s) DO UPDATE SET (%2$s) = ROW(%4$s)',
                   rel, all_cols, key_cols, excluded_cols)
    USING (SELECT jsonb_agg(w -> 'row') FROM jsonb_array_elements(winners) w WHERE w ->> 'op' <> 'D');

    INSERT INTO meridian.row_version AS v (tbl, pk, hlc, origin, deleted)
    SELECT apply_table.tbl, w.pk, w.hlc, apply_table.origin, w.op = 'D'
      FROM jsonb_to_recordset(winners) AS w(pk jsonb, op text, hlc bigint)
    ON CONFLICT (tbl, pk) DO UPDATE
       SET hlc = excluded.hlc, origin = excluded.origin, deleted = excluded.deleted;
    RETURN jsonb_build_object('applied', n_win, 'older', n_in - n_win);
END
$$;

REVOKE ALL ON FUNCTION meridian.apply_table(text, jsonb, int) FROM PUBLIC;

-- Applies a batch of one origin's changes (a JSON array of objects with xid,
-- seq, tbl, op, pk, row, hlc) and records the position of its last change,
-- all in the caller's transaction. A batch at or below the recorded position
-- (a resend after a lost acknowledgement) changes nothing. Returns
-- {"applied": n, "older": n, "held": n, "duplicate": bool}.
CREATE FUNCTION meridian.apply_batch(origin int, changes jsonb) RETURNS jsonb
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    c jsonb;
    t record;
    outcome_json jsonb;
    pos meridian.applied;
    last_xid bigint;
    last_seq bigint;
    outcome text;
    n_applied int := 0;
    n_older int := 0;
    n_held int := 0;
    has_pos bool;
    n int := jsonb_array_length(changes);
BEGIN
    IF n = 0 THEN
        RETURN jsonb_build_object('applied', 0, 'older', 0, 'held', 0, 'duplicate', false);
    END IF;
    PERFORM set_config('session_replication_role', 'replica', true);
    PERFORM set_config('meridian.applying', 'on', true);
    -- If applying and a local transaction still deadlock (a remote insert
    -- racing a local insert of the same key), let Postgres pick this
    -- transaction, not the application's: the receiver retries the batch.
    PERFORM set_config('deadlock_timeout', '20ms', true);
    SELECT * INTO pos FROM meridian.applied a WHERE a.origin = apply_batch.origin FOR UPDATE;
    has_pos := FOUND;
    last_xid := (changes -> (n - 1) ->> 'xid')::bigint;
    last_seq := (changes -> (n - 1) ->> 'seq')::bigint;
    IF has_pos AND (last_xid, last_seq) <= (pos.xid, pos.seq) THEN
        RETURN jsonb_build_object('applied', 0, 'older', 0, 'held', 0, 'duplicate', true);
    END IF;
    -- Fast path: the whole batch in one subtransaction. Only if something in
    -- it fails is it redone change by change, each in its own subtransaction,
    -- holding back just the changes that fail.
    BEGIN
        IF NOT EXISTS (SELECT 1 FROM jsonb_array_elements(changes) c WHERE c ->> 'op' IN ('T', 'S')) THEN
            -- Set-wise, one table at a time (in name order, so two appliers
            -- lock tables in the same order).
            FOR t IN SELECT DISTINCT c ->> 'tbl' AS tbl FROM jsonb_array_elements(changes) c ORDER BY 1 LOOP
                outcome_json := meridian.apply_table(
                    t.tbl,
                    (SELECT jsonb_agg(c ORDER BY (c ->> 'xid')::bigint, (c ->> 'seq')::bigint)
                       FROM jsonb_array_elements(changes) c
                      WHERE c ->> 'tbl' = t.tbl
                        AND NOT (has_pos AND ((c ->> 'xid')::bigint, (c ->> 'seq')::bigint) <= (pos.xid, pos.seq))),
                    apply_batch.origin);
                n_applied := n_applied + (outcome_json ->> 'applied')::int;
                n_older := n_older + (outcome_json ->> 'older')::int;
            END LOOP;
        ELSE
        FOR c IN SELECT value FROM jsonb_array_elements(changes) LOOP
            IF has_pos AND ((c ->> 'xid')::bigint, (c ->> 'seq')::bigint) <= (pos.xid, pos.seq) THEN
                CONTINUE;   -- part of an earlier batch
            END IF;
            outcome := meridian.apply_change(c ->> 'tbl', (c ->> 'op')::"char", c -> 'pk',
                                             c -> 'row', (c ->> 'hlc')::bigint, apply_batch.origin);
            IF outcome = 'applied' THEN
                n_applied := n_applied + 1;
            ELSE
                n_older := n_older + 1;
            END IF;
        END LOOP;
        END IF;
    EXCEPTION
        WHEN deadlock_detected OR serialization_failure THEN
            RAISE;   -- the receiver retries the whole batch
        WHEN OTHERS THEN
            n_applied := 0;
            n_older := 0;
            FOR c IN SELECT value FROM jsonb_array_elements(changes) LOOP
                IF has_pos AND ((c ->> 'xid')::bigint, (c ->> 'seq')::bigint) <= (pos.xid, pos.seq) THEN
                    CONTINUE;
                END IF;
                BEGIN
                    outcome := meridian.apply_change(c ->> 'tbl', (c ->> 'op')::"char", c -> 'pk',
                                                     c -> 'row', (c ->> 'hlc')::bigint, apply_batch.origin);
                    IF outcome = 'applied' THEN
                        n_applied := n_applied + 1;
                    ELSE
                        n_older := n_older + 1;
                    END IF;
                EXCEPTION
                    WHEN deadlock_detected OR serialization_failure THEN
                        RAISE;
                    WHEN OTHERS THEN
                        INSERT INTO meridian.held (origin, xid, seq, tbl, change, error, sqlstate)
                        VALUES (apply_batch.origin, (c ->> 'xid')::bigint, (c ->> 'seq')::bigint,
                                c ->> 'tbl', c, SQLERRM, SQLSTATE)
                        ON CONFLICT DO NOTHING;
                        n_held := n_held + 1;
                END;
            END LOOP;
    END;
    INSERT INTO meridian.applied AS a (origin, xid, seq, changes, applied_at)
    VALUES (apply_batch.origin, last_xid, last_seq, n, now())
    ON CONFLICT (origin) DO UPDATE
       SET xid = excluded.xid, seq = excluded.seq, changes = a.changes + excluded.changes,
           applied_at = excluded.applied_at;
    RETURN jsonb_build_object('applied', n_applied, 'older', n_older, 'held', n_held, 'duplicate', false);
END
$$;

REVOKE ALL ON FUNCTION meridian.apply_columns(regclass) FROM PUBLIC;
REVOKE ALL ON FUNCTION meridian.apply_change(text, "char", jsonb, jsonb, bigint, int) FROM PUBLIC;
REVOKE ALL ON FUNCTION meridian.apply_batch(int, jsonb) FROM PUBLIC;

-- On the origin side: how far each peer has acknowledged this region's
-- changes (written by the shipper after each acknowledgement). A captured
-- change is pruned once every configured peer has applied it.
CREATE TABLE meridian.shipped (
    peer    int         PRIMARY KEY,
    xid     bigint      NOT NULL,
    seq     bigint      NOT NULL,
    acked_at timestamptz NOT NULL DEFAULT now()
);

COMMENT ON TABLE meridian.shipped IS
    'Per peer region: the last of this region''s changes it acknowledged as applied.';

-- Deletes the changes every one of peers has applied; returns how many. Does
-- nothing while any of them has not acknowledged anything yet.
CREATE FUNCTION meridian.prune(peers int[]) RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    lo meridian.shipped;
    n bigint;
BEGIN
    IF cardinality(peers) = 0 THEN
        RETURN 0;
    END IF;
    SELECT count(*) INTO n FROM meridian.shipped s WHERE s.peer = ANY (peers);
    IF n < cardinality(peers) THEN
        RETURN 0;
    END IF;
    SELECT * INTO lo FROM meridian.shipped s WHERE s.peer = ANY (peers) ORDER BY s.xid, s.seq LIMIT 1;
    DELETE FROM meridian.change c
     WHERE (c.xid, c.seq) <= (lo.xid::text::xid8, lo.seq);
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$$;

REVOKE ALL ON FUNCTION meridian.prune(int[]) FROM PUBLIC;

-- Retries held changes, oldest first, under the same rules as apply_batch
-- (a change whose table now exists applies if its version is still the
-- newest). Applied or outdated ones leave meridian.held; the others keep
-- their latest error. Returns how many left.
CREATE FUNCTION meridian.retry_held() RETURNS int
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
    FOR h IN SELECT * FROM meridian.held ORDER BY origin, xid, seq LIMIT 1000 LOOP
        BEGIN
            PERFORM meridian.apply_change(h.tbl, (h.change ->> 'op')::"char", h.change -> 'pk',
                                          h.change -> 'row', (h.change ->> 'hlc')::bigint, h.origin);
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

REVOKE ALL ON FUNCTION meridian.retry_held() FROM PUBLIC;

--------------------------------------------------------------------------------
-- DDL replication
--------------------------------------------------------------------------------
-- Schema changes of replicated tables are captured as changes of their own
-- (op 'S', row = {"sql": the statement, "search_path": ..., "tag": ...}) in
-- the writing transaction, so they ship in stream order with the rows, and
-- receivers run them before the changes that follow. Only a query that is a
-- single statement is replicated: the statement text is what is shipped, and
-- a query holding several statements would replay its DML a second time (the
-- rows it wrote ship as row changes). Such a query gets a WARNING saying its
-- DDL was not replicated.
--
-- On the receiving side the capture event triggers must also fire while
-- applying (session_replication_role = replica), so a replicated CREATE TABLE
-- is captured there too.

ALTER EVENT TRIGGER meridian_capture_ddl ENABLE ALWAYS;
ALTER EVENT TRIGGER meridian_capture_drop ENABLE ALWAYS;

-- No SET search_path on this function: it must see the search_path the DDL
-- ran under, to ship it along. Being SECURITY DEFINER, every name and
-- operator in it is therefore schema-qualified.
CREATE FUNCTION meridian.on_ddl_replicate() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER
AS $$
DECLARE
    nd meridian.node;
    q pg_catalog.text := pg_catalog.rtrim(pg_catalog.btrim(pg_catalog.current_query()),
                                          pg_catalog.concat('; ', pg_catalog.chr(10), pg_catalog.chr(13), pg_catalog.chr(9)));
    pin pg_catalog.text;
    stamp pg_catalog.int8;
    relevant pg_catalog.bool;
BEGIN
    IF pg_catalog.current_setting('meridian.applying', true) OPERATOR(pg_catalog.=) 'on' THEN
        RETURN;   -- applying a peer's DDL: it is already in the peer's stream
    END IF;
    SELECT * INTO nd FROM meridian.node;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    IF pg_catalog.starts_with(tg_tag, 'DROP') THEN
        relevant := true;   -- the dropped objects are gone from the catalog by now
    ELSE
        SELECT pg_catalog.bool_or(d.schema_name OPERATOR(pg_catalog.=) ANY (nd.schemas)) INTO relevant
          FROM pg_catalog.pg_event_trigger_ddl_commands() d;
    END IF;
    IF relevant IS NOT TRUE THEN
        RETURN;
    END IF;
    -- Only a statement sent as such is replicated: DDL run inside a function
    -- or a DO block (including meridian's own, e.g. enable_capture) is not.
    IF pg_catalog.split_part(pg_catalog.upper(pg_catalog.ltrim(q)), ' ', 1)
       OPERATOR(pg_catalog.<>) pg_catalog.split_part(tg_tag, ' ', 1) THEN
        RETURN;
    END IF;
    IF pg_catalog.strpos(q, ';') OPERATOR(pg_catalog.>) 0 THEN
        RAISE WARNING 'meridian: this % was not replicated to other regions: its query holds more than one statement; send DDL statements one query at a time', tg_tag;
        RETURN;
    END IF;
    pin := pg_catalog.current_setting('meridian.tx_stamp', true);
    IF pin IS NULL OR pin OPERATOR(pg_catalog.=) '' THEN
        pin := meridian.pin_stamp();
    END IF;
    stamp := pg_catalog.substr(pin, 2)::pg_catalog.int8;
    INSERT INTO meridian.change (origin, hlc, tx_hlc, via_proxy, tbl, op, pk, "row")
    VALUES (nd.region_id, stamp, stamp, pg_catalog.starts_with(pin, 'P'), '', 'S', NULL,
            pg_catalog.jsonb_build_object('sql', q, 'search_path', pg_catalog.current_setting('search_path'),
                                          'tag', tg_tag));
END
$$;

CREATE EVENT TRIGGER meridian_replicate_ddl ON ddl_command_end
    WHEN TAG IN ('CREATE TABLE', 'ALTER TABLE', 'DROP TABLE', 'CREATE INDEX', 'DROP INDEX',
                 'CREATE SEQUENCE', 'ALTER SEQUENCE', 'DROP SEQUENCE')
    EXECUTE FUNCTION meridian.on_ddl_replicate();

-- Runs a replicated schema change, with the search_path it was made under.
CREATE FUNCTION meridian.apply_ddl(ddl jsonb) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    saved text := current_setting('search_path');
BEGIN
    PERFORM set_config('search_path', ddl ->> 'search_path', true);
    EXECUTE ddl ->> 'sql';
    PERFORM set_config('search_path', saved, true);
END
$$;

REVOKE ALL ON FUNCTION meridian.apply_ddl(jsonb) FROM PUBLIC;
