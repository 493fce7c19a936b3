#!/bin/bash
# After `cargo build --release`. Run as root from the repository:
#   bash benches/scripts/relay_floor.sh                   # -S -M prepared -c 8 -j 2
#   ARGS="-S -M prepared -c 1" ROUNDS=3 bash benches/scripts/relay_floor.sh
# What any relay costs here: pgbench ($ARGS, $T s, scale 10, fsync off)
# straight at PostgreSQL over TCP, through PgBouncer (session mode), through
# meridian (io_uring relay, and relay = "epoll"), and through bare relays
# that only forward bytes (benches/floor: mio, tokio current-thread, io_uring),
# in alternating rounds. Per run: tps, the proxy's CPU per transaction
# (utime+stime of all its threads from /proc), the whole machine's busy CPU
# per transaction and context switches per transaction (from /proc/stat).
W=${W:-/tmp/meridian-floor}; mkdir -p $W
ARGS=${ARGS:-"-S -M prepared -c 8 -j 2"}
T=${T:-10}; ROUNDS=${ROUNDS:-3}
set -e
(cd benches/floor && cargo build --release -q)
FLOOR=benches/floor/target/release/relay-floor
. "$(dirname "$0")/start_pg.sh"
. "$(dirname "$0")/relay_targets.sh"
D=$W/relay; start_pg $D 55434
sed -i "s/^listen_addresses = ''/listen_addresses = '127.0.0.1'/" $D/data/postgresql.conf
echo "fsync = off" >> $D/data/postgresql.conf
su postgres -c "$PGBIN/pg_ctl -D $D/data -w restart -l $D/log" >/dev/null
pgbench -i -q -s 10 postgres 2>/dev/null
start_relays 55434 56001 56002 200
SOCK=$D/.s.PGSQL.55434
sed 's/^listen = .*/listen = "127.0.0.1:56009"/; s/^\[proxy\]/[proxy]\nrelay = "epoll"/' $D/m.toml > $D/m2.toml
MERIDIAN_LOG=error ${MERIDIAN:-target/release/meridian} run --config $D/m2.toml >/dev/null 2>&1 & EP=$!
$FLOOR mio 127.0.0.1:56003 $SOCK & P3=$!
$FLOOR tokio1 127.0.0.1:56004 $SOCK & P4=$!
$FLOOR uring 127.0.0.1:56005 $SOCK & P5=$!
sleep 1
pcpu() { [ -z "$1" ] && { echo 0; return; }; awk '{print $14+$15}' /proc/$1/stat; }
sys() { awk '/^cpu /{print $2+$3+$4+$7+$8} /^ctxt/{print $2}' /proc/stat | paste -sd' '; }
HZ=$(getconf CLK_TCK)
set +e
for r in $(seq 1 $ROUNDS); do
  for t in direct:55434: pgbouncer:56002:$BP meridian:56001:$MP meridian-epoll:56009:$EP \
           bare-mio:56003:$P3 bare-tokio1:56004:$P4 bare-uring:56005:$P5; do
    IFS=: read name port pid <<<"$t"
    p0=$(pcpu $pid); read c0 x0 <<<"$(sys)"
    out=$(pgbench $ARGS -n -T $T "postgres://postgres@127.0.0.1:$port/postgres" 2>/dev/null)
    p1=$(pcpu $pid); read c1 x1 <<<"$(sys)"
    tx=$(echo "$out" | grep "^number of transactions actually processed" | awk '{print $NF}')
    tps=$(echo "$out" | grep '^tps' | awk '{printf "%.0f", $3}')
    awk -v n=$name -v r=$r -v tps=$tps -v tx=$tx -v p=$((p1-p0)) -v c=$((c1-c0)) -v x=$((x1-x0)) -v hz=$HZ \
      'BEGIN{printf "round %d %-15s tps %6d  proxy %5.1f us/tx  machine %6.1f us/tx  ctxsw %5.2f/tx\n", r, n, tps, p*1e6/hz/tx, c*1e6/hz/tx, x/tx}'
  done
done
kill $MP $BP $EP $P3 $P4 $P5 2>/dev/null; sleep 1
stop_pg $D
