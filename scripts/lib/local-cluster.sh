# Shared by scripts/run-local and scripts/failover-demo (sourced, not run):
# a throw-away cluster on free loopback ports in a temp dir, every process
# stopped by pid on exit. The caller sets PG_BIN, TENANT and TIMELINE first.

[ -x "$PG_BIN/postgres" ] || { echo "PostgreSQL 15 not found in $PG_BIN (see README)"; exit 1; }
cargo build --release -q -p safekeeper -p compute_shim -p pageserver_stub
SK=$PWD/target/release/safekeeper
SHIM=$PWD/target/release/compute_shim
STUB=$PWD/target/release/pageserver_stub

WORK=$(mktemp -d /tmp/safekeeper-local.XXXXXX)
chmod 755 "$WORK"
PIDS=()
# Data directories of every Postgres started, stopped on exit.
PGDATAS=()
# Postgres refuses to run as root: run its programs as the postgres user.
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
http_json() { python3 -c 'import json,sys,urllib.request; print(json.dumps(json.load(urllib.request.urlopen(sys.argv[1], timeout=5))))' "$1"; }
json_field() { python3 -c 'import json,sys; print(json.load(sys.stdin)[sys.argv[1]])' "$1"; }
lsn_num() { python3 -c 'import sys; a, b = sys.argv[1].split("/"); print((int(a, 16) << 32) | int(b, 16))' "$1"; }

cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for data in "${PGDATAS[@]}"; do
        if [ -f "$data/postmaster.pid" ]; then
            as_pg "$PG_BIN/pg_ctl" -D "$data" -m immediate -w -t 30 stop >/dev/null 2>&1 || true
        fi
    done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    if [ "${KEEP:-0}" = 1 ]; then echo "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Append the settings every Postgres of the cluster gets to $1/postgresql.conf
# (port $2), then start it.
configure_and_start_postgres() {
    local data=$1 port=$2
    cat >>"$data/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$data'
synchronous_commit = on
CONF
    as_pg "$PG_BIN/pg_ctl" -D "$data" -l "$data/server.log" -w -t 60 start >/dev/null
}

# A new primary in $1 on port $2 whose commits wait for compute_shim.
start_primary() {
    local data=$1 port=$2
    mkdir -p "$data"
    [ "$(id -u)" = 0 ] && chown postgres "$data"
    as_pg "$PG_BIN/initdb" -D "$data" -A trust -U postgres >/dev/null
    echo "synchronous_standby_names = 'safekeepers'" >>"$data/postgresql.conf"
    PGDATAS+=("$data")
    configure_and_start_postgres "$data" "$port"
}

# Three safekeepers that know each other's HTTP ports (peer recovery):
# SK_PG and SK_HTTP hold their addresses, SK_PIDS their pids.
start_safekeepers() {
    SK_PG=() SK_HTTP=() SK_PIDS=()
    for id in 1 2 3; do
        SK_PG+=("127.0.0.1:$(free_port)") SK_HTTP+=("127.0.0.1:$(free_port)")
    done
    for id in 1 2 3; do
        local peers=()
        for peer in 1 2 3; do
            [ "$peer" = "$id" ] || peers+=(--peer-http "${SK_HTTP[$((peer - 1))]}")
        done
        "$SK" --id "$id" --datadir "$WORK/sk$id" --listen-pg "${SK_PG[$((id - 1))]}" \
            --listen-http "${SK_HTTP[$((id - 1))]}" "${peers[@]}" >>"$WORK/sk$id.log" 2>&1 &
        PIDS+=($!) SK_PIDS+=($!)
    done
}

# compute_shim for the Postgres on port $1, logging to $WORK/$2.log; sets
# SHIM_PID and SHIM_HTTP.
start_shim() {
    local port=$1 name=$2
    SHIM_HTTP=127.0.0.1:$(free_port)
    "$SHIM" --pg "host=127.0.0.1 port=$port user=postgres dbname=postgres" \
        --safekeepers "$(IFS=,; echo "${SK_PG[*]}")" --tenant-id "$TENANT" --timeline-id "$TIMELINE" \
        --listen-http "$SHIM_HTTP" >"$WORK/$name.log" 2>&1 &
    SHIM_PID=$!
    PIDS+=("$SHIM_PID")
}

# Wait (30 s at most) until the shim started last is elected.
wait_elected() {
    local phase=
    for _ in $(seq 1 300); do
        phase=$(http_json "http://$SHIM_HTTP/v1/status" 2>/dev/null | json_field phase || true)
        [ "$phase" = elected ] && return 0
        kill -0 "$SHIM_PID" 2>/dev/null || { cat "$WORK/$1.log"; exit 1; }
        sleep 0.1
    done
    echo "compute_shim not elected within 30 s"
    cat "$WORK/$1.log"
    exit 1
}
