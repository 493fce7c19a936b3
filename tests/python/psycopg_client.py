"""psycopg 3 through meridian: simple and extended queries, pipeline mode,
COPY, notices, named server-side cursors and errors. Argument: a libpq URL."""
import sys

import psycopg
from psycopg import errors

url = sys.argv[1]
notices = []

with psycopg.connect(url, autocommit=True) as conn:
    conn.add_notice_handler(lambda d: notices.append(d.message_primary))
    conn.execute("DROP TABLE IF EXISTS py_items")
    conn.execute("CREATE TABLE py_items (id int PRIMARY KEY, name text, qty int)")

    # Extended protocol with parameters (psycopg binds server-side).
    with conn.cursor() as cur:
        cur.executemany("INSERT INTO py_items VALUES (%s, %s, %s)", [(i, f"n{i}", i * 2) for i in range(50)])
        cur.execute("SELECT sum(qty) FROM py_items WHERE id < %s", (10,))
        assert cur.fetchone()[0] == 90

    # Pipeline mode: many statements, one Sync at the end, results read afterwards.
    with conn.pipeline() as p:
        curs = []
        for i in range(50, 100):
            conn.execute("INSERT INTO py_items VALUES (%s, %s, %s)", (i, f"n{i}", 1))
        for i in range(0, 100, 10):
            c = conn.cursor()
            c.execute("SELECT name FROM py_items WHERE id = %s", (i,))
            curs.append((i, c))
        p.sync()
        for i, c in curs:
            assert c.fetchone()[0] == f"n{i}", i
    # An error inside a pipeline aborts the rest of it and is reported with its SQLSTATE.
    try:
        with conn.pipeline():
            conn.execute("INSERT INTO py_items VALUES (1, 'dup', 0)")
            conn.execute("SELECT 1")
        raise AssertionError("duplicate key not reported")
    except errors.UniqueViolation:
        pass
    assert conn.execute("SELECT count(*) FROM py_items").fetchone()[0] == 100

    # COPY in and out.
    with conn.cursor() as cur:
        with cur.copy("COPY py_items (id, name, qty) FROM STDIN") as copy:
            for i in range(100, 110):
                copy.write_row((i, f"c{i}", 3))
        out = []
        with cur.copy("COPY (SELECT id FROM py_items WHERE id >= 100 ORDER BY id) TO STDOUT") as copy:
            for row in copy.rows():
                out.append(int(row[0]))
        assert out == list(range(100, 110)), out

    # Notices pass through.
    conn.execute("DO $$ BEGIN RAISE NOTICE 'psycopg notice'; END $$")
    assert "psycopg notice" in notices, notices

# A transaction, and a named (server-side) cursor, which uses a named portal.
with psycopg.connect(url) as conn:
    with conn.cursor(name="big") as cur:
        cur.itersize = 7
        cur.execute("SELECT id FROM py_items ORDER BY id")
        ids = [r[0] for r in cur]
        assert ids == list(range(110)), len(ids)
    conn.execute("UPDATE py_items SET qty = 0")
    conn.rollback()
    assert conn.execute("SELECT sum(qty) FROM py_items WHERE id < 10").fetchone()[0] == 90
    try:
        conn.execute("SELECT 1/0")
        raise AssertionError("no error")
    except errors.DivisionByZero:
        conn.rollback()

print("psycopg ok")
