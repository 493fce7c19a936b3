-- Forgetting tombstones safely. A delete leaves a tombstone in
-- meridian.row_version (deleted = true) so that an older insert or update
-- arriving later from another region cannot bring the row back. A tombstone
-- can be forgotten once no region can still send a change for that key with
-- a lower version.
--
-- Each region knows a floor for itself (local_floor): every change it
-- captures from now on gets a row version above it. Shippers send their
-- region's floor with each batch that reaches the end of what is recorded,
-- and on their own once a second when idle; the receiver keeps the last one
-- per origin in meridian.floor (note_floor), after the changes before it are
-- applied. forget_tombstones then deletes every tombstone below the lowest
-- of: every configured peer's floor, this region's own floor, and the
-- version of any held change. Until every peer has sent a floor, nothing is
-- forgotten.
--
-- Re-applied by every `meridian migrate` (CREATE OR REPLACE, with
-- check_function_bodies off, after the versioned migrations): each of
-- meridian's functions is defined here and nowhere else. See
-- migrations/README.md.

-- This region's floor, as an HLC: every change it captures from now on has
-- a row version above it. The oldest start of a transaction running in this
-- database (client backends and prepared transactions), or the present,
-- minus grace_ms milliseconds; and since capture stamps a transaction with
-- its commit time (src/capture/wal.rs), a transaction committed but not
-- recorded yet bounds it too: the floor stays below the commit time of the
-- last one capture recorded (or its last sync point).
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


-- Records origin's floor (never moving it back).
CREATE OR REPLACE FUNCTION meridian.note_floor(origin int, hlc bigint) RETURNS void
LANGUAGE sql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
    INSERT INTO meridian.floor AS f (origin, hlc, noted_at) VALUES (origin, hlc, now())
    ON CONFLICT (origin) DO UPDATE
       SET hlc = greatest(f.hlc, excluded.hlc), noted_at = excluded.noted_at
$$;


-- Deletes the tombstones no region can still write below; returns how many.
-- Engine tables keep their tombstones (a policy other than last-writer-wins
-- can prefer a tombstone to a newer change, so a forgotten one would decide
-- differently).
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
