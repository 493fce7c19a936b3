#!/bin/bash
# After a release build. Run as root from the repository:
#   bash benches/scripts/perf_relay.sh                      # -S -M simple -c 8 -j 2
#   ARGS="-S -M prepared -c 8 -j 2" bash benches/scripts/perf_relay.sh
#   PROXY_EXTRA="worker_threads = 1" bash benches/scripts/perf_relay.sh
# Relays pgbench ($ARGS, 10 s, scale 10, fsync off) through meridian (its
# default config, Unix-socket backend) and through PgBouncer (session mode),
# one after the other against one PostgreSQL. For each proxy: tps, syscalls
# per transaction (strace -c -f over the whole run) in $D/strace-*.txt, and
# perf record -g of the proxy for the last 5 s in $D/report-*.txt.
W=${W:-/tmp/meridian-perf}; mkdir -p $W
ARGS=${ARGS:-"-S -M simple -c 8 -j 2"}
set -e
. "$(dirname "$0")/start_pg.sh"
. "$(dirname "$0")/relay_targets.sh"
D=$W/relay; start_pg $D 55434
echo "fsync = off" >> $D/data/postgresql.conf; su postgres -c "$PGBIN/pg_ctl -D $D/data -w restart -l $D/log" >/dev/null
pgbench -i -q -s 10 postgres 2>/dev/null
start_relays 55434 56001 56002 200
for target in meridian:56001:$MP pgbouncer:56002:$BP; do
    IFS=: read name port pid <<<"$target"
    url="postgres://postgres@127.0.0.1:$port/postgres"
    pgbench $ARGS -n -T 3 "$url" >/dev/null 2>&1   # warm up
    pgbench $ARGS -n -T 10 "$url" > $D/pgbench-$name.out 2>&1 &
    PB=$!
    timeout -s INT 10 strace -c -f -p $pid -o $D/strace-$name.txt >/dev/null 2>&1 || true
    wait $PB
    tx=$(grep "^number of transactions actually processed" $D/pgbench-$name.out | awk '{print $NF}')
    echo "$name: $(grep '^tps' $D/pgbench-$name.out) ($tx transactions under strace)"
    awk -v tx=$tx 'NR>2 && $4 ~ /^[0-9]+$/ {printf "  %-16s %6.2f calls/tx\n", $NF, $4/tx}' $D/strace-$name.txt | head -8
    pgbench $ARGS -n -T 10 "$url" > $D/pgbench-perf-$name.out 2>&1 &
    PB=$!
    sleep 3
    perf record -F 999 -g -p $pid -o $D/perf-$name.data -- sleep 5 >/dev/null 2>&1
    wait $PB
    echo "  without strace: $(grep '^tps' $D/pgbench-perf-$name.out)"
    perf report -i $D/perf-$name.data --no-children --sort dso,symbol --stdio 2>/dev/null | grep "%" | head -40 > $D/report-$name.txt
done
kill $MP $BP; wait $MP 2>/dev/null || true
stop_pg $D
