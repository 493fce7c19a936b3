"""Writes through meridian with psycopg 3 (pipeline mode) and asyncpg, for the
capture test to check their stamps. Argument: a libpq URL. Prints "ok"."""
import asyncio
import sys

import asyncpg
import psycopg

url = sys.argv[1]

with psycopg.connect(url, autocommit=True) as conn:
    # Pipeline mode: the inserts are sent back to back, results read afterwards.
    with conn.pipeline():
        for i in range(20):
            conn.execute("INSERT INTO notes (id, body) VALUES (%s, %s)", (i, f"p{i}"))
    # A transaction inside a pipeline: one stamp for both writes.
    with conn.pipeline():
        with conn.transaction():
            conn.execute("INSERT INTO notes (id, body) VALUES (%s, %s)", (20, "tx"))
            conn.execute("UPDATE notes SET n = n + 1 WHERE id = %s", (20,))
    assert conn.execute("SELECT count(*) FROM notes").fetchone()[0] == 21


async def with_asyncpg():
    c = await asyncpg.connect(url)
    try:
        async with c.transaction():
            await c.executemany(
                "INSERT INTO notes (id, body) VALUES ($1, $2)",
                [(100 + i, f"a{i}") for i in range(25)],
            )
        stmt = await c.prepare("UPDATE notes SET n = n + $1 WHERE id = $2")
        for i in range(10):
            await stmt.fetch(1, 100 + i)
        assert await c.fetchval("SELECT sum(n) FROM notes") == 11
    finally:
        await c.close()


asyncio.run(with_asyncpg())
print("ok")
