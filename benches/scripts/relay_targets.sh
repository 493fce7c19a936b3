# Sourced by perf_relay.sh and idle_sessions.sh (after start_pg.sh and
# start_pg $D PGPORT): start_relays PGPORT MERIDIAN_PORT BOUNCER_PORT MAXCONN
# starts `meridian run` (default config, Unix-socket backend, relay only;
# $PROXY_EXTRA appended to [proxy]) and PgBouncer (session mode, trust, the
# same socket) in front of database postgres; their pids in MP and BP.
start_relays() {
    local pgport=$1 mport=$2 bport=$3 max=$4
    cat > $D/m.toml <<CONF
[region]
name = "relay"
id = 1
[proxy]
listen = "127.0.0.1:$mport"
max_connections = $max
${PROXY_EXTRA:-}
[backend]
host = "$D"
port = $pgport
user = "postgres"
database = "postgres"
[auth]
method = "trust"
CONF
    mkdir -p $D/bouncer; echo '"postgres" ""' > $D/bouncer/users.txt
    cat > $D/bouncer/pgbouncer.ini <<CONF
[databases]
postgres = host=$D port=$pgport dbname=postgres
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $bport
unix_socket_dir =
auth_type = trust
auth_file = $D/bouncer/users.txt
pool_mode = session
max_client_conn = $max
default_pool_size = $max
logfile = $D/bouncer/pgbouncer.log
pidfile = $D/bouncer/pgbouncer.pid
CONF
    chown -R postgres $D/bouncer
    ulimit -n $(ulimit -Hn)
    MERIDIAN_LOG=error ${MERIDIAN:-target/release/meridian} run --config $D/m.toml >/dev/null 2>&1 &
    MP=$!
    su postgres -c "ulimit -n \$(ulimit -Hn); pgbouncer -d $D/bouncer/pgbouncer.ini"
    sleep 2; BP=$(pgrep -u postgres -x pgbouncer)
}
