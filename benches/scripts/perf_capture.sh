#!/bin/bash
# After a release build. Run as root from the repository:
#   bash benches/scripts/perf_capture.sh            # meridian's Postgres sessions (the capture writer)
#   WHAT=meridian bash benches/scripts/perf_capture.sh   # the meridian process
# perf record -g for 10 s while TPC-B-like runs through meridian with
# capture (durable); flat and cumulative reports in $W/prof/report*.txt.
W=${W:-/tmp/meridian-perf}; mkdir -p $W
set -e
. "$(dirname "$0")/start_pg.sh"
. "$(dirname "$0")/captured_region.sh"
start_captured $W/prof
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
