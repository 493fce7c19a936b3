#!/bin/bash
# After a release build. Run as root from the repository:
#   bash benches/scripts/idle_sessions.sh        # N=1000 by default
# Memory per idle client session: N pgbench clients connect through
# meridian (default config, Unix-socket backend) and through PgBouncer
# (session mode), each runs one SELECT and then sits idle for 20 s; the
# proxy's resident memory (VmRSS) is read before the clients connect and
# while they are all idle.
W=${W:-/tmp/meridian-perf}; mkdir -p $W
N=${N:-1000}
set -e
. "$(dirname "$0")/start_pg.sh"
. "$(dirname "$0")/relay_targets.sh"
D=$W/idle; start_pg $D 55435
cat >> $D/data/postgresql.conf <<CONF
max_connections = $((N + 100))
fsync = off
CONF
su postgres -c "$PGBIN/pg_ctl -D $D/data -w restart -l $D/log" >/dev/null
printf 'SELECT 1;\n\\sleep 20 s\n' > $D/idle.sql
start_relays 55435 56003 56004 $((N + 10))
rss() { awk '/VmRSS/ {print $2}' /proc/$1/status; }
for target in meridian:56003:$MP pgbouncer:56004:$BP; do
    IFS=: read name port pid <<<"$target"
    before=$(rss $pid)
    pgbench -n -c $N -j 2 -f $D/idle.sql -t 1 "postgres://postgres@127.0.0.1:$port/postgres" > $D/pgbench-$name.out 2>&1 &
    PB=$!
    sleep 15
    during=$(rss $pid)
    sessions=$(psql -qXAt -c "select count(*) from pg_stat_activity where backend_type = 'client backend'" postgres)
    wait $PB || true
    echo "$name: RSS ${before} kB before, ${during} kB with $((sessions - 1)) backend sessions open: $(( (during - before) / N )) kB per idle session"
done
kill $MP $BP; wait $MP 2>/dev/null || true
stop_pg $D
