#!/usr/bin/env bash
# all.sh: the load-sensitive figures in one go, once the machine is quiet (1-minute load average under
# $MAX_LOAD, no rustc running), waiting at most $MAX_WAIT seconds for that. `idle` and `restore-prep` are run
# separately (see docs/benchmarks.md) because they do not depend on the machine's load.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
# Checked first, so that a missing tool does not stop the run half-way (the restore figure needs it).
command -v hyperfine >/dev/null || { echo "all.sh: hyperfine is missing; install it (Debian: apt-get install hyperfine)" >&2; exit 2; }
MAX_LOAD=${MAX_LOAD:-0.7}
MAX_WAIT=${MAX_WAIT:-600}
waited=0
while :; do
    load=$(cut -d' ' -f1 /proc/loadavg)
    if awk -v l="$load" -v m="$MAX_LOAD" 'BEGIN{exit !(l < m)}' && ! pgrep -x rustc >/dev/null; then break; fi
    [ "$waited" -ge "$MAX_WAIT" ] && { echo "machine not quiet after ${MAX_WAIT}s (load $load); running anyway"; break; }
    sleep 10; waited=$((waited + 10))
done
echo "start $(date +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
"$HERE/run.sh" throughput 30
"$HERE/run.sh" lag 60
"$HERE/run.sh" restore 3
"$HERE/run.sh" resources 1 120 1
"$HERE/run.sh" resources 100 120 1
echo "end $(date +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
