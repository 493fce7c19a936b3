-- Replicating schema changes, decided by what Postgres ran, not by how the
-- text looks. The statement text of a schema change of replicated objects
-- is written to meridian.ddl_out in the writing transaction, so it reaches
-- capture in commit order among the row changes, and receivers run it
-- (apply_ddl) before the changes that follow.
--
-- ORMs send DDL that starts with a newline or a comment (SQLAlchemy,
-- Alembic), and schema loaders send many statements in one query, so the
-- text alone cannot say what to replicate:
--  * Postgres' own parser decides what ran: the event trigger's tag, the
--    objects it touched (pg_event_trigger_ddl_commands, or for drops what
--    sql_drop saw), and whether it was sent by the client or run by a function
--    (the PL/pgSQL call stack: one frame, our own, means top level).
--  * The text shipped is that statement's text: the whole query when it holds
--    one statement; in a query of several, the statement found by splitting
--    the query the way Postgres' lexer does and matching the command tags of
--    its DDL statements, in order, against the trigger's firings.
--  * What cannot be replicated is refused with an error, so it never commits
--    in one region only: DDL on replicated objects run inside a function or a
--    DO block, CREATE TABLE AS / SELECT INTO (its rows are not captured), and
--    a query of several statements whose DDL cannot be matched to its text or
--    that also rolls back.
--  * More object kinds follow the tables: views, materialized views, types,
--    domains, functions, procedures, triggers, comments.
--
-- Re-applied by every `meridian migrate` (CREATE OR REPLACE, with
-- check_function_bodies off, after the versioned migrations): each of
-- meridian's functions is defined here and nowhere else. See
-- migrations/README.md.

-- Schema changes of replicated tables go to meridian.ddl_out, in the writing
-- transaction, so they reach capture in commit order among the row changes.
-- No SET search_path: it must see the search_path the DDL ran under, to
-- ship it along; being SECURITY DEFINER, every name in it is qualified.
CREATE OR REPLACE FUNCTION meridian.on_ddl_replicate() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER
AS $$
DECLARE
    nd meridian.node;
    ctx pg_catalog.text;
    stmt pg_catalog.text;
    relevant pg_catalog.bool;
    owner_role pg_catalog.text;
    dropped pg_catalog.bool := meridian.marked('dropped_replicated', true) IS NOT NULL;
    own pg_catalog.bool := meridian.in_own_ddl();
BEGIN
    IF dropped THEN
        PERFORM meridian.unmark('dropped_replicated');
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
    -- means the DDL ran inside a function or DO block. Whether it is
    -- meridian's own comes from a mark, not from the stack's text: a
    -- statement's text is part of the stack and could say anything.
    GET DIAGNOSTICS ctx = PG_CONTEXT;
    IF pg_catalog.strpos(ctx, pg_catalog.chr(10)) OPERATOR(pg_catalog.>) 0 THEN
        IF relevant AND NOT own THEN
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
    -- Who the objects belong to, so peers make them with the same owner:
    -- the owner of the relation the command made or changed, else the
    -- session's login role (current_user is this function's owner here).
    SELECT r.rolname::pg_catalog.text INTO owner_role
      FROM pg_catalog.pg_event_trigger_ddl_commands() d
      JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) d.objid
      JOIN pg_catalog.pg_roles r ON r.oid OPERATOR(pg_catalog.=) c.relowner
     WHERE d.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_class'::pg_catalog.regclass
     LIMIT 1;
    INSERT INTO meridian.ddl_out ("row")
    VALUES (pg_catalog.jsonb_build_object('sql', stmt, 'search_path', pg_catalog.current_setting('search_path'),
                                          'tag', tg_tag, 'role', coalesce(owner_role, session_user::pg_catalog.text)));
END
$$;


-- sql_drop runs before ddl_command_end and is the only place that still
-- sees what a DROP removed: it notes whether a replicated object went.
CREATE OR REPLACE FUNCTION meridian.on_drop_note() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_event_trigger_dropped_objects() d, meridian.node nd
                WHERE d.schema_name = ANY (nd.schemas) AND NOT d.is_temporary) THEN
        PERFORM meridian.mark('dropped_replicated', 'on');
    END IF;
END
$$;


-- Runs a replicated schema change, with the search_path it was made under,
-- as the role it was made by when that role exists here and the apply role
-- may act as it (a member of it, as `meridian migrate --as` makes it of the
-- replicated tables' owners): so what it creates has the same owner in
-- every region, and the application may use it here too.
CREATE OR REPLACE FUNCTION meridian.apply_ddl(ddl jsonb) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    saved text := current_setting('search_path');
    made_by text := ddl ->> 'role';
    act_as bool := made_by IS NOT NULL AND made_by <> current_user
                   AND EXISTS (SELECT 1 FROM pg_roles r WHERE r.rolname = made_by)
                   AND pg_has_role(current_user, made_by, 'MEMBER');
BEGIN
    PERFORM set_config('search_path', ddl ->> 'search_path', true);
    IF act_as THEN
        PERFORM set_config('role', made_by, true);
    END IF;
    EXECUTE ddl ->> 'sql';
    IF act_as THEN
        PERFORM set_config('role', 'none', true);
    END IF;
    PERFORM set_config('search_path', saved, true);
END
$$;


-- The command tags replicated as statements (plus CREATE TABLE AS and SELECT
-- INTO, which are refused). One list, used for the event trigger and for
-- finding the statements of a query that fire it.
CREATE OR REPLACE FUNCTION meridian.ddl_tags() RETURNS text[]
LANGUAGE sql IMMUTABLE
AS $$
    SELECT ARRAY[
        'CREATE TABLE', 'ALTER TABLE', 'DROP TABLE',
        'CREATE INDEX', 'ALTER INDEX', 'DROP INDEX',
        'CREATE SEQUENCE', 'ALTER SEQUENCE', 'DROP SEQUENCE',
        'CREATE VIEW', 'ALTER VIEW', 'DROP VIEW',
        'CREATE MATERIALIZED VIEW', 'ALTER MATERIALIZED VIEW', 'DROP MATERIALIZED VIEW',
        'CREATE TYPE', 'ALTER TYPE', 'DROP TYPE',
        'CREATE DOMAIN', 'ALTER DOMAIN', 'DROP DOMAIN',
        'CREATE FUNCTION', 'ALTER FUNCTION', 'DROP FUNCTION',
        'CREATE PROCEDURE', 'ALTER PROCEDURE', 'DROP PROCEDURE',
        'CREATE TRIGGER', 'ALTER TRIGGER', 'DROP TRIGGER',
        'COMMENT',
        'CREATE TABLE AS', 'SELECT INTO']::text[]
$$;


-- Splits a query string into its statements as Postgres' lexer does: string
-- literals (standard, E'' with backslash escapes), quoted identifiers,
-- dollar quotes, -- and nested /* */ comments, parentheses, and BEGIN
-- ATOMIC ... END bodies hide their semicolons. Returns each statement's
-- first and last byte + 1 (0-based, in the database encoding; every server
-- encoding keeps ASCII bytes ASCII, and all the lexer looks at is ASCII), and
-- whether one of them is a ROLLBACK or ABORT. Written by hand because no
-- SQL-callable lexer exists in core; it runs only for a query that holds a
-- semicolon before its end, and once per such query (current_statement
-- caches it).
CREATE OR REPLACE FUNCTION meridian.split_statements(q text, OUT starts int4[], OUT ends int4[],
                                          OUT rolls_back bool)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    b bytea := convert_to(q, getdatabaseencoding());
    n int := length(b);
    i int := 0;
    j int;
    c int;
    depth int := 0;
    atomic int := 0;
    stmt_start int := -1;
    word_start int := -1;
    word text;
    prev_word text := '';
    first_word text;
    escape bool;
    backslash bool := current_setting('standard_conforming_strings') = 'off';
    quote bytea;
    found int;
BEGIN
    starts := '{}';
    ends := '{}';
    rolls_back := false;
    WHILE i <= n LOOP
        c := CASE WHEN i < n THEN get_byte(b, i) ELSE 0 END;
        -- Letters, digits, _, non-ASCII; $ inside a word.
        IF i < n AND ((c BETWEEN 65 AND 90) OR (c BETWEEN 97 AND 122) OR (c BETWEEN 48 AND 57)
                      OR c = 95 OR c >= 128 OR (c = 36 AND word_start >= 0)) THEN
            IF word_start < 0 THEN
                word_start := i;
                IF stmt_start < 0 THEN
                    stmt_start := i;
                END IF;
            END IF;
            i := i + 1;
            CONTINUE;
        END IF;
        word := NULL;
        IF word_start >= 0 THEN
            IF i - word_start BETWEEN 1 AND 8 THEN
                word := upper(convert_from(substring(b FROM word_start + 1 FOR i - word_start),
                                           getdatabaseencoding()));
            END IF;
            IF word_start = stmt_start THEN
                first_word := word;
            END IF;
            IF word = 'ATOMIC' AND prev_word = 'BEGIN' THEN
                atomic := atomic + 1;
            ELSIF atomic > 0 AND word = 'CASE' THEN
                atomic := atomic + 1;
            ELSIF atomic > 0 AND word = 'END' THEN
                atomic := atomic - 1;
            END IF;
            prev_word := coalesce(word, '');
            word_start := -1;
        END IF;
        IF i = n OR (c = 59 AND depth = 0 AND atomic = 0) THEN   -- ';' or the end
            IF stmt_start >= 0 THEN
                starts := starts || stmt_start;
                ends := ends || i;
                rolls_back := rolls_back OR first_word IN ('ROLLBACK', 'ABORT');
            END IF;
            stmt_start := -1;
            first_word := NULL;
            prev_word := '';
            i := i + 1;
            CONTINUE;
        END IF;
        IF c IN (9, 10, 11, 12, 13, 32) THEN
            i := i + 1;
            CONTINUE;
        END IF;
        IF c = 45 AND i + 1 < n AND get_byte(b, i + 1) = 45 THEN   -- -- comment
            WHILE i < n AND get_byte(b, i) <> 10 LOOP
                i := i + 1;
            END LOOP;
            CONTINUE;
        END IF;
        IF c = 47 AND i + 1 < n AND get_byte(b, i + 1) = 42 THEN   -- /* comment */, nested
            j := 1;
            i := i + 2;
            WHILE i < n AND j > 0 LOOP
                IF get_byte(b, i) = 47 AND i + 1 < n AND get_byte(b, i + 1) = 42 THEN
                    j := j + 1;
                    i := i + 2;
                ELSIF get_byte(b, i) = 42 AND i + 1 < n AND get_byte(b, i + 1) = 47 THEN
                    j := j - 1;
                    i := i + 2;
                ELSE
                    i := i + 1;
                END IF;
            END LOOP;
            CONTINUE;
        END IF;
        IF stmt_start < 0 THEN
            stmt_start := i;
        END IF;
        IF c = 39 THEN   -- 'string', E'string'
            escape := backslash OR prev_word = 'E' AND word IS NOT NULL;
            i := i + 1;
            WHILE i < n LOOP
                c := get_byte(b, i);
                IF escape AND c = 92 THEN
                    i := i + 2;
                ELSIF c = 39 AND i + 1 < n AND get_byte(b, i + 1) = 39 THEN
                    i := i + 2;
                ELSIF c = 39 THEN
                    EXIT;
                ELSE
                    i := i + 1;
                END IF;
            END LOOP;
            i := least(i + 1, n);
        ELSIF c = 34 THEN   -- "identifier" ("" inside reads as two of them)
            i := i + 1;
            WHILE i < n AND get_byte(b, i) <> 34 LOOP
                i := i + 1;
            END LOOP;
            i := least(i + 1, n);
        ELSIF c = 36 THEN   -- $tag$ ... $tag$, or a parameter like $1
            j := i + 1;
            WHILE j < n AND ((get_byte(b, j) BETWEEN 65 AND 90) OR (get_byte(b, j) BETWEEN 97 AND 122)
                             OR get_byte(b, j) = 95 OR get_byte(b, j) >= 128
                             OR (j > i + 1 AND get_byte(b, j) BETWEEN 48 AND 57)) LOOP
                j := j + 1;
            END LOOP;
            IF j < n AND get_byte(b, j) = 36 THEN
                quote := substring(b FROM i + 1 FOR j - i + 1);
                found := position(quote IN substring(b FROM j + 2));
                i := CASE WHEN found = 0 THEN n ELSE j + 1 + found - 1 + length(quote) END;
            ELSE
                i := i + 1;
            END IF;
        ELSE
            IF c = 40 THEN
                depth := depth + 1;
            ELSIF c = 41 AND depth > 0 THEN
                depth := depth - 1;
            END IF;
            i := i + 1;
        END IF;
        prev_word := '';
    END LOOP;
END
$$;


-- The command tag Postgres gives a statement, from its leading keywords,
-- for the tags in ddl_tags(); other statements get their first keyword.
CREATE OR REPLACE FUNCTION meridian.statement_tag(stmt text) RETURNS text
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    w text[] := regexp_split_to_array(upper(left(stmt, 512)), '[^A-Z0-9_$]+');
    verb text := w[1];
    i int := 2;
    flat text;
BEGIN
    IF verb = 'COMMENT' THEN
        RETURN 'COMMENT';
    END IF;
    IF verb NOT IN ('CREATE', 'ALTER', 'DROP', 'SELECT', 'WITH') THEN
        RETURN verb;
    END IF;
    -- What lies at parenthesis depth 0, strings removed: CREATE TABLE ... AS
    -- and SELECT ... INTO differ from their plain forms only there.
    flat := regexp_replace(upper(stmt), '''([^'']|'''')*''', '''''', 'g');
    WHILE flat ~ '\([^()]*\)' LOOP
        flat := regexp_replace(flat, '\([^()]*\)', ' ', 'g');
    END LOOP;
    IF verb IN ('SELECT', 'WITH') THEN
        RETURN CASE WHEN flat ~ '\mINTO\M' AND NOT flat ~ '\m(INSERT|UPDATE|DELETE|MERGE)\M'
                    THEN 'SELECT INTO' ELSE verb END;
    END IF;
    WHILE w[i] IN ('OR', 'REPLACE', 'GLOBAL', 'LOCAL', 'TEMP', 'TEMPORARY', 'UNLOGGED', 'UNIQUE',
                   'RECURSIVE', 'CONSTRAINT', 'TRUSTED', 'PROCEDURAL', 'DEFAULT') LOOP
        i := i + 1;
    END LOOP;
    IF w[i] IN ('MATERIALIZED', 'FOREIGN', 'EVENT', 'TEXT', 'ACCESS', 'OPERATOR', 'USER') THEN
        RETURN format('%s %s %s', verb, w[i], w[i + 1]);
    END IF;
    IF verb = 'CREATE' AND w[i] = 'TABLE' AND flat ~ '\mAS\M' THEN
        RETURN 'CREATE TABLE AS';
    END IF;
    RETURN format('%s %s', verb, w[i]);
END
$$;


-- The text of the statement whose DDL fired the trigger (tag), in the
-- running query q. A query of one statement is that statement. In a query of
-- several, each firing takes the next statement whose tag is one the trigger
-- fires for, which must carry this firing's tag; the position is kept for
-- the rest of the query in a session setting keyed by the query's text and
-- start time (session, not transaction: such a query may COMMIT in between).
-- A ROLLBACK in the query could undo that setting and not the statements
-- before it, and a mismatch means the position is unknown: a firing that
-- must be replicated (needed) then refuses the query, since shipping another
-- statement's text would be worse than stopping; one that need not be (DDL
-- outside the replicated schemas, such as meridian's own migrations) marks
-- the position lost and returns NULL.
CREATE OR REPLACE FUNCTION meridian.current_statement(q text, tag text, needed bool) RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    key text;
    cache text[];
    sp record;
    starts int4[];
    ends int4[];
    at int;
    part text;
    enc name := getdatabaseencoding();
    b bytea;
BEGIN
    IF strpos(rtrim(q, E'; \t\r\n'), ';') = 0 THEN
        RETURN q;   -- no semicolon before its end: one statement
    END IF;
    key := md5(q) || '@' || statement_timestamp()::text;
    cache := string_to_array(meridian.marked('ddl_statements', false), '|');
    IF cache IS NULL OR cache[1] IS DISTINCT FROM key THEN
        sp := meridian.split_statements(q);
        IF cardinality(sp.starts) <= 1 THEN
            RETURN q;
        END IF;
        cache := ARRAY[key, '0', sp.rolls_back::text, array_to_string(sp.starts, ','),
                       array_to_string(sp.ends, ',')];
    END IF;
    IF needed AND cache[3]::bool THEN
        RAISE EXCEPTION 'meridian cannot replicate this %: its query also rolls back (ROLLBACK, ABORT or ROLLBACK TO SAVEPOINT), which could undo part of it', tag
            USING ERRCODE = 'feature_not_supported',
                  HINT = 'Send the schema changes in queries of their own.';
    END IF;
    IF cache[2] <> 'lost' THEN
        starts := string_to_array(cache[4], ',')::int4[];
        ends := string_to_array(cache[5], ',')::int4[];
        b := convert_to(q, enc);
        at := cache[2]::int + 1;
        WHILE at <= cardinality(starts) LOOP
            part := convert_from(substring(b FROM starts[at] + 1 FOR ends[at] - starts[at]), enc);
            EXIT WHEN meridian.statement_tag(part) = ANY (meridian.ddl_tags());
            part := NULL;
            at := at + 1;
        END LOOP;
    END IF;
    IF part IS NULL OR meridian.statement_tag(part) IS DISTINCT FROM tag THEN
        IF needed THEN
            RAISE EXCEPTION 'meridian cannot tell which statement of this query is the % Postgres ran (next schema change in the text: %), so it cannot replicate it', tag, coalesce(left(part, 80), 'none')
                USING ERRCODE = 'feature_not_supported',
                      HINT = 'Send the schema changes one statement per query.';
        END IF;
        cache[2] := 'lost';
        part := NULL;
    ELSE
        cache[2] := at::text;
    END IF;
    PERFORM meridian.mark('ddl_statements', array_to_string(cache, '|'));
    RETURN part;
END
$$;
