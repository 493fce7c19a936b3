-- meridian migration 3: forgetting tombstones safely.
--
-- A delete leaves a tombstone in meridian.row_version (deleted = true) so
-- that an older insert or update arriving later from another region cannot
-- bring the row back. A tombstone can be forgotten once no region can still
-- send a change for that key with a lower version.
--
-- Each region knows a floor for itself: every change it captures from now
-- on gets a row version above it (meridian.local_floor). A row version is
-- never below its transaction's stamp, and a stamp is taken when the
-- transaction writes, so the floor is the oldest start among the
-- transactions running in this database (or the present, if none), minus a
-- grace for clock skew between a proxy and its Postgres. Shippers send their
-- region's floor with each batch that reaches the end of what is committed,
-- and on their own once a second when idle; the receiver keeps the last one
-- per origin in meridian.floor, after the changes before it are applied.
--
-- meridian.forget_tombstones then deletes every tombstone below the lowest of:
-- every configured peer's floor, this region's own floor, and the version of
-- any held change. Until every peer has sent a floor, nothing is forgotten.

CREATE TABLE meridian.floor (
    origin   int         PRIMARY KEY,
    hlc      bigint      NOT NULL,
    noted_at timestamptz NOT NULL DEFAULT now()
);

COMMENT ON TABLE meridian.floor IS
    'Per origin region: every change it ships after those applied here has a row version above hlc.';

-- This region's floor, as an HLC: the oldest start of a transaction running
-- in this database (client backends and prepared transactions), or the
-- present, minus grace_ms milliseconds.
CREATE FUNCTION meridian.local_floor(grace_ms bigint) RETURNS bigint
LANGUAGE sql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT ((floor(extract(epoch FROM least(
                clock_timestamp(),
                (SELECT min(a.xact_start) FROM pg_stat_activity a
                  WHERE a.datid = (SELECT d.oid FROM pg_database d WHERE d.datname = current_database())
                    AND a.backend_type = 'client backend'),
                (SELECT min(p.prepared) FROM pg_prepared_xacts p
                  WHERE p.database = current_database()))) * 1000)::int8
             - 1704067200000 - grace_ms) << 22)
$$;

-- Records origin's floor (never moving it back).
CREATE FUNCTION meridian.note_floor(origin int, hlc bigint) RETURNS void
LANGUAGE sql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
    INSERT INTO meridian.floor AS f (origin, hlc, noted_at) VALUES (origin, hlc, now())
    ON CONFLICT (origin) DO UPDATE
       SET hlc = greatest(f.hlc, excluded.hlc), noted_at = excluded.noted_at
$$;

-- Deletes the tombstones no region can still write below; returns how many.
CREATE FUNCTION meridian.forget_tombstones(peers int[], grace_ms bigint) RETURNS bigint
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
    DELETE FROM meridian.row_version v WHERE v.deleted AND v.hlc < horizon;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$$;

REVOKE ALL ON FUNCTION meridian.local_floor(bigint) FROM PUBLIC;
REVOKE ALL ON FUNCTION meridian.note_floor(int, bigint) FROM PUBLIC;
REVOKE ALL ON FUNCTION meridian.forget_tombstones(int[], bigint) FROM PUBLIC;

-- A proxy stamp is set at session level; a second transaction of the same
-- Query string finds it already used. It used to get used + 1, which can be
-- far in the past by then (below the floor this region has announced). Now
-- it also gets at least the database's present time.
CREATE OR REPLACE FUNCTION meridian.pin_stamp() RETURNS text
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    given pg_catalog.text := pg_catalog.current_setting('meridian.stamp', true);
    used  pg_catalog.text;
    stamp pg_catalog.int8;
    pin   pg_catalog.text;
    ignored pg_catalog.text;
BEGIN
    IF given IS NULL OR given OPERATOR(pg_catalog.=) '' THEN
        pin := pg_catalog.concat('B', meridian.db_stamp());
    ELSE
        stamp := given::pg_catalog.int8;
        used := pg_catalog.current_setting('meridian.stamp_used', true);
        IF used IS NOT NULL AND used OPERATOR(pg_catalog.<>) '' THEN
            IF used::pg_catalog.int8 OPERATOR(pg_catalog.>=) stamp THEN
                stamp := pg_catalog.int8larger(used::pg_catalog.int8 OPERATOR(pg_catalog.+) 1,
                                               meridian.db_stamp());
            END IF;
        END IF;
        ignored := pg_catalog.set_config('meridian.stamp_used', stamp::pg_catalog.text, false);
        pin := pg_catalog.concat('P', stamp);
    END IF;
    ignored := pg_catalog.set_config('meridian.tx_stamp', pin, true);
    RETURN pin;
END
$$;
