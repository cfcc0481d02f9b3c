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
# GET a JSON document; with SECURE=1 over HTTPS trusting the cluster's CA,
# with the token the path needs (a timeline's: safekeeper_data; the rest:
# admin), read from its file.
http_json() {
    python3 - "$1" "${SECURE_DIR:-}" <<'PY'
import json, ssl, sys, urllib.request
url, secure = sys.argv[1], sys.argv[2]
headers, context = {}, None
if secure:
    token = open(secure + ("/data.token" if "/timeline/" in url else "/admin.token")).read().strip()
    headers["Authorization"] = "Bearer " + token
    context = ssl.create_default_context(cafile=secure + "/ca.crt")
request = urllib.request.Request(url, headers=headers)
print(json.dumps(json.load(urllib.request.urlopen(request, timeout=5, context=context))))
PY
}
json_field() { python3 -c 'import json,sys; print(json.load(sys.stdin)[sys.argv[1]])' "$1"; }
lsn_num() { python3 -c 'import sys; a, b = sys.argv[1].split("/"); print((int(a, 16) << 32) | int(b, 16))' "$1"; }

# SECURE=1 (run-local --secure): TLS and tokens on every hop. A CA, one
# certificate for 127.0.0.1 every process serves (Postgres included), an
# Ed25519 key pair and a token per scope, all in $SECURE_DIR; Postgres
# accepts TCP only over TLS; libpq clients verify-full.
SCHEME=http
SK_SECURITY=() SHIM_SECURITY=() STUB_SECURITY=() PG_TLS=""
setup_security() {
    SECURE_DIR=$WORK/secure
    mkdir -p "$SECURE_DIR"
    chmod 755 "$SECURE_DIR"
    local d=$SECURE_DIR
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout "$d/ca.key" -out "$d/ca.crt" \
        -days 2 -subj "/CN=run-local CA" -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout "$d/server.key" -out "$d/server.csr" \
        -subj "/CN=localhost" 2>/dev/null
    printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n' >"$d/server.ext"
    openssl x509 -req -in "$d/server.csr" -CA "$d/ca.crt" -CAkey "$d/ca.key" -CAcreateserial -days 2 \
        -extfile "$d/server.ext" -out "$d/server.crt" 2>/dev/null
    openssl genpkey -algorithm ed25519 -out "$d/auth.key"
    openssl pkey -in "$d/auth.key" -pubout -out "$d/auth.pub"
    (umask 077
     "$SK" token --private-key "$d/auth.key" --scope admin --ttl-s 86400 >"$d/admin.token"
     "$SK" token --private-key "$d/auth.key" --scope safekeeper_data --ttl-s 86400 >"$d/data.token"
     "$SK" token --private-key "$d/auth.key" --scope tenant --tenant-id "$TENANT" --ttl-s 86400 >"$d/tenant.token")
    chmod 600 "$d/server.key" "$d/auth.key" "$d/ca.key"
    SCHEME=https
    local tls=(--tls-cert "$d/server.crt" --tls-key "$d/server.key")
    SK_SECURITY=("${tls[@]}" --auth-public-key "$d/auth.pub" --peer-auth-token-file "$d/data.token" --tls-ca "$d/ca.crt")
    SHIM_SECURITY=("${tls[@]}" --auth-public-key "$d/auth.pub" --auth-token-file "$d/tenant.token" --tls-ca "$d/ca.crt")
    STUB_SECURITY=("${tls[@]}" --auth-token-file "$d/data.token" --tls-ca "$d/ca.crt")
    PG_TLS="sslmode=verify-full sslrootcert=$d/ca.crt"
    export PGSSLMODE=verify-full PGSSLROOTCERT=$d/ca.crt
}

# Serve TLS on the Postgres in $1 with the cluster's certificate; TCP only
# over TLS (the Unix socket stays trust).
postgres_requires_tls() {
    local data=$1
    cp "$SECURE_DIR/server.crt" "$SECURE_DIR/server.key" "$data/"
    [ "$(id -u)" = 0 ] && chown postgres "$data/server.crt" "$data/server.key"
    chmod 600 "$data/server.key"
    printf 'local all all trust\nlocal replication all trust\nhostssl all all 127.0.0.1/32 trust\nhostssl replication all 127.0.0.1/32 trust\n' >"$data/pg_hba.conf"
    printf "ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n" >>"$data/postgresql.conf"
}

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
    [ -n "$PG_TLS" ] && postgres_requires_tls "$data"
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
            --listen-http "${SK_HTTP[$((id - 1))]}" "${peers[@]}" "${SK_SECURITY[@]}" >>"$WORK/sk$id.log" 2>&1 &
        PIDS+=($!) SK_PIDS+=($!)
    done
}

# compute_shim for the Postgres on port $1, logging to $WORK/$2.log; sets
# SHIM_PID and SHIM_HTTP.
start_shim() {
    local port=$1 name=$2
    SHIM_HTTP=127.0.0.1:$(free_port)
    "$SHIM" --pg "host=127.0.0.1 port=$port user=postgres dbname=postgres $PG_TLS" \
        --safekeepers "$(IFS=,; echo "${SK_PG[*]}")" --tenant-id "$TENANT" --timeline-id "$TIMELINE" \
        --listen-http "$SHIM_HTTP" "${SHIM_SECURITY[@]}" >"$WORK/$name.log" 2>&1 &
    SHIM_PID=$!
    PIDS+=("$SHIM_PID")
}

# Wait (30 s at most) until the shim started last is elected.
wait_elected() {
    local phase=
    for _ in $(seq 1 300); do
        phase=$(http_json "$SCHEME://$SHIM_HTTP/v1/status" 2>/dev/null | json_field phase || true)
        [ "$phase" = elected ] && return 0
        kill -0 "$SHIM_PID" 2>/dev/null || { cat "$WORK/$1.log"; exit 1; }
        sleep 0.1
    done
    echo "compute_shim not elected within 30 s"
    cat "$WORK/$1.log"
    exit 1
}
