-- What a database made by migrations 0001-0011 has and the functions in
-- functions/ no longer define: the proxy's stamp pinning (the proxy no
-- longer stamps transactions; capture stamps them from the WAL) and the
-- two-argument form of resolve_unique (its callers pass all four). A new
-- database has none of it, so every statement here is IF EXISTS.

DROP FUNCTION IF EXISTS meridian.pin_stamp();
DROP FUNCTION IF EXISTS meridian.resolve_unique(int, jsonb);

COMMENT ON TABLE meridian.change IS
    'Captured row changes, written by capture, read with meridian.read_changes().';
