// node-postgres (pg) through meridian: DDL, parameterised inserts, a reused
// named prepared statement, BEGIN/COMMIT, ROLLBACK, an error inside a
// transaction followed by ROLLBACK and continued use of the same connection,
// and a pool. Argument: a libpq URL. Exits non-zero on any unexpected error.
const assert = require('assert');
const { Client, Pool } = require('pg');

const url = process.argv[2];

async function code(promise) {
  try {
    await promise;
  } catch (e) {
    return e.code;
  }
  throw new Error('no error');
}

async function main() {
  const c = new Client({ connectionString: url });
  await c.connect();
  await c.query('CREATE TABLE nodepg_items (id serial PRIMARY KEY, name text NOT NULL UNIQUE, qty int NOT NULL DEFAULT 0, tags text[])');
  await c.query('CREATE TABLE nodepg_log (id bigserial PRIMARY KEY, note text NOT NULL, at timestamptz NOT NULL DEFAULT now())');
  console.log('DDL: created nodepg_items and nodepg_log');

  for (let i = 0; i < 10; i++) {
    const r = await c.query('INSERT INTO nodepg_items (name, qty, tags) VALUES ($1, $2, $3)', [`item${i}`, i, ['a', `t${i}`]]);
    assert.strictEqual(r.rowCount, 1);
  }
  console.log('inserted 10 rows with parameters');

  // A named prepared statement, parsed once and executed many times.
  for (let i = 0; i < 10; i++) {
    const r = await c.query({ name: 'nodepg-get', text: 'SELECT qty FROM nodepg_items WHERE name = $1', values: [`item${i}`] });
    assert.strictEqual(r.rows[0].qty, i);
  }
  const prepared = await c.query("SELECT count(*)::int AS n FROM pg_prepared_statements WHERE name = 'nodepg-get'");
  assert.strictEqual(prepared.rows[0].n, 1, 'the named statement is prepared once');
  console.log('reused a named prepared statement 10 times');

  // BEGIN / COMMIT and BEGIN / ROLLBACK.
  await c.query('BEGIN');
  await c.query('UPDATE nodepg_items SET qty = qty + 100 WHERE name = $1', ['item1']);
  await c.query('INSERT INTO nodepg_log (note) VALUES ($1)', ['committed']);
  await c.query('COMMIT');
  await c.query('BEGIN');
  await c.query('UPDATE nodepg_items SET qty = -1');
  await c.query('ROLLBACK');
  let r = await c.query('SELECT qty FROM nodepg_items WHERE name = $1', ['item1']);
  assert.strictEqual(r.rows[0].qty, 101);
  console.log('commit and rollback');

  // An error inside a transaction, ROLLBACK, and the same connection goes on.
  await c.query('BEGIN');
  await c.query('INSERT INTO nodepg_log (note) VALUES ($1)', ['rolled back']);
  assert.strictEqual(await code(c.query('INSERT INTO nodepg_items (name) VALUES ($1)', ['item2'])), '23505');
  assert.strictEqual(await code(c.query('SELECT 1')), '25P02');
  await c.query('ROLLBACK');
  r = await c.query("SELECT count(*)::int AS n FROM nodepg_log WHERE note = 'rolled back'");
  assert.strictEqual(r.rows[0].n, 0);
  // The same connection goes on: writes and the named statement again.
  await c.query('INSERT INTO nodepg_log (note) VALUES ($1)', ['after error']);
  r = await c.query({ name: 'nodepg-get', text: 'SELECT qty FROM nodepg_items WHERE name = $1', values: ['item3'] });
  assert.strictEqual(r.rows[0].qty, 3);
  console.log('error in a transaction, ROLLBACK, connection still usable');
  await c.end();

  // A pool: concurrent sessions through the proxy.
  const pool = new Pool({ connectionString: url, max: 4 });
  const results = await Promise.all([...Array(16).keys()].map((i) => pool.query('SELECT $1::int * 2 AS v', [i])));
  assert.deepStrictEqual(results.map((x) => x.rows[0].v), [...Array(16).keys()].map((i) => i * 2));
  await pool.query('INSERT INTO nodepg_log (note) VALUES ($1)', ['from the pool']);
  await pool.end();
  console.log('pool of 4 sessions');
  console.log('node-postgres ok');
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
