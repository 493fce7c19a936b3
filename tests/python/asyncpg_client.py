"""asyncpg through meridian: prepared statements, binary results, executemany,
COPY, transactions and errors. Argument: a libpq URL."""
import asyncio
import sys

import asyncpg

url = sys.argv[1]


async def main():
    ssl = "require" if "sslmode=require" in url else False
    dsn = url.split("?")[0]
    conn = await asyncpg.connect(dsn, ssl=ssl)
    try:
        await conn.execute("DROP TABLE IF EXISTS apg_items")
        await conn.execute("CREATE TABLE apg_items (id int PRIMARY KEY, name text, price numeric)")
        await conn.executemany("INSERT INTO apg_items VALUES ($1, $2, $3)", [(i, f"a{i}", i * 1.5) for i in range(40)])
        stmt = await conn.prepare("SELECT name, price FROM apg_items WHERE id = $1")
        for i in (0, 7, 39):
            row = await stmt.fetchrow(i)
            assert row["name"] == f"a{i}", row
        assert await conn.fetchval("SELECT count(*) FROM apg_items") == 40

        # COPY in (binary) and out.
        await conn.copy_records_to_table("apg_items", records=[(100 + i, f"c{i}", 1) for i in range(5)])
        rows = await conn.fetch("SELECT id FROM apg_items WHERE id >= 100 ORDER BY id")
        assert [r["id"] for r in rows] == list(range(100, 105))

        # Transactions, committed and rolled back.
        async with conn.transaction():
            await conn.execute("UPDATE apg_items SET name = 'committed' WHERE id = 1")
        try:
            async with conn.transaction():
                await conn.execute("UPDATE apg_items SET name = 'rolled back' WHERE id = 2")
                raise RuntimeError("roll back")
        except RuntimeError:
            pass
        assert await conn.fetchval("SELECT name FROM apg_items WHERE id = 1") == "committed"
        assert await conn.fetchval("SELECT name FROM apg_items WHERE id = 2") == "a2"

        # Errors carry their SQLSTATE; the connection stays usable.
        try:
            await conn.execute("INSERT INTO apg_items VALUES (1, 'dup', 0)")
            raise AssertionError("no error")
        except asyncpg.UniqueViolationError:
            pass
        # Concurrent queries on a pool of sessions.
        pool = await asyncpg.create_pool(dsn, ssl=ssl, min_size=4, max_size=4)
        results = await asyncio.gather(*[pool.fetchval("SELECT $1::int * 2", i) for i in range(32)])
        assert results == [i * 2 for i in range(32)]
        await pool.close()
    finally:
        await conn.close()
    print("asyncpg ok")


asyncio.run(main())
