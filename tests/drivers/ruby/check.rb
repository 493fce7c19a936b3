# Ruby's pg through meridian: DDL (two statements in one simple query, as
# migrations often send them), parameterised inserts, a named prepared
# statement reused, BEGIN/COMMIT, ROLLBACK, an error inside a transaction
# followed by ROLLBACK and continued use of the connection, and a savepoint.
# Argument: a libpq URL. Exits non-zero on any unexpected error.
require 'pg'

def check(ok, what)
  raise "check failed: #{what}" unless ok
end

def sqlstate
  yield
  raise 'no error'
rescue PG::Error => e
  e.result&.error_field(PG::Result::PG_DIAG_SQLSTATE) || e.message
end

conn = PG.connect(ARGV[0])
conn.set_notice_processor { |_| }
conn.exec(<<~SQL)
  CREATE TABLE ruby_items (id bigserial PRIMARY KEY, name text NOT NULL UNIQUE, qty int NOT NULL DEFAULT 0);
  CREATE TABLE ruby_log (id bigserial PRIMARY KEY, note text NOT NULL, at timestamptz NOT NULL DEFAULT now());
SQL
conn.exec('CREATE INDEX ruby_items_qty_idx ON ruby_items (qty)')
puts 'DDL: created ruby_items and ruby_log in one query, and an index'

10.times do |i|
  r = conn.exec_params('INSERT INTO ruby_items (name, qty) VALUES ($1, $2)', ["item#{i}", i])
  check(r.cmd_tuples == 1, "insert item#{i}")
end
conn.prepare('ruby_bump', 'UPDATE ruby_items SET qty = qty + $1 WHERE name = $2')
10.times { |i| conn.exec_prepared('ruby_bump', [1, "item#{i}"]) }
check(conn.exec('SELECT sum(qty) FROM ruby_items').getvalue(0, 0).to_i == 55, 'sum after the prepared updates')
check(conn.exec("SELECT count(*) FROM pg_prepared_statements WHERE name = 'ruby_bump'").getvalue(0, 0) == '1', 'prepared')
puts 'inserted 10 rows; a prepared statement reused 10 times'

conn.exec('BEGIN')
conn.exec_params('UPDATE ruby_items SET qty = qty + 100 WHERE name = $1', ['item1'])
conn.exec_params('INSERT INTO ruby_log (note) VALUES ($1)', ['committed'])
conn.exec('COMMIT')
conn.exec('BEGIN')
conn.exec('UPDATE ruby_items SET qty = -1')
conn.exec('ROLLBACK')
check(conn.transaction_status == PG::PQTRANS_IDLE, 'idle after ROLLBACK')
check(conn.exec_params('SELECT qty FROM ruby_items WHERE name = $1', ['item1']).getvalue(0, 0) == '102', 'commit kept, rollback undone')
puts 'commit and rollback'

# An error inside a transaction, ROLLBACK, and the connection goes on.
conn.exec('BEGIN')
conn.exec_params('INSERT INTO ruby_log (note) VALUES ($1)', ['rolled back'])
check(sqlstate { conn.exec_params('INSERT INTO ruby_items (name) VALUES ($1)', ['item2']) } == '23505', 'unique violation')
check(sqlstate { conn.exec_prepared('ruby_bump', [1, 'item2']) } == '25P02', 'aborted transaction')
conn.exec('ROLLBACK')
check(conn.exec("SELECT count(*) FROM ruby_log WHERE note = 'rolled back'").getvalue(0, 0) == '0', 'rolled back')
# The same, through the transaction block: the error propagates, pg rolls back.
check(sqlstate { conn.transaction { |c| c.exec_params('INSERT INTO ruby_items (name) VALUES ($1)', ['item3']) } } == '23505', 'unique violation in transaction block')
check(conn.transaction_status == PG::PQTRANS_IDLE, 'idle after the failed transaction block')
puts 'error in a transaction, ROLLBACK, connection still usable'

# A savepoint with an error; the outer transaction commits.
conn.transaction do |c|
  c.exec_params('INSERT INTO ruby_log (note) VALUES ($1)', ['before savepoint'])
  c.exec('SAVEPOINT ruby_sp')
  check(sqlstate { c.exec_params('INSERT INTO ruby_items (name) VALUES ($1)', ['item4']) } == '23505', 'unique violation')
  c.exec('ROLLBACK TO SAVEPOINT ruby_sp')
  c.exec_params('INSERT INTO ruby_log (note) VALUES ($1)', ['after savepoint'])
end
check(conn.exec("SELECT count(*) FROM ruby_log WHERE note LIKE '% savepoint'").getvalue(0, 0) == '2', 'both sides of the savepoint')
puts 'savepoint with an error rolled back, transaction committed'

conn.exec_prepared('ruby_bump', [1, 'item5'])
conn.exec_params('INSERT INTO ruby_log (note) VALUES ($1)', ['still here'])
check(conn.exec_params('SELECT qty FROM ruby_items WHERE name = $1', ['item5']).getvalue(0, 0) == '7', 'item5')
conn.close
puts 'ruby ok'
