-- What depends on meridian's functions and so comes after them, re-applied
-- by every `meridian migrate` after functions/: the changes view and who may
-- call the functions. (The event triggers are in event_triggers.sql: only a
-- superuser may make them.)

-- Changes in readable form, for debugging: those captured here that not
-- every peer has applied yet (they are pruned once every peer has).
CREATE OR REPLACE VIEW meridian.changes AS
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
                 WHEN 'S' THEN 'schema' END AS operation,
       c.pk AS key,
       c."row",
       c.old
  FROM meridian.change c
  LEFT JOIN meridian.node n ON n.region_id = c.origin;

-- Nobody but meridian's own role calls meridian's functions, except those
-- below. These were callable by PUBLIC before the functions were gathered
-- into functions/ and stay so until meridian's roles are settled (issue 15):
-- the trigger functions and what they call in the application's session,
-- and a few that merely read.
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA meridian FROM PUBLIC;
GRANT EXECUTE ON FUNCTION
    meridian.on_ddl_replicate(), meridian.on_drop_note(),
    meridian.refuse_change(), meridian.guard_growth(),
    meridian.check_growth(text, jsonb, jsonb, jsonb), meridian.json_cmp(jsonb, jsonb),
    meridian.bump_cols(jsonb, jsonb, jsonb, jsonb, bigint, int, bigint, int),
    meridian.decoded_image(jsonb, jsonb), meridian.table_name(regclass),
    meridian.is_engine_table(text), meridian.is_captured(regclass), meridian.slot_name(),
    meridian.set_table_engine(regclass, bool, jsonb), meridian.engine_read(text, jsonb)
    TO PUBLIC;
