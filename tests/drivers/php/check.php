<?php
// PHP PDO (pdo_pgsql) through meridian: DDL, parameterised inserts through
// a prepared statement reused (server-side, PDO's default), beginTransaction
// and commit, rollBack, an error inside a transaction followed by rollBack
// and continued use of the connection, and a savepoint. Argument: a libpq
// URL. Exits non-zero on any unexpected error.

function check($ok, $what)
{
    if (!$ok) {
        throw new RuntimeException("check failed: $what");
    }
}

function sqlstate(callable $f)
{
    try {
        $f();
    } catch (PDOException $e) {
        return $e->getCode();
    }
    throw new RuntimeException('no error');
}

$u = parse_url($argv[1]);
$dsn = sprintf('pgsql:host=%s;port=%d;dbname=%s', $u['host'], $u['port'], ltrim($u['path'], '/'));
$pdo = new PDO($dsn, $u['user'] ?? null, $u['pass'] ?? null, [PDO::ATTR_ERRMODE => PDO::ERRMODE_EXCEPTION]);
$one = fn($sql, $params = []) => (function () use ($pdo, $sql, $params) {
    $st = $pdo->prepare($sql);
    $st->execute($params);
    return $st->fetchColumn();
})();

$pdo->exec('CREATE TABLE php_items (id bigserial PRIMARY KEY, name text NOT NULL UNIQUE, qty int NOT NULL DEFAULT 0)');
$pdo->exec('CREATE TABLE php_log (id bigserial PRIMARY KEY, note text NOT NULL)');
echo "DDL: created php_items and php_log\n";

$ins = $pdo->prepare('INSERT INTO php_items (name, qty) VALUES (:name, :qty)');
for ($i = 0; $i < 10; $i++) {
    $ins->execute([':name' => "item$i", ':qty' => $i]);
    check($ins->rowCount() === 1, "insert item$i");
}
$bump = $pdo->prepare('UPDATE php_items SET qty = qty + ? WHERE name = ?');
for ($i = 0; $i < 10; $i++) {
    $bump->execute([1, "item$i"]);
}
check((int) $one('SELECT sum(qty) FROM php_items') === 55, 'sum after the prepared updates');
check((int) $one("SELECT count(*) FROM pg_prepared_statements WHERE statement LIKE 'UPDATE php_items%'") === 1, 'prepared server-side');
echo "inserted 10 rows; prepared statements reused 10 times\n";

$pdo->beginTransaction();
$pdo->prepare('UPDATE php_items SET qty = qty + 100 WHERE name = ?')->execute(['item1']);
$pdo->prepare('INSERT INTO php_log (note) VALUES (?)')->execute(['committed']);
$pdo->commit();
$pdo->beginTransaction();
$pdo->exec('UPDATE php_items SET qty = -1');
$pdo->rollBack();
check((int) $one('SELECT qty FROM php_items WHERE name = ?', ['item1']) === 102, 'commit kept, rollback undone');
echo "commit and rollback\n";

// An error inside a transaction, rollBack, and the connection goes on.
$pdo->beginTransaction();
$pdo->prepare('INSERT INTO php_log (note) VALUES (?)')->execute(['rolled back']);
check(sqlstate(fn() => $ins->execute([':name' => 'item2', ':qty' => 0])) === '23505', 'unique violation');
check(sqlstate(fn() => $bump->execute([1, 'item2'])) === '25P02', 'aborted transaction');
$pdo->rollBack();
check(!$pdo->inTransaction(), 'not in a transaction after rollBack');
check((int) $one("SELECT count(*) FROM php_log WHERE note = 'rolled back'") === 0, 'rolled back');
echo "error in a transaction, rollBack, connection still usable\n";

// A savepoint with an error; the outer transaction commits.
$pdo->beginTransaction();
$pdo->prepare('INSERT INTO php_log (note) VALUES (?)')->execute(['before savepoint']);
$pdo->exec('SAVEPOINT php_sp');
check(sqlstate(fn() => $ins->execute([':name' => 'item3', ':qty' => 0])) === '23505', 'unique violation');
$pdo->exec('ROLLBACK TO SAVEPOINT php_sp');
$pdo->prepare('INSERT INTO php_log (note) VALUES (?)')->execute(['after savepoint']);
$pdo->commit();
check((int) $one("SELECT count(*) FROM php_log WHERE note LIKE '% savepoint'") === 2, 'both sides of the savepoint');
echo "savepoint with an error rolled back, transaction committed\n";

$bump->execute([1, 'item5']);
$ins->execute([':name' => 'item10', ':qty' => 10]);
check((int) $one('SELECT count(*) FROM php_items') === 11, '11 items');
$pdo->prepare('INSERT INTO php_log (note) VALUES (?)')->execute(['still here']);
$pdo = null;
echo "php ok\n";
