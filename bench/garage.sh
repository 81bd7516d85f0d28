#!/usr/bin/env bash
# garage.sh: starts (or stops) the single-node Garage 2.5.0 that the benchmarks use, set up the same way as
# crates/hearth-testkit/src/lib.rs sets up the test Garage (one node, one key, buckets on demand).
#
#   bench/garage.sh start            # start in $BENCH_DIR/garage0, print the env file path ($BENCH_DIR/env0)
#   bench/garage.sh bucket NAME      # create a bucket the key may read and write
#   bench/garage.sh metrics          # print Garage's S3 request counters (Prometheus text)
#   bench/garage.sh stop
#
# Fixed loopback ports are used so that the other scripts can find the store without a handshake.
set -euo pipefail

BENCH_DIR=${BENCH_DIR:-/tmp/hearth-bench}
GARAGE_BIN=${HEARTH_GARAGE:-$HOME/.cache/hearth/garage-2.5.0/bin/garage}
# BENCH_INSTANCE=N runs a second, independent Garage (own directory and ports +10*N), so that two tools can be
# measured at the same time, each with its own request counters.
INST=${BENCH_INSTANCE:-0}
GDIR=$BENCH_DIR/garage$INST
CONF=$GDIR/garage.toml
S3_PORT=$((39900 + 10 * INST))
RPC_PORT=$((39901 + 10 * INST))
ADMIN_PORT=$((39903 + 10 * INST))
# A fixed, benchmark-only key: Garage runs on loopback only and is thrown away after the run.
KEY_ID=GK0123456789abcdef01234567
SECRET=0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef

g() { "$GARAGE_BIN" -c "$CONF" "$@"; }

case "${1:-}" in
start)
    mkdir -p "$GDIR/meta" "$GDIR/data"
    cat >"$CONF" <<EOF
metadata_dir = "$GDIR/meta"
data_dir = "$GDIR/data"
db_engine = "sqlite"
metadata_fsync = false
data_fsync = false
replication_factor = 1

rpc_bind_addr = "127.0.0.1:$RPC_PORT"
rpc_public_addr = "127.0.0.1:$RPC_PORT"
rpc_secret = "$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')"

[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:$S3_PORT"
root_domain = ".s3.garage.localhost"

[admin]
api_bind_addr = "127.0.0.1:$ADMIN_PORT"
EOF
    RUST_LOG=garage=warn nohup "$GARAGE_BIN" -c "$CONF" server >"$GDIR/garage.log" 2>&1 &
    echo $! >"$GDIR/pid"
    for _ in $(seq 100); do g status >/dev/null 2>&1 && break; sleep 0.1; done
    node=$(g node id -q | cut -d@ -f1)
    g layout assign -z dc1 -c 20G "$node" >/dev/null
    g layout apply --version 1 >/dev/null
    g key import -n bench --yes "$KEY_ID" "$SECRET" >/dev/null
    cat >"$BENCH_DIR/env$INST" <<EOF
export LITESTREAM_ACCESS_KEY_ID=$KEY_ID
export LITESTREAM_SECRET_ACCESS_KEY=$SECRET
export AWS_ACCESS_KEY_ID=$KEY_ID
export AWS_SECRET_ACCESS_KEY=$SECRET
export AWS_REGION=garage
export BENCH_ENDPOINT=http://127.0.0.1:$S3_PORT
export BENCH_METRICS=http://127.0.0.1:$ADMIN_PORT/metrics
unset AWS_CA_BUNDLE SSL_CERT_FILE CURL_CA_BUNDLE
EOF
    echo "$BENCH_DIR/env$INST"
    ;;
bucket)
    g bucket create "$2" >/dev/null
    g bucket allow --read --write --owner --key "$KEY_ID" "$2" >/dev/null
    ;;
metrics)
    curl -s "http://127.0.0.1:$ADMIN_PORT/metrics" | grep '^api_s3_request_counter' || true
    ;;
stop)
    [ -f "$GDIR/pid" ] && kill "$(cat "$GDIR/pid")" 2>/dev/null || true
    ;;
*)
    echo "usage: $0 start|bucket NAME|metrics|stop" >&2
    exit 2
    ;;
esac
