# Sourced by profile_capture.sh and perf_capture.sh (after start_pg.sh):
# start_captured DIR starts a durable PostgreSQL in DIR with pgbench's tables
# at scale 10 in database "captured" (pgbench_history insert-only), migrates
# it, starts `meridian run` (1 worker thread, proxy on 127.0.0.1:56000; its
# pid in MP) and warms up with 5 s of TPC-B-like.
start_captured() {
    export D=$1
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
}
