#!/bin/bash
# After `cargo bench --bench capture_e2e` (release build). Run as root from the repository:
#   bash benches/scripts/profile_capture.sh
W=${W:-/tmp/meridian-profile}; mkdir -p $W
# CPU per process kind while TPC-B-like runs through meridian with capture (durable).
set -e
. "$(dirname "$0")/start_pg.sh"
. "$(dirname "$0")/captured_region.sh"
start_captured $W/prof
snap() { for p in /proc/[0-9]*; do pid=${p#/proc/}; [ -r $p/stat ] || continue; c=$(cat $p/cmdline 2>/dev/null | tr '\0' ' '); s=$(awk '{print $14+$15}' $p/stat 2>/dev/null); echo "$pid|$s|$c"; done; }
/usr/bin/time -f "pgbench %U %S" -o $D/pgbench.time pgbench -M prepared -c 8 -j 2 -n -T 22 "postgres://postgres@127.0.0.1:56000/captured" > $D/pgbench.out 2>&1 &
PB=$!
sleep 3
snap > $D/before
psql -qXAt -F'|' captured -c "select pid, coalesce(nullif(application_name,''), backend_type) from pg_stat_activity" > $D/apps
sleep 15
snap > $D/after
wait $PB
grep "^tps" $D/pgbench.out
cat $D/pgbench.time
python3 - <<'PY'
import collections
def load(f):
    d={}
    for l in open(f):
        pid,s,c=l.rstrip('\n').split('|',2)
        if s: d[pid]=(int(s),c)
    return d
import os
D=os.environ['D']
b=load(D+'/before'); a=load(D+'/after')
apps={}
for l in open(D+'/apps'):
    p,n=l.rstrip('\n').split('|',1); apps[p]=n
g=collections.Counter()
for pid,(s,c) in a.items():
    d=s-b.get(pid,(0,''))[0] if pid in b else s
    if d<=0: continue
    if 'meridian run' in c: k='meridian (relay + capture task)'
    elif c.startswith('pgbench'): k='pgbench'
    elif 'walsender' in c or 'START_REPLICATION' in c: k='postgres: walsender (decoding)'
    elif pid in apps and apps[pid] in ('pgbench',): k='postgres: backends of the pgbench clients'
    elif pid in apps and apps[pid].startswith('meridian'): k='postgres: backend of '+apps[pid]
    elif c.startswith('postgres:'): k='postgres: '+c.split(':')[1].strip().split(' ')[0]+' '+(c.split(':')[1].strip().split(' ')[1] if len(c.split(':')[1].strip().split(' '))>1 else '')
    else: continue
    g[k]+=d
tot=sum(g.values())
for k,v in g.most_common(): print(f"| {k} | {v/100:.1f} s | {100*v/tot:.0f}% |")
PY
kill $MP; wait $MP 2>/dev/null || true
psql -qX captured -c "select application_name, backend_type from pg_stat_activity" >/dev/null
stop_pg $D
