"""psycopg 3 through meridian: DDL, parameterised inserts, prepared-statement
reuse, commit, rollback, an error inside a transaction followed by rollback,
and pipeline mode with an error inside a transaction, after which the same
connection must keep working. Argument: a libpq URL."""
import sys

import psycopg
from psycopg import errors

url = sys.argv[1]


def one(conn, sql, params=None):
    return conn.execute(sql, params).fetchone()[0]


with psycopg.connect(url) as conn:  # not autocommit: statements open transactions
    conn.execute("CREATE TABLE psycopg_items (id bigserial PRIMARY KEY, name text NOT NULL UNIQUE, qty int NOT NULL DEFAULT 0)")
    conn.execute("CREATE TABLE psycopg_log (id bigserial PRIMARY KEY, note text NOT NULL)")
    conn.commit()
    print("DDL: created psycopg_items and psycopg_log")

    with conn.cursor() as cur:
        cur.executemany("INSERT INTO psycopg_items (name, qty) VALUES (%s, %s)", [(f"item{i}", i) for i in range(10)])
    conn.commit()
    # Prepared explicitly, then executed again and again with new parameters.
    for i in range(10):
        conn.execute("UPDATE psycopg_items SET qty = qty + %s WHERE name = %s", (1, f"item{i}"), prepare=True)
    assert one(conn, "SELECT count(*) FROM pg_prepared_statements WHERE statement LIKE 'UPDATE psycopg_items%%'") == 1
    conn.commit()
    assert one(conn, "SELECT sum(qty) FROM psycopg_items") == 55
    conn.commit()
    print("inserted 10 rows; a prepared statement reused 10 times")

    # Commit and rollback.
    conn.execute("UPDATE psycopg_items SET qty = qty + 100 WHERE name = %s", ("item1",))
    conn.execute("INSERT INTO psycopg_log (note) VALUES (%s)", ("committed",))
    conn.commit()
    conn.execute("UPDATE psycopg_items SET qty = -1")
    conn.rollback()
    assert one(conn, "SELECT qty FROM psycopg_items WHERE name = 'item1'") == 102
    conn.commit()
    print("commit and rollback")

    # An error inside a transaction, rollback, and the connection goes on.
    conn.execute("INSERT INTO psycopg_log (note) VALUES (%s)", ("rolled back",))
    try:
        conn.execute("INSERT INTO psycopg_items (name) VALUES (%s)", ("item2",))
        raise AssertionError("no unique violation")
    except errors.UniqueViolation:
        pass
    try:
        conn.execute("SELECT 1")
        raise AssertionError("the transaction is not aborted")
    except errors.InFailedSqlTransaction:
        pass
    conn.rollback()
    assert one(conn, "SELECT count(*) FROM psycopg_log WHERE note = 'rolled back'") == 0
    conn.commit()
    print("error in a transaction, rollback, connection still usable")

    # A transaction block with an error in a savepoint.
    with conn.transaction():
        conn.execute("INSERT INTO psycopg_log (note) VALUES (%s)", ("before savepoint",))
        try:
            with conn.transaction():
                conn.execute("INSERT INTO psycopg_items (name) VALUES (%s)", ("item3",))
            raise AssertionError("no unique violation")
        except errors.UniqueViolation:
            pass
        conn.execute("INSERT INTO psycopg_log (note) VALUES (%s)", ("after savepoint",))
    assert one(conn, "SELECT count(*) FROM psycopg_log WHERE note LIKE '%% savepoint'") == 2
    conn.commit()
    print("savepoint with an error rolled back, transaction committed")

with psycopg.connect(url, autocommit=True) as conn:
    # Pipeline mode: a committed transaction, statements sent back to back.
    with conn.pipeline():
        with conn.transaction():
            for i in range(10, 20):
                conn.execute("INSERT INTO psycopg_items (name, qty) VALUES (%s, %s)", (f"item{i}", i))
            conn.execute("INSERT INTO psycopg_log (note) VALUES (%s)", ("pipelined",))
    assert one(conn, "SELECT count(*) FROM psycopg_items") == 20
    print("pipeline: a committed transaction")

    # Pipeline mode with an error inside a transaction: psycopg rolls it back
    # in the pipeline, the error is the unique violation, and the connection
    # keeps working (in and out of pipeline mode).
    try:
        with conn.pipeline():
            with conn.transaction():
                conn.execute("INSERT INTO psycopg_log (note) VALUES (%s)", ("pipeline rolled back",))
                conn.execute("INSERT INTO psycopg_items (name) VALUES (%s)", ("item4",))
                conn.execute("INSERT INTO psycopg_log (note) VALUES (%s)", ("never",))
        raise AssertionError("no unique violation")
    except errors.UniqueViolation:
        pass
    assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE, conn.info.transaction_status
    assert one(conn, "SELECT count(*) FROM psycopg_log WHERE note IN ('pipeline rolled back', 'never')") == 0
    with conn.pipeline():
        with conn.transaction():
            conn.execute("UPDATE psycopg_items SET qty = qty + 1 WHERE name = %s", ("item5",))
            conn.execute("INSERT INTO psycopg_log (note) VALUES (%s)", ("pipeline after the error",))
    assert one(conn, "SELECT qty FROM psycopg_items WHERE name = 'item5'") == 7
    conn.execute("INSERT INTO psycopg_log (note) VALUES (%s)", ("still here",))
    print("pipeline: error in a transaction rolled back, connection still usable")

print("psycopg ok")
