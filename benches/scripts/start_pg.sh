# Sourced by the scripts here: start_pg DIR PORT starts a durable
# PostgreSQL 15 with wal_level = logical in DIR (as the postgres user) and
# points PGHOST/PGPORT/PGUSER at it; stop_pg DIR stops it.
PGBIN=/usr/lib/postgresql/15/bin
start_pg() {
    local dir=$1 port=$2
    rm -rf "$dir"; mkdir -p "$dir"; chown postgres "$dir"
    su postgres -c "$PGBIN/initdb -D $dir/data -A trust >/dev/null"
    cat >> "$dir/data/postgresql.conf" <<CONF
wal_level = logical
max_wal_senders = 10
max_replication_slots = 20
shared_buffers = 256MB
unix_socket_directories = '$dir'
listen_addresses = ''
port = $port
max_wal_size = 4GB
CONF
    su postgres -c "$PGBIN/pg_ctl -D $dir/data -l $dir/log -w start >/dev/null"
    export PGHOST=$dir PGPORT=$port PGUSER=postgres
}
stop_pg() {
    su postgres -c "$PGBIN/pg_ctl -D $1/data -w stop -m fast >/dev/null"
}
