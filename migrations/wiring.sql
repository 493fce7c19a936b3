-- What depends on meridian's functions and so comes after them, re-applied
-- by every `meridian migrate` after functions/: the changes view, the event
-- triggers, and who may call the functions.

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

-- The event triggers, made again so a changed tag list or function takes
-- effect. They fire in name order: meridian_replicate_ddl ships a schema
-- change before meridian_table_capture captures the rows a table already
-- held, so receivers add a key before those rows arrive. The two that keep
-- capture installed also fire in apply sessions (ENABLE ALWAYS), so a
-- replicated CREATE TABLE is captured there too; the two that replicate
-- schema changes do not (a peer's DDL is already in the peer's stream).
DROP EVENT TRIGGER IF EXISTS meridian_table_capture;
DROP EVENT TRIGGER IF EXISTS meridian_capture_drop;
DROP EVENT TRIGGER IF EXISTS meridian_replicate_ddl;
DROP EVENT TRIGGER IF EXISTS meridian_note_drop;

CREATE EVENT TRIGGER meridian_table_capture ON ddl_command_end
    WHEN TAG IN ('CREATE TABLE', 'CREATE TABLE AS', 'SELECT INTO', 'ALTER TABLE')
    EXECUTE FUNCTION meridian.on_ddl_end();
ALTER EVENT TRIGGER meridian_table_capture ENABLE ALWAYS;

CREATE EVENT TRIGGER meridian_capture_drop ON sql_drop
    WHEN TAG IN ('DROP TABLE', 'DROP SCHEMA', 'DROP OWNED')
    EXECUTE FUNCTION meridian.on_sql_drop();
ALTER EVENT TRIGGER meridian_capture_drop ENABLE ALWAYS;

DO $$
BEGIN
    EXECUTE format('CREATE EVENT TRIGGER meridian_replicate_ddl ON ddl_command_end WHEN TAG IN (%s) '
                   'EXECUTE FUNCTION meridian.on_ddl_replicate()',
                   (SELECT string_agg(quote_literal(t), ', ') FROM unnest(meridian.ddl_tags()) t));
    EXECUTE format('CREATE EVENT TRIGGER meridian_note_drop ON sql_drop WHEN TAG IN (%s) '
                   'EXECUTE FUNCTION meridian.on_drop_note()',
                   (SELECT string_agg(quote_literal(t), ', ') FROM unnest(meridian.ddl_tags()) t
                     WHERE starts_with(t, 'DROP')));
END
$$;

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
