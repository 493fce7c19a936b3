// postgres.js (postgres v3) through meridian: DDL, parameterised inserts
// (postgres.js prepares every query as a named statement and reuses it),
// sql.begin committed and rolled back, sql.begin with a unique violation
// inside (the caller must see 23505, not 25P02), a savepoint with an error,
// continued use afterwards, and sql.end() returning. Argument: a libpq URL.
const assert = require('assert');
const postgres = require('postgres');

const url = process.argv[2];

async function code(promise) {
  try {
    await promise;
  } catch (e) {
    return e.code || e.message;
  }
  throw new Error('no error');
}

async function main() {
  // One connection, so pg_prepared_statements shows this session's statements.
  const sql = postgres(url, { max: 1, onnotice: () => {} });
  await sql`CREATE TABLE pgjs_items (id bigserial PRIMARY KEY, name text NOT NULL UNIQUE, qty int NOT NULL DEFAULT 0, meta jsonb)`;
  await sql`CREATE TABLE pgjs_log (id bigserial PRIMARY KEY, note text NOT NULL)`;
  console.log('DDL: created pgjs_items and pgjs_log');

  for (let i = 0; i < 10; i++) {
    const r = await sql`INSERT INTO pgjs_items (name, qty, meta) VALUES (${'item' + i}, ${i}, ${sql.json({ i })})`;
    assert.strictEqual(r.count, 1);
  }
  await sql`INSERT INTO pgjs_items ${sql([{ name: 'item10', qty: 10 }, { name: 'item11', qty: 11 }], 'name', 'qty')}`;
  for (let i = 0; i < 12; i++) {
    const [row] = await sql`SELECT qty FROM pgjs_items WHERE name = ${'item' + i}`;
    assert.strictEqual(row.qty, i);
  }
  const [prepared] = await sql`SELECT count(*)::int AS n FROM pg_prepared_statements WHERE statement LIKE 'SELECT qty FROM pgjs_items%'`;
  assert.strictEqual(prepared.n, 1, 'the reused query is one prepared statement');
  console.log('inserted 12 rows; a prepared statement reused 12 times');

  // sql.begin committed, and rolled back by a thrown error.
  await sql.begin(async (sql) => {
    await sql`UPDATE pgjs_items SET qty = qty + 100 WHERE name = 'item1'`;
    await sql`INSERT INTO pgjs_log (note) VALUES ('committed')`;
  });
  assert.strictEqual(
    await code(sql.begin(async (sql) => {
      await sql`UPDATE pgjs_items SET qty = -1`;
      throw new Error('roll back please');
    })),
    'roll back please',
  );
  const [one] = await sql`SELECT qty FROM pgjs_items WHERE name = 'item1'`;
  assert.strictEqual(one.qty, 101);
  console.log('sql.begin committed and rolled back');

  // A unique violation inside sql.begin: the caller gets 23505 (postgres.js
  // rolls back; a failed ROLLBACK would surface as 25P02 instead).
  const got = await code(sql.begin(async (sql) => {
    await sql`INSERT INTO pgjs_log (note) VALUES ('rolled back')`;
    await sql`INSERT INTO pgjs_items (name) VALUES ('item2')`;
  }));
  assert.strictEqual(got, '23505', `sql.begin with a unique violation rejected with ${got}`);
  const [gone] = await sql`SELECT count(*)::int AS n FROM pgjs_log WHERE note = 'rolled back'`;
  assert.strictEqual(gone.n, 0);
  console.log('sql.begin with a unique violation: 23505, rolled back');

  // A savepoint with an error inside; the outer transaction commits.
  await sql.begin(async (sql) => {
    await sql`INSERT INTO pgjs_log (note) VALUES ('before savepoint')`;
    assert.strictEqual(await code(sql.savepoint(async (sql) => {
      await sql`INSERT INTO pgjs_items (name) VALUES ('item3')`;
    })), '23505');
    await sql`INSERT INTO pgjs_log (note) VALUES ('after savepoint')`;
  });
  const [both] = await sql`SELECT count(*)::int AS n FROM pgjs_log WHERE note LIKE '% savepoint'`;
  assert.strictEqual(both.n, 2);
  console.log('savepoint with an error rolled back, transaction committed');

  // The same connection goes on.
  await sql`UPDATE pgjs_items SET qty = qty + 1 WHERE name = ${'item4'}`;
  const [four] = await sql`SELECT qty FROM pgjs_items WHERE name = ${'item4'}`;
  assert.strictEqual(four.qty, 5);
  await sql`INSERT INTO pgjs_log (note) VALUES ('still here')`;
  console.log('connection still usable');

  let timer;
  await Promise.race([
    sql.end({ timeout: 5 }),
    new Promise((_, reject) => { timer = setTimeout(() => reject(new Error('sql.end() did not return within 10 s')), 10000); }),
  ]);
  clearTimeout(timer);
  console.log('sql.end() returned');
  console.log('postgres.js ok');
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
