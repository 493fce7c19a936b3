-- meridian's four event triggers, checked by every `meridian migrate` after
-- wiring.sql and made again only when they are missing or differ from what
-- this meridian wants (Postgres 15 lets only a superuser create an event
-- trigger; meridian's owner role runs every other step).
--
-- They fire in name order: meridian_replicate_ddl ships a schema change
-- before meridian_table_capture captures the rows a table already held, so
-- receivers add a key before those rows arrive. The two that keep capture
-- installed also fire in apply sessions (ENABLE ALWAYS), so a replicated
-- CREATE TABLE is captured there too; the two that replicate schema changes
-- do not (a peer's DDL is already in the peer's stream).
DO $$
DECLARE
    drops text[] := ARRAY(SELECT t FROM unnest(meridian.ddl_tags()) t WHERE starts_with(t, 'DROP') ORDER BY t);
    wanted jsonb := jsonb_build_array(
        jsonb_build_array('meridian_capture_drop', 'sql_drop', 'meridian.on_sql_drop', 'A',
                          to_jsonb(ARRAY['DROP OWNED', 'DROP SCHEMA', 'DROP TABLE'])),
        jsonb_build_array('meridian_note_drop', 'sql_drop', 'meridian.on_drop_note', 'O', to_jsonb(drops)),
        jsonb_build_array('meridian_replicate_ddl', 'ddl_command_end', 'meridian.on_ddl_replicate', 'O',
                          to_jsonb(ARRAY(SELECT t FROM unnest(meridian.ddl_tags()) t ORDER BY t))),
        jsonb_build_array('meridian_table_capture', 'ddl_command_end', 'meridian.on_ddl_end', 'A',
                          to_jsonb(ARRAY['ALTER TABLE', 'CREATE TABLE', 'CREATE TABLE AS', 'SELECT INTO'])));
    have jsonb := (
        SELECT coalesce(jsonb_agg(jsonb_build_array(e.evtname, e.evtevent, (SELECT n.nspname || '.' || p.proname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE p.oid = e.evtfoid), e.evtenabled,
                                                    to_jsonb(ARRAY(SELECT t FROM unnest(e.evttags) t ORDER BY t)))
                                  ORDER BY e.evtname), '[]')
          FROM pg_event_trigger e WHERE e.evtname LIKE 'meridian\_%');
    w jsonb;
BEGIN
    IF have = wanted THEN
        RETURN;
    END IF;
    IF NOT (SELECT r.rolsuper FROM pg_roles r WHERE r.rolname = current_user) THEN
        RAISE EXCEPTION 'meridian''s event triggers are missing or out of date, and only a superuser may create event triggers (PostgreSQL 15); until they are in place, tables created later are not captured and schema changes are not replicated'
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'Run `meridian migrate --config FILE --as SUPERUSER` once (it makes them, and does everything else as backend.owner).';
    END IF;
    DROP EVENT TRIGGER IF EXISTS meridian_table_capture;
    DROP EVENT TRIGGER IF EXISTS meridian_capture_drop;
    DROP EVENT TRIGGER IF EXISTS meridian_replicate_ddl;
    DROP EVENT TRIGGER IF EXISTS meridian_note_drop;
    FOR w IN SELECT jsonb_array_elements(wanted) LOOP
        EXECUTE format('CREATE EVENT TRIGGER %I ON %I WHEN TAG IN (%s) EXECUTE FUNCTION %s()',
                       w ->> 0, w ->> 1,
                       (SELECT string_agg(quote_literal(t), ', ') FROM jsonb_array_elements_text(w -> 4) t),
                       w ->> 2);
        IF w ->> 3 = 'A' THEN
            EXECUTE format('ALTER EVENT TRIGGER %I ENABLE ALWAYS', w ->> 0);
        END IF;
    END LOOP;
END
$$;
