#!/bin/bash
# Capture candidates measured before choosing WAL capture (issue 13): pgbench's
# TPC-B-like script, -M prepared -c 8 -j 2, straight to one durable
# PostgreSQL 15 (wal_level = logical), no proxy, three rounds alternating the
# targets. Run as root (Postgres runs as the postgres user):
#   bash benches/scripts/capture_candidates.sh        (T=15 seconds per run)
# The first statement-in-a-round-trip rows show what one extra statement per
# transaction costs; pgbench's own pipeline costs a round trip as well, so it
# cannot stand in for the proxy's same-packet injection.
set -e
W=${W:-/tmp/meridian-capture-candidates}
mkdir -p $W
. "$(dirname "$0")/start_pg.sh"
D=$W/pg
start_pg $D 55432
for db in a b c d; do psql -qX -c "create database $db" postgres; pgbench -i -q -s 10 $db 2>/dev/null; done
# b: slot + stamp message per transaction, consumed live by pg_recvlogical
psql -qX b -c "create publication meridian for all tables" -c "select pg_create_logical_replication_slot('m','pgoutput')" >/dev/null
# tpcb FILE BEFORE PIPE: pgbench's TPC-B-like script with BEFORE (a
# statement, or nothing) after BEGIN; PIPE=1 sends it and the first UPDATE
# in one pgbench pipeline.
tpcb() {
  {
    printf '%s\n' '\set aid random(1, 100000 * :scale)' '\set bid random(1, 1 * :scale)' \
      '\set tid random(1, 10 * :scale)' '\set delta random(-5000, 5000)' 'BEGIN;'
    [ "$3" = 1 ] && echo '\startpipeline'
    [ -n "$2" ] && echo "$2"
    echo 'UPDATE pgbench_accounts SET abalance = abalance + :delta WHERE aid = :aid;'
    [ "$3" = 1 ] && echo '\endpipeline'
    printf '%s\n' 'SELECT abalance FROM pgbench_accounts WHERE aid = :aid;' \
      'UPDATE pgbench_tellers SET tbalance = tbalance + :delta WHERE tid = :tid;' \
      'UPDATE pgbench_branches SET bbalance = bbalance + :delta WHERE bid = :bid;' \
      'INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (:tid, :bid, :aid, :delta, CURRENT_TIMESTAMP);' \
      'END;'
  } > "$1"
}
MSG="SELECT pg_logical_emit_message(true, 'meridian', '1234567890');"
tpcb $W/tpcb_msg.sql "$MSG" 0
tpcb $W/tpcb_one.sql "SELECT 1;" 0
tpcb $W/tpcb_pipe.sql "$MSG" 1
tpcb $W/tpcb_pipe0.sql "" 1
# c: cheapest row trigger: one insert of the row's text per row
psql -qX c <<'SQL'
create table cap_log (id bigserial primary key, tx xid8 default pg_current_xact_id(), tbl oid, op "char", r text);
create function cap() returns trigger language plpgsql as $$
begin
  if tg_op = 'DELETE' then insert into cap_log (tbl, op, r) values (tg_relid, 'D', old::text);
  else insert into cap_log (tbl, op, r) values (tg_relid, left(tg_op,1), new::text); end if;
  return null;
end $$;
create trigger cap after insert or update or delete on pgbench_accounts for each row execute function cap();
create trigger cap after insert or update or delete on pgbench_tellers for each row execute function cap();
create trigger cap after insert or update or delete on pgbench_branches for each row execute function cap();
create trigger cap after insert or update or delete on pgbench_history for each row execute function cap();
SQL
# d: statement-level triggers with transition tables
psql -qX d <<'SQL'
create table cap_log (id bigserial primary key, tx xid8 default pg_current_xact_id(), tbl oid, op "char", r text);
create function cap_ins() returns trigger language plpgsql as $$
begin insert into cap_log (tbl, op, r) select tg_relid, 'I', n::text from new_rows n; return null; end $$;
create function cap_upd() returns trigger language plpgsql as $$
begin insert into cap_log (tbl, op, r) select tg_relid, 'U', n::text from new_rows n; return null; end $$;
do $$ declare t text; begin
 foreach t in array array['pgbench_accounts','pgbench_tellers','pgbench_branches','pgbench_history'] loop
  execute format('create trigger cap_i after insert on %I referencing new table as new_rows for each statement execute function cap_ins()', t);
  execute format('create trigger cap_u after update on %I referencing new table as new_rows for each statement execute function cap_upd()', t);
 end loop; end $$;
SQL
pg_recvlogical -d b --slot m --start -o proto_version=1 -o publication_names=meridian -o messages=true -f /dev/null &
RECV=$!
T=${T:-15}
ARGS="-M prepared -c 8 -j 2 -n -T $T"
for db in a b c d; do pgbench $ARGS -T 5 $db >/dev/null 2>&1; done
echo "| round | target | tps |"
for round in 1 2 3; do
  for t in "a:builtin tpcb-like:no capture" \
           "a:f $W/tpcb_one.sql:no capture, one more statement (SELECT 1) per transaction" \
           "a:f $W/tpcb_pipe0.sql:no capture, first UPDATE in a pgbench pipeline" \
           "b:builtin tpcb-like:pgoutput slot consumed live by pg_recvlogical, nothing else" \
           "b:f $W/tpcb_msg.sql:slot + pg_logical_emit_message per transaction (own statement)" \
           "b:f $W/tpcb_pipe.sql:slot + pg_logical_emit_message pipelined with the first UPDATE" \
           "c:builtin tpcb-like:cheapest row trigger: NEW::text into a log table" \
           "d:builtin tpcb-like:statement trigger: transition table into a log table"; do
    db=${t%%:*}; rest=${t#*:}; script=${rest%%:*}; name=${rest#*:}
    psql -qX $db -c "checkpoint" >/dev/null
    if [[ $script == builtin* ]]; then S="-b ${script#builtin }"; else S="-${script}"; fi
    tps=$(pgbench $ARGS $S $db 2>/dev/null | awk '/^tps/ {print $3}')
    echo "| $round | $name | $tps |"
  done
done
kill $RECV
stop_pg $D
