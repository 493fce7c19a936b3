"""asyncpg through meridian: DDL, parameterised inserts (executemany),
prepared statements reused, committed and rolled-back transactions, a
transaction with an error, a savepoint with an error, copy_records_to_table,
and continued use of the connection. Argument: a libpq URL."""
import asyncio
import sys

import asyncpg

url = sys.argv[1]


async def main():
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("CREATE TABLE asyncpg_items (id bigserial PRIMARY KEY, name text NOT NULL UNIQUE, qty int NOT NULL DEFAULT 0, price numeric)")
        await conn.execute("CREATE TABLE asyncpg_log (id bigserial PRIMARY KEY, note text NOT NULL)")
        print("DDL: created asyncpg_items and asyncpg_log")

        await conn.executemany(
            "INSERT INTO asyncpg_items (name, qty, price) VALUES ($1, $2, $3)",
            [(f"item{i}", i, i * 1.5) for i in range(10)],
        )
        get = await conn.prepare("SELECT qty FROM asyncpg_items WHERE name = $1")
        bump = await conn.prepare("UPDATE asyncpg_items SET qty = qty + $1 WHERE name = $2")
        for i in range(10):
            await bump.fetch(1, f"item{i}")
            assert await get.fetchval(f"item{i}") == i + 1
        assert await conn.fetchval("SELECT sum(qty) FROM asyncpg_items") == 55
        print("inserted 10 rows; two prepared statements reused 10 times")

        async with conn.transaction():
            await conn.execute("UPDATE asyncpg_items SET qty = qty + 100 WHERE name = $1", "item1")
            await conn.execute("INSERT INTO asyncpg_log (note) VALUES ($1)", "committed")
        try:
            async with conn.transaction():
                await conn.execute("UPDATE asyncpg_items SET qty = -1")
                raise RuntimeError("roll back")
        except RuntimeError:
            pass
        assert await get.fetchval("item1") == 102
        print("commit and rollback")

        # An error inside a transaction: rolled back, the connection goes on.
        try:
            async with conn.transaction():
                await conn.execute("INSERT INTO asyncpg_log (note) VALUES ($1)", "rolled back")
                await conn.execute("INSERT INTO asyncpg_items (name) VALUES ($1)", "item2")
            raise AssertionError("no unique violation")
        except asyncpg.UniqueViolationError:
            pass
        assert conn.is_in_transaction() is False
        assert await conn.fetchval("SELECT count(*) FROM asyncpg_log WHERE note = 'rolled back'") == 0
        print("error in a transaction, rolled back, connection still usable")

        # A savepoint (nested transaction) with an error; the outer one commits.
        async with conn.transaction():
            await conn.execute("INSERT INTO asyncpg_log (note) VALUES ($1)", "before savepoint")
            try:
                async with conn.transaction():
                    await bump.fetch(1, "item3")
                    await conn.execute("INSERT INTO asyncpg_items (name) VALUES ($1)", "item3")
                raise AssertionError("no unique violation")
            except asyncpg.UniqueViolationError:
                pass
            await conn.execute("INSERT INTO asyncpg_log (note) VALUES ($1)", "after savepoint")
        assert await conn.fetchval("SELECT count(*) FROM asyncpg_log WHERE note LIKE '% savepoint'") == 2
        assert await get.fetchval("item3") == 4
        print("savepoint with an error rolled back, transaction committed")

        # COPY (binary) in.
        n = await conn.copy_records_to_table(
            "asyncpg_items",
            records=[(f"copied{i}", i, 0.5) for i in range(25)],
            columns=["name", "qty", "price"],
        )
        assert n == "COPY 25", n
        assert await conn.fetchval("SELECT count(*) FROM asyncpg_items") == 35
        async with conn.transaction():
            await conn.copy_records_to_table("asyncpg_log", records=[("copied in a transaction",)], columns=["note"])
        print("copy_records_to_table: 25 rows, and one in a transaction")

        await conn.execute("INSERT INTO asyncpg_log (note) VALUES ($1)", "still here")
    finally:
        await conn.close()
    print("asyncpg ok")


asyncio.run(main())
