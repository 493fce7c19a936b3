#!/bin/bash
# After a release build. Run as root from the repository:
#   bash benches/scripts/perf_capture.sh            # meridian's Postgres sessions (the capture writer)
#   WHAT=meridian bash benches/scripts/perf_capture.sh   # the meridian process
# perf record -g for 10 s while TPC-B-like runs through meridian with
# capture (durable); flat and cumulative reports in $W/prof/report*.txt.
W=${W:-/tmp/meridian-perf}; mkdir -p $W
set -e
. "$(dirname "$0")/start_pg.sh"
export D=$W/prof
start_pg $D 55433
psql -qX -c "create database captured" postgres; pgbench -i -q -s 10 captured 2>/dev/null
mkdir -p $D/rules; printf '[[table]]\nname = "public.pgbench_history"\ninsert_only = true\n' > $D/rules/pgbench.toml
cat > $D/m.toml <<CONF
[region]
name = "prof"
id = 1
[proxy]
listen = "127.0.0.1:56000"
worker_threads = 1
[backend]
host = "$D"
port = 55433
user = "postgres"
database = "captured"
[replication]
rules = "$D/rules"
[auth]
method = "trust"
CONF
M=${MERIDIAN:-target/release/meridian}
$M migrate --config $D/m.toml >/dev/null
MERIDIAN_LOG=warn $M run --config $D/m.toml >/dev/null 2>&1 &
MP=$!
sleep 2
pgbench -M prepared -c 8 -j 2 -n -T 5 "postgres://postgres@127.0.0.1:56000/captured" >/dev/null 2>&1
pgbench -M prepared -c 8 -j 2 -n -T 20 "postgres://postgres@127.0.0.1:56000/captured" > $D/pgbench.out 2>&1 &
PB=$!
sleep 3
psql -qXAt -F'|' captured -c "select pid, application_name, backend_type from pg_stat_activity" > $D/apps
if [ "${WHAT:-writer}" = meridian ]; then WPIDS=$MP; else
WPIDS=$(grep "|meridian|client backend" $D/apps | cut -d"|" -f1 | paste -sd,); fi
echo "profiling pids $WPIDS"
perf record -F 499 -g -p $WPIDS -o $D/perf.data -- sleep 10 2>/dev/null >/dev/null
wait $PB
grep "^tps" $D/pgbench.out
perf report -i $D/perf.data --no-children --sort symbol --stdio 2>/dev/null | grep -v "^$" | grep "%" | head -60 > $D/report.txt
perf report -i $D/perf.data --children --sort symbol --stdio -g none 2>/dev/null | grep "%" | head -80 > $D/report_children.txt
kill $MP; wait $MP 2>/dev/null || true
stop_pg $D
