// pgx v4 through meridian: DDL, parameterised inserts (pgx prepares and
// caches every statement), an explicitly prepared statement reused, a
// committed and a rolled-back transaction, a transaction with an error and
// rollback, a savepoint (nested transaction) with an error, a pgx.Batch, and
// continued use of the connection. Argument: a libpq URL.
package main

import (
	"context"
	"errors"
	"fmt"
	"os"

	"github.com/jackc/pgconn"
	"github.com/jackc/pgx/v4"
)

func check(ok bool, what string) {
	if !ok {
		fail(errors.New(what))
	}
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "pgx:", err)
	os.Exit(1)
}

func must(_ pgconn.CommandTag, err error) {
	if err != nil {
		fail(err)
	}
}

func code(err error) string {
	var pg *pgconn.PgError
	if errors.As(err, &pg) {
		return pg.Code
	}
	return fmt.Sprint("not a server error: ", err)
}

func count(ctx context.Context, q interface {
	QueryRow(context.Context, string, ...interface{}) pgx.Row
}, sql string, args ...interface{}) int64 {
	var n int64
	if err := q.QueryRow(ctx, sql, args...).Scan(&n); err != nil {
		fail(err)
	}
	return n
}

func main() {
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, os.Args[1])
	if err != nil {
		fail(err)
	}
	defer conn.Close(ctx)

	must(conn.Exec(ctx, "CREATE TABLE pgx_items (id bigserial PRIMARY KEY, name text NOT NULL UNIQUE, qty int NOT NULL DEFAULT 0, price numeric(10,2))"))
	must(conn.Exec(ctx, "CREATE TABLE pgx_log (id bigserial PRIMARY KEY, note text NOT NULL)"))
	fmt.Println("DDL: created pgx_items and pgx_log")

	for i := 0; i < 10; i++ {
		must(conn.Exec(ctx, "INSERT INTO pgx_items (name, qty, price) VALUES ($1, $2, $3)", fmt.Sprintf("item%d", i), i, fmt.Sprintf("%d.25", i)))
	}
	if _, err := conn.Prepare(ctx, "pgx_bump", "UPDATE pgx_items SET qty = qty + $1 WHERE name = $2"); err != nil {
		fail(err)
	}
	for i := 0; i < 10; i++ {
		must(conn.Exec(ctx, "pgx_bump", 1, fmt.Sprintf("item%d", i)))
	}
	check(count(ctx, conn, "SELECT sum(qty) FROM pgx_items") == 55, "sum of qty after the prepared updates")
	check(count(ctx, conn, "SELECT count(*) FROM pg_prepared_statements WHERE name = 'pgx_bump'") == 1, "pgx_bump is prepared")
	fmt.Println("inserted 10 rows; a prepared statement reused 10 times")

	// Committed and rolled-back transactions.
	tx, err := conn.Begin(ctx)
	if err != nil {
		fail(err)
	}
	must(tx.Exec(ctx, "UPDATE pgx_items SET qty = qty + 100 WHERE name = $1", "item1"))
	must(tx.Exec(ctx, "INSERT INTO pgx_log (note) VALUES ($1)", "committed"))
	if err := tx.Commit(ctx); err != nil {
		fail(err)
	}
	tx, _ = conn.Begin(ctx)
	must(tx.Exec(ctx, "UPDATE pgx_items SET qty = -1"))
	if err := tx.Rollback(ctx); err != nil {
		fail(err)
	}
	check(count(ctx, conn, "SELECT qty FROM pgx_items WHERE name = $1", "item1") == 102, "commit kept, rollback undone")
	fmt.Println("commit and rollback")

	// An error inside a transaction, then rollback; the connection goes on.
	tx, _ = conn.Begin(ctx)
	must(tx.Exec(ctx, "INSERT INTO pgx_log (note) VALUES ($1)", "rolled back"))
	_, err = tx.Exec(ctx, "INSERT INTO pgx_items (name) VALUES ($1)", "item2")
	check(code(err) == "23505", "unique violation: "+code(err))
	_, err = tx.Exec(ctx, "SELECT 1")
	check(code(err) == "25P02", "aborted transaction: "+code(err))
	if err := tx.Rollback(ctx); err != nil {
		fail(err)
	}
	check(count(ctx, conn, "SELECT count(*) FROM pgx_log WHERE note = 'rolled back'") == 0, "rolled back")
	fmt.Println("error in a transaction, rollback, connection still usable")

	// A savepoint (nested transaction) with an error; the outer one commits.
	tx, _ = conn.Begin(ctx)
	must(tx.Exec(ctx, "INSERT INTO pgx_log (note) VALUES ($1)", "before savepoint"))
	sp, err := tx.Begin(ctx)
	if err != nil {
		fail(err)
	}
	_, err = sp.Exec(ctx, "INSERT INTO pgx_items (name) VALUES ($1)", "item3")
	check(code(err) == "23505", "unique violation: "+code(err))
	if err := sp.Rollback(ctx); err != nil {
		fail(err)
	}
	must(tx.Exec(ctx, "INSERT INTO pgx_log (note) VALUES ($1)", "after savepoint"))
	if err := tx.Commit(ctx); err != nil {
		fail(err)
	}
	check(count(ctx, conn, "SELECT count(*) FROM pgx_log WHERE note LIKE '% savepoint'") == 2, "both sides of the savepoint")
	fmt.Println("savepoint with an error rolled back, transaction committed")

	// A batch: several statements in one round trip.
	b := &pgx.Batch{}
	for i := 10; i < 20; i++ {
		b.Queue("INSERT INTO pgx_items (name, qty) VALUES ($1, $2)", fmt.Sprintf("item%d", i), i)
	}
	b.Queue("UPDATE pgx_items SET qty = qty * 2 WHERE name = $1", "item19")
	b.Queue("SELECT count(*) FROM pgx_items")
	br := conn.SendBatch(ctx, b)
	for i := 0; i < 11; i++ {
		must(br.Exec())
	}
	var n int64
	if err := br.QueryRow().Scan(&n); err != nil {
		fail(err)
	}
	check(n == 20, "20 rows after the batch")
	if err := br.Close(); err != nil {
		fail(err)
	}
	fmt.Println("batch of 12 statements")

	// A batch inside a transaction.
	tx, _ = conn.Begin(ctx)
	b = &pgx.Batch{}
	b.Queue("INSERT INTO pgx_log (note) VALUES ($1)", "batch in a transaction")
	b.Queue("DELETE FROM pgx_items WHERE name = $1", "item18")
	br = tx.SendBatch(ctx, b)
	must(br.Exec())
	must(br.Exec())
	if err := br.Close(); err != nil {
		fail(err)
	}
	if err := tx.Commit(ctx); err != nil {
		fail(err)
	}
	check(count(ctx, conn, "SELECT count(*) FROM pgx_items") == 19, "19 rows")
	fmt.Println("batch inside a transaction")
	fmt.Println("pgx ok")
}
