#!/usr/bin/env bash
# run.sh: the hearth vs Litestream 0.5.17 benchmarks; one subcommand per figure of docs/benchmarks.md.
#
#   bench/run.sh throughput SECONDS          # writer tx/s alone, with hearth, with Litestream
#   bench/run.sh lag SECONDS                 # lag p50/p99 at 1,000 tx/s, both tools
#   bench/run.sh resources NDB SECONDS RATE  # CPU s and peak RSS, NDB databases at RATE tx/s each
#   bench/run.sh idle SECONDS                # S3 requests while idle (both tools at once, one Garage each)
#   bench/run.sh restore-prep MB             # build an MB MiB database and replicate it with both tools
#   bench/run.sh restore RUNS                # hyperfine: restore it with each tool; dd write bandwidth
#
# Needs a Garage started with bench/garage.sh start (and BENCH_INSTANCE=1 and BENCH_INSTANCE=2 bench/garage.sh start for `idle`).
# Results go to $BENCH_DIR/results/<figure>-<time>/.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
B=${BENCH_DIR:-/tmp/hearth-bench}
HEARTH=${HEARTH:-$B/bin/hearth}
LITESTREAM=${LITESTREAM:-/root/.cache/hearth/litestream-venv/bin/litestream}
PY="python3 $HERE/bench.py"
# shellcheck disable=SC1091
. "$B/env0"

newdir() { local d="$B/results/$1-$(date +%H%M%S)"; mkdir -p "$d"; echo "$d"; }

# mkconfig FILE DBDIR NDB BUCKET PREFIX ENDPOINT: a Litestream 0.5 config both tools read. Only the sync interval
# is spelled out, at both tools' default (1s), so that the comparison does not depend on a default changing.
mkconfig() {
    local file=$1 dbdir=$2 n=$3 bucket=$4 prefix=$5 endpoint=$6
    {
        echo "dbs:"
        for i in $(seq 0 $((n - 1))); do
            cat <<EOF
  - path: $dbdir/db$i.db
    replica:
      url: s3://$bucket/$prefix/db$i?endpoint=$endpoint&region=garage&forcePathStyle=true
      sync-interval: 1s
EOF
        done
    } >"$file"
}

# start TOOL CONFIG OUTDIR: runs the replicator under /usr/bin/time -v; sets TIMEPID and TOOLPID.
start() {
    local tool=$1 config=$2 out=$3
    local cmd
    case $tool in
    hearth) cmd=("$HEARTH" sqlite replicate -c "$config") ;;
    litestream) cmd=("$LITESTREAM" replicate -config "$config") ;;
    *) echo "unknown tool $tool" >&2; exit 2 ;;
    esac
    # Peak RSS counts the executable's pages that are mapped, and the kernel maps pages around each fault when
    # they are in the page cache: a freshly copied binary measured up to 2 MiB more than a cold one. Reading
    # the binary first puts both tools in the same (cached) state.
    cat "${cmd[0]}" >/dev/null
    /usr/bin/time -v -o "$out/time-$tool.txt" "${cmd[@]}" >"$out/log-$tool.txt" 2>&1 &
    TIMEPID=$!
    for _ in $(seq 50); do
        TOOLPID=$(pgrep -P "$TIMEPID" || true)
        [ -n "$TOOLPID" ] && break
        sleep 0.1
    done
}

stop() {
    kill -TERM "$TOOLPID" 2>/dev/null || true
    wait "$TIMEPID" || true
}

# cpu_rss FILE: "user+sys seconds, peak RSS KiB" from a /usr/bin/time -v report.
cpu_rss() {
    awk -F': ' '/User time/{u=$2} /System time/{s=$2} /Maximum resident/{r=$2} /Elapsed/{e=$2}
        END{printf "{\"cpu_s\": %.2f, \"user_s\": %.2f, \"sys_s\": %.2f, \"peak_rss_kib\": %d, \"wall\": \"%s\"}\n", u+s, u, s, r, e}' "$1"
}

bucket_for() { local b="b$(date +%H%M%S)$RANDOM"; BENCH_INSTANCE=${2:-0} "$HERE/garage.sh" bucket "$b"; echo "$b"; }

load() { echo "load: $(cut -d' ' -f1-3 /proc/loadavg); rustc: $(pgrep -c rustc || true)"; }

case "${1:-}" in
throughput)
    secs=${2:-20}
    out=$(newdir throughput)
    load | tee "$out/load.txt"
    for tool in none hearth litestream; do
        d="$out/$tool"; mkdir -p "$d"
        bucket=$(bucket_for "$tool")
        mkconfig "$d/config.yml" "$d" 1 "$bucket" "$tool" "$BENCH_ENDPOINT"
        $PY write --db "$d/db0.db" --seconds 1 >/dev/null # create the schema first
        [ "$tool" != none ] && { start "$tool" "$d/config.yml" "$d"; sleep 3; }
        echo "$tool $($PY write --db "$d/db0.db" --seconds "$secs")" | tee -a "$out/result.txt"
        [ "$tool" != none ] && { stop; echo "$tool $(cpu_rss "$d/time-$tool.txt")" | tee -a "$out/result.txt"; }
    done
    load | tee -a "$out/load.txt"
    ;;
lag)
    secs=${2:-60}
    out=$(newdir lag)
    load | tee "$out/load.txt"
    for tool in hearth litestream; do
        d="$out/$tool"; mkdir -p "$d"
        bucket=$(bucket_for "$tool")
        mkconfig "$d/config.yml" "$d" 1 "$bucket" "$tool" "$BENCH_ENDPOINT"
        $PY write --db "$d/db0.db" --seconds 1 >/dev/null
        start "$tool" "$d/config.yml" "$d"
        sleep 3
        $PY watch --bucket "$bucket" --prefix "$tool/db0" --seconds $((secs + 8)) --out "$d/objects.json" >"$d/watch.txt" &
        wpid=$!
        sleep 1
        $PY write --db "$d/db0.db" --rate 1000 --seconds "$secs" --commits "$d/commits.bin" | tee "$d/write.txt"
        wait $wpid
        stop
        echo "$tool $(cat "$d/write.txt")" >>"$out/result.txt"
        echo "$tool $($PY lag --commits "$d/commits.bin" --objects "$d/objects.json")" | tee -a "$out/result.txt"
        echo "$tool $(cpu_rss "$d/time-$tool.txt")" | tee -a "$out/result.txt"
    done
    load | tee -a "$out/load.txt"
    ;;
resources)
    n=${2:-1}; secs=${3:-120}; rate=${4:-1}
    out=$(newdir "resources-$n")
    load | tee "$out/load.txt"
    for tool in hearth litestream; do
        d="$out/$tool"; mkdir -p "$d"
        bucket=$(bucket_for "$tool")
        mkconfig "$d/config.yml" "$d" "$n" "$bucket" "$tool" "$BENCH_ENDPOINT"
        $PY writemany --dir "$d" --n "$n" --rate-per-db 0 --seconds 0 >/dev/null
        start "$tool" "$d/config.yml" "$d"
        echo "$tool $($PY writemany --dir "$d" --n "$n" --rate-per-db "$rate" --seconds "$secs")" | tee -a "$out/result.txt"
        stop
        echo "$tool $(cpu_rss "$d/time-$tool.txt")" | tee -a "$out/result.txt"
    done
    load | tee -a "$out/load.txt"
    ;;
idle)
    secs=${2:-600}
    out=$(newdir idle)
    load | tee "$out/load.txt"
    # hearth on Garage 1, Litestream on Garage 2, at the same time: each Garage counts only its tool's requests.
    inst=1
    declare -A tpid
    for tool in hearth litestream; do
        d="$out/$tool"; mkdir -p "$d"
        # shellcheck disable=SC1090
        . "$B/env$inst"
        bucket=$(bucket_for "$tool" "$inst")
        mkconfig "$d/config.yml" "$d" 1 "$bucket" "$tool" "$BENCH_ENDPOINT"
        $PY write --db "$d/db0.db" --seconds 1 >/dev/null
        start "$tool" "$d/config.yml" "$d"
        tpid[$tool]="$TIMEPID $TOOLPID"
        echo "$BENCH_METRICS" >"$d/metrics-url"
        inst=$((inst + 1))
    done
    # Some writes, then time for the first compaction (30 s) to happen before the idle window opens.
    for tool in hearth litestream; do $PY write --db "$out/$tool/db0.db" --rate 10 --seconds 5 >/dev/null & done
    wait_writers() { for j in $(jobs -p); do case " ${tpid[*]} " in *" $j "*) ;; *) wait "$j" ;; esac; done; }
    wait_writers
    sleep 60
    for tool in hearth litestream; do curl -s "$(cat "$out/$tool/metrics-url")" | grep '^api_s3_request_counter' >"$out/$tool/before.txt" || true; done
    date +%s >"$out/t0"
    # Sample the counters every minute so that a periodic request shows its period.
    for m in $(seq 1 $((secs / 60))); do
        sleep 60
        for tool in hearth litestream; do
            echo "== minute $m" >>"$out/$tool/samples.txt"
            curl -s "$(cat "$out/$tool/metrics-url")" | grep '^api_s3_request_counter' >>"$out/$tool/samples.txt" || true
        done
    done
    for tool in hearth litestream; do
        curl -s "$(cat "$out/$tool/metrics-url")" | grep '^api_s3_request_counter' >"$out/$tool/after.txt" || true
        read -r TIMEPID TOOLPID <<<"${tpid[$tool]}"
        stop
        echo "== $tool: requests during $secs s idle (after - before)" | tee -a "$out/result.txt"
        python3 - "$out/$tool/before.txt" "$out/$tool/after.txt" <<'EOF' | tee -a "$out/result.txt"
import re, sys
def read(p):
    d = {}
    for line in open(p):
        m = re.match(r'api_s3_request_counter\{api_endpoint="([^"]+)"\} (\d+)', line)
        if m:
            d[m.group(1)] = int(m.group(2))
    return d
b, a = read(sys.argv[1]), read(sys.argv[2])
total = 0
for k in sorted(a):
    n = a[k] - b.get(k, 0)
    if n:
        print(f"  {k}: {n}")
        total += n
print(f"  total: {total}")
EOF
        echo "$tool $(cpu_rss "$out/$tool/time-$tool.txt")" | tee -a "$out/result.txt"
    done
    ;;
restore-prep)
    mb=${2:-1024}
    d="$B/restore"; mkdir -p "$d"
    [ -f "$d/src/db0.db" ] || { mkdir -p "$d/src"; $PY seed --db "$d/src/db0.db" --mb "$mb"; }
    bucket=$(bucket_for restore)
    echo "$bucket" >"$d/bucket"
    for tool in hearth litestream; do
        # Each tool replicates its own copy of the same database file.
        mkdir -p "$d/$tool"
        cp "$d/src/db0.db" "$d/$tool/db0.db"
        mkconfig "$d/$tool/config.yml" "$d/$tool" 1 "$bucket" "$tool" "$BENCH_ENDPOINT"
        start "$tool" "$d/$tool/config.yml" "$d/$tool"
        # Wait until the first full snapshot is in the store (a level-0 or level-9 object of at least MB/2).
        for _ in $(seq 600); do
            sleep 2
            big=$(python3 - "$bucket" "$tool/db0/" "$mb" <<'EOF'
import os, sys, boto3
s3 = boto3.client("s3", endpoint_url=os.environ["BENCH_ENDPOINT"], region_name="garage")
r = s3.list_objects_v2(Bucket=sys.argv[1], Prefix=sys.argv[2])
print(sum(1 for o in r.get("Contents", []) if o["Size"] > int(sys.argv[3]) * 1024 * 1024 // 8))
EOF
)
            [ "$big" -gt 0 ] && break
        done
        sleep 5
        stop
        echo "$tool $(cpu_rss "$d/$tool/time-$tool.txt")"
    done
    python3 - "$bucket" <<'EOF'
import os, sys, boto3
s3 = boto3.client("s3", endpoint_url=os.environ["BENCH_ENDPOINT"], region_name="garage")
for o in s3.list_objects_v2(Bucket=sys.argv[1]).get("Contents", []):
    print(o["Key"], o["Size"])
EOF
    ;;
restore)
    runs=${2:-3}
    command -v hyperfine >/dev/null || { echo "run.sh restore: hyperfine is missing; install it (Debian: apt-get install hyperfine)" >&2; exit 2; }
    d="$B/restore"; bucket=$(cat "$d/bucket")
    out=$(newdir restore)
    load | tee "$out/load.txt"
    url() { echo "s3://$bucket/$1/db0?endpoint=$BENCH_ENDPOINT&region=garage&forcePathStyle=true"; }
    hyperfine --runs "$runs" --export-json "$out/hyperfine.json" --export-markdown "$out/hyperfine.md" \
        --prepare "rm -f $out/out.db $out/out.db-*" \
        -n hearth "$HEARTH sqlite restore -o $out/out.db '$(url hearth)'" \
        -n litestream "$LITESTREAM restore -o $out/out.db '$(url litestream)'" 2>&1 | tee "$out/result.txt"
    ls -l "$d/src/db0.db" | tee -a "$out/result.txt"
    # One more run of each under /usr/bin/time -v for CPU seconds and peak RSS, and a check of the result.
    rows=$(sqlite3 "$d/src/db0.db" "SELECT count(*) FROM t")
    for tool in hearth litestream; do
        rm -f "$out/out.db" "$out/out.db"-*
        case $tool in
        hearth) /usr/bin/time -v -o "$out/time-$tool.txt" "$HEARTH" sqlite restore -o "$out/out.db" "$(url hearth)" >/dev/null 2>&1 ;;
        litestream) /usr/bin/time -v -o "$out/time-$tool.txt" "$LITESTREAM" restore -o "$out/out.db" "$(url litestream)" >/dev/null 2>&1 ;;
        esac
        got=$(sqlite3 "$out/out.db" "SELECT count(*) FROM t")
        echo "$tool $(cpu_rss "$out/time-$tool.txt") rows=$got expected=$rows" | tee -a "$out/result.txt"
    done
    # The disk's sequential write bandwidth, for scale (2 GiB, flushed to disk before dd reports).
    dd if=/dev/zero of="$out/dd.bin" bs=1M count=2048 conv=fdatasync 2>&1 | tail -1 | tee -a "$out/result.txt"
    rm -f "$out/dd.bin" "$out/out.db"*
    load | tee -a "$out/load.txt"
    ;;
*)
    sed -n '2,12p' "$0"
    exit 2
    ;;
esac
