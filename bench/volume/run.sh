#!/usr/bin/env bash
# Side-by-side benchmark of `hearth volume` (issue 3) against the tools a user would pick instead, on the same
# tree over the same network link: two network namespaces (primary and standby) joined by one veth pair, the
# same layout as hearth_testkit::netns but without the bridge. Prints a Markdown table of wall times to
# stdout, with the exact commands; progress and tool output go to stderr and to $WORK/log.
#
#   bench/volume/run.sh [--files N] [--bytes SIZE] [--seed S] [--runs R] [--rounds K] [--first-rounds F]
#                       [--rate MBIT] [--only files|btrfs] [--work DIR] [--keep] [--no-drop-caches]
#
# Defaults: 100,000 files, 5G (issue 3's tree), 5 hyperfine runs, 3 rounds of 1 % changes and 3 rounds of
# first syncs (files section), unshaped link, both sections, WORK=/var/tmp/hearth-volume-bench. A quick
# run: --files 5000 --bytes 200M --runs 3 --rounds 1 --first-rounds 1.
#
# Passes, each for every tool: "first" (empty standby; in the files section F rounds, each from empty
# copies with the tools in an order that rotates from round to round, reported as mean ± sd), "1% changed" (after gen-tree.py mutate; in the
# files section K rounds, each a new mutation synced by every tool once, reported as mean ± sd) and
# "no change" (nothing changed since the last pass; repeated with hyperfine). tar | tar only has a first
# pass (it is the floor for a first copy). Every timed command ends with `sync -f` on the standby's
# filesystem, because hearth makes what it applied durable and the others would otherwise be timed
# before their writes reach the disk. Caches are dropped (`sync; echo 3 > /proc/sys/vm/drop_caches`)
# before every timed run, so every pass reads from disk, as a sync every few minutes on a busy server
# would; --no-drop-caches turns that off. Dropping caches slows everything else on the machine for a moment.
#
# Sections:
#   files: source and standby folders under $WORK on the machine's own filesystem. Tools: tar | socat |
#          tar (first pass), rsync -a --delete to an rsync daemon, rsync -a --delete over ssh (needs sshd),
#          hearth volume push (files backend).
#   btrfs: one loop-device btrfs per side. Tools: btrfs subvolume snapshot -r + btrfs send [-p] | socat |
#          btrfs receive, btrbk over ssh (needs sshd), hearth volume push on the subvolume.
#
# hearth runs only with HEARTH_VOLUME_READY=1 (binary: $HEARTH, default target/release/hearth); otherwise
# its rows say "not yet available". See run_hearth_files / run_hearth_btrfs below.
#
# Needs root, iproute2, socat, rsync, hyperfine, /usr/bin/time (package time), python3, btrfs-progs and
# btrbk; openssh-server and openssh-client for the ssh rows (without sshd they are left out and say so).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)

FILES=100000
BYTES=5G
SEED=1
RUNS=5
ROUNDS=3
FIRST_ROUNDS=3
RATE_MBIT=0
ONLY=all
WORK=/var/tmp/hearth-volume-bench
KEEP=0
DROP=1
while (($#)); do
    case "$1" in
        --files) FILES=$2; shift 2 ;;
        --bytes) BYTES=$2; shift 2 ;;
        --seed) SEED=$2; shift 2 ;;
        --runs) RUNS=$2; shift 2 ;;
        --rounds) ROUNDS=$2; shift 2 ;;
        --first-rounds) FIRST_ROUNDS=$2; shift 2 ;;
        --rate) RATE_MBIT=$2; shift 2 ;;
        --only) ONLY=$2; shift 2 ;;
        --work) WORK=$2; shift 2 ;;
        --keep) KEEP=1; shift ;;
        --no-drop-caches) DROP=0; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "run.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
case "$ONLY" in all|files|btrfs) ;; *) echo "run.sh: --only takes files or btrfs" >&2; exit 2 ;; esac
HEARTH=${HEARTH:-$repo/target/release/hearth}
export HEARTH HEARTH_VOLUME_READY="${HEARTH_VOLUME_READY:-0}"

if [[ $(id -u) != 0 ]]; then
    echo "run.sh: network namespaces, loop devices and dropping caches need root: run it as root" >&2
    exit 2
fi
missing=()
for tool in ip tc socat rsync hyperfine /usr/bin/time python3 btrfs mkfs.btrfs losetup btrbk; do
    command -v "$tool" >/dev/null || missing+=("$tool")
done
if ((${#missing[@]})); then
    echo "run.sh: missing ${missing[*]} (Debian: apt-get install iproute2 socat rsync hyperfine time python3 btrfs-progs btrbk)" >&2
    exit 2
fi
HAVE_SSH=0
if [[ -x /usr/sbin/sshd ]] && command -v ssh >/dev/null && command -v ssh-keygen >/dev/null; then
    HAVE_SSH=1
fi

size_bytes() { python3 -B -c 'import sys; sys.path.insert(0, sys.argv[2]); g = __import__("gen-tree"); print(g.parse_size(sys.argv[1]))' "$1" "$here"; }
TREE_BYTES=$(size_bytes "$BYTES")

# Room: the files section holds at most the source and five copies (tar's, two rsync copies, hearth's two;
# the chunk store is empty between syncs); the btrfs section's images grow to the primary's volume plus three
# copies on the standby. Refuse up front rather than fill a shared disk.
mkdir -p "$WORK"
need=0
[[ $ONLY != btrfs ]] && need=$((TREE_BYTES * 6))
[[ $ONLY != files ]] && need=$((need > TREE_BYTES * 5 ? need : TREE_BYTES * 5))
avail=$(($(df --output=avail -B1 "$WORK" | tail -1)))
if ((avail < need + (1 << 30))); then
    echo "run.sh: $WORK has $((avail >> 20)) MiB free; this scale needs about $(((need >> 20) + 1024)) MiB (use --only, a smaller --bytes or another --work)" >&2
    exit 2
fi
if [[ -n "$(ls -A "$WORK")" ]]; then
    echo "run.sh: $WORK is not empty (left by a --keep run?); remove it or give another --work" >&2
    exit 2
fi
LOG=$WORK/log
: >"$LOG"
say() { echo "run.sh: $*" >&2; echo "== $*" >>"$LOG"; }

# ---------------------------------------------------------------------------------------------------
# Two hosts. Names follow hearth_testkit::netns (hearth-<pid>-<hex>-...), so if this script is killed,
# the next test run's cleanup_stale removes them.
tag=$(od -An -N4 -tx4 /dev/urandom | tr -d ' ')
NS_P="hearth-$$-$tag-bench-p"
NS_S="hearth-$$-$tag-bench-s"
octet=$((RANDOM % 256))
A_P="10.$octet.0.1"
A_S="10.$octet.0.2"
BG_PIDS=()
MOUNTS=()
LOOPS=()

cleanup() {
    set +e
    local pid ns m l
    for pid in "${BG_PIDS[@]}"; do kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; done
    # Anything else still running in our namespaces was started by this script (a receiver left by a
    # failed pass); the namespaces cannot go away while it runs.
    for ns in "$NS_S" "$NS_P"; do
        if [[ -e /run/netns/$ns ]]; then
            ip netns pids "$ns" 2>/dev/null | xargs -r kill -KILL 2>/dev/null
            ip netns del "$ns"
        fi
    done
    for m in "${MOUNTS[@]}"; do umount "$m" 2>/dev/null || umount -l "$m"; done
    for l in "${LOOPS[@]}"; do losetup -d "$l" 2>/dev/null; done
    if ((KEEP)); then
        echo "run.sh: kept $WORK (log: $LOG)" >&2
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

ip netns add "$NS_P"
ip netns add "$NS_S"
ip -n "$NS_P" link add eth0 type veth peer name eth0 netns "$NS_S"
ip -n "$NS_P" addr add "$A_P/24" dev eth0
ip -n "$NS_S" addr add "$A_S/24" dev eth0
for ns in "$NS_P" "$NS_S"; do
    ip -n "$ns" link set lo up
    ip -n "$ns" link set eth0 up
    if ((RATE_MBIT > 0)); then
        burst=$((RATE_MBIT * 1000000 / 8 / 100 > 65536 ? RATE_MBIT * 1000000 / 8 / 100 : 65536))
        tc -n "$ns" qdisc replace dev eth0 root tbf rate "${RATE_MBIT}mbit" burst "$burst" latency 100ms
    fi
done
ip netns exec "$NS_P" bash -c "exec 3<>/dev/tcp/$A_S/9 " 2>/dev/null || true  # warms ARP; nothing listens
say "hosts: primary $NS_P ($A_P), standby $NS_S ($A_S), link ${RATE_MBIT:-0} Mbit/s (0 = veth speed)"

# ---------------------------------------------------------------------------------------------------
# Measuring. Every measured command is a bash snippet; its exact text goes into the command list.
ROWS=()
CMDS=()
FAILED=0
DROP_CMD="sync; echo 3 > /proc/sys/vm/drop_caches"
drop_caches() { if ((DROP)); then sync; echo 3 >/proc/sys/vm/drop_caches; fi; }

# Records one row. $1 tool, $2 pass, $3 time text, $4 command.
row() {
    CMDS+=("$4")
    ROWS+=("| $1 | $2 | $3 | [${#CMDS[@]}] |")
}

# One run under /usr/bin/time, caches dropped first; appends "WALL USER SYS" to the file $4 ("na" when
# hearth is not available, "fail" when the command failed): $1 tool, $2 pass, $3 snippet.
time_into() {
    local tf rc
    tf=$(mktemp)
    drop_caches
    say "$1, $2"
    set +e
    /usr/bin/time -f '%e %U %S' -o "$tf" bash -c "$3" >>"$LOG" 2>&1
    rc=$?
    set -e
    if ((rc == 3)) && tail -n 3 "$LOG" | grep -q "not yet available"; then
        echo na >>"$4"
    elif ((rc != 0)); then
        FAILED=1
        echo fail >>"$4"
        tail -n 20 "$LOG" >&2
    else
        tail -n 1 "$tf" >>"$4"
    fi
    rm -f "$tf"
}

# One row from the runs in the file $3 (see time_into): $1 tool, $2 pass, $4 command. One run gives its
# wall time and client CPU, several (rounds) their mean ± sd.
row_from() {
    row "$1" "$2" "$(python3 -c '
import statistics, sys
t = [l.split() for l in open(sys.argv[1]) if l.strip()]
if ["fail"] in t:
    print("**failed** (see log)")
elif ["na"] in t:
    print("not yet available")
elif len(t) == 1:
    wall, user, sys_ = map(float, t[0])
    print(f"{wall} s (1 run; client CPU {round(user + sys_, 2)} s)")
else:
    w = [float(x[0]) for x in t]
    print(f"{statistics.mean(w):.3f} s ± {statistics.stdev(w):.3f} ({min(w):.3f} … {max(w):.3f}, {len(w)} rounds)")
' "$3")" "$4"
}

# One run: $1 tool, $2 pass, $3 snippet.
measure_once() {
    local f
    f=$(mktemp)
    time_into "$1" "$2" "$3" "$f"
    row_from "$1" "$2" "$f" "$3"
    rm -f "$f"
}

# Repeated runs under hyperfine: $1 tool, $2 pass, $3 snippet, $4 extra preparation (optional).
measure_repeat() {
    local json prep rc
    json=$(mktemp)
    prep="${4:-true}"
    ((DROP)) && prep="$prep; $DROP_CMD"
    say "$1, $2 (hyperfine, $RUNS runs)"
    set +e
    hyperfine --shell bash --runs "$RUNS" --prepare "$prep" --export-json "$json" --show-output "$3" >>"$LOG" 2>&1
    rc=$?
    set -e
    if ((rc != 0)) && tail -n 5 "$LOG" | grep -q "not yet available"; then
        row "$1" "$2" "not yet available" "$3"
    elif ((rc != 0)); then
        FAILED=1
        row "$1" "$2" "**failed** (exit $rc, see log)" "$3"
        tail -n 20 "$LOG" >&2
    else
        row "$1" "$2" "$(python3 -c '
import json, sys
r = json.load(open(sys.argv[1]))["results"][0]
mean, sd, lo, hi, n = r["mean"], r["stddev"] or 0, r["min"], r["max"], len(r["times"])
print(f"{mean:.3f} s ± {sd:.3f} ({lo:.3f} … {hi:.3f}, {n} runs)")
' "$json")" "$3"
    fi
    rm -f "$json"
}

# A snippet that pipes a sender on the primary into a receiver on the standby over TCP with socat:
# $1 port, $2 receiver's command (stdin = the stream), $3 sender's command (stdout = the stream),
# $4 the standby filesystem to sync at the end. Neither command may contain a single quote.
pipe_cmd() {
    printf '%s' "ip netns exec $NS_S sh -c 'socat -u -b 262144 TCP-LISTEN:$1,bind=$A_S,reuseaddr STDOUT | $2' & r=\$!; " \
        "if ! ip netns exec $NS_P sh -c '$3 | socat -u -b 262144 STDIN TCP:$A_S:$1,retry=500,interval=0.01'; then kill \$r; exit 1; fi; " \
        "wait \$r && sync -f $4"
}

# ---------------------------------------------------------------------------------------------------
# ssh: an sshd on the standby (its own host key and authorized key, nothing of the machine's), and an
# ssh wrapper that points ssh at a config of its own, because btrbk has no option for ssh settings.
setup_ssh() {
    local d=$WORK/ssh
    mkdir -p "$d" "$WORK/bin" /run/sshd
    ssh-keygen -q -t ed25519 -N '' -f "$d/id"
    ssh-keygen -q -t ed25519 -N '' -f "$d/host"
    cp "$d/id.pub" "$d/authorized_keys"
    cat >"$d/sshd_config" <<EOF
ListenAddress $A_S
Port 22
HostKey $d/host
AuthorizedKeysFile $d/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PidFile $d/sshd.pid
EOF
    cat >"$d/config" <<EOF
Host *
    User root
    IdentityFile $d/id
    IdentitiesOnly yes
    StrictHostKeyChecking no
    UserKnownHostsFile /dev/null
    LogLevel ERROR
EOF
    printf '#!/bin/sh\nexec /usr/bin/ssh -F %s "$@"\n' "$d/config" >"$WORK/bin/ssh"
    chmod +x "$WORK/bin/ssh"
}
# `ip netns exec` gives the program a mount namespace of its own, and on a machine whose / is a private mount
# (this one) mounts made later are not seen in it, so sshd is started anew in each section, after its mounts.
SSHD_PID=
start_sshd() {
    ((HAVE_SSH)) || return 0
    stop_sshd
    ip netns exec "$NS_S" /usr/sbin/sshd -D -e -f "$WORK/ssh/sshd_config" 2>>"$LOG" &
    SSHD_PID=$!
    BG_PIDS+=("$SSHD_PID")
    local i
    for i in $(seq 100); do
        ip netns exec "$NS_P" "$WORK/bin/ssh" "$A_S" true 2>/dev/null && return 0
        sleep 0.1
    done
    echo "run.sh: sshd on the standby did not answer" >&2
    return 1
}
stop_sshd() {
    [[ -n "$SSHD_PID" ]] || return 0
    kill "$SSHD_PID" 2>/dev/null || true
    wait "$SSHD_PID" 2>/dev/null || true
    SSHD_PID=
}

# ---------------------------------------------------------------------------------------------------
# hearth. The functions below are what the benchmark times for hearth; they run in a child bash (exported)
# with $1 = the pass (first, changed, unchanged). Until `hearth volume push` works end to end they stop
# with "hearth volume push not yet available" unless HEARTH_VOLUME_READY=1.
HEARTH_PORT=7431
setup_hearth() {  # $1 volume name, $2 standby path: keys, then `hearth volume serve` on the standby.
    [[ $HEARTH_VOLUME_READY == 1 ]] || return 0
    local h=$WORK/hearth-$1
    mkdir -p "$h"
    "$HEARTH" volume keygen --identity "$h/p-id" >/dev/null
    "$HEARTH" volume keygen --identity "$h/s-id" >/dev/null
    HEARTH_P_ID=$("$HEARTH" volume keygen --identity "$h/p-id" --print | tail -n 1)
    HEARTH_S_ID=$("$HEARTH" volume keygen --identity "$h/s-id" --print | tail -n 1)
    HEARTH_DIR=$h
    export HEARTH_P_ID HEARTH_S_ID HEARTH_DIR
    mkdir -p "$(dirname "$2")"
    # Through a small bash that says in the log how and when serve ended, should it end before we stop it.
    bash -c 'ip netns exec "$@"; echo "run.sh: hearth volume serve exited with status $? at $(date +%T.%N)"' \
        serve "$NS_S" "$HEARTH" volume serve --identity "$h/s-id" --state "$h/s-state" \
        --listen "$A_S:$HEARTH_PORT" --allow "$HEARTH_P_ID" --volume "$1=$2" --keep 1 ${HEARTH_SERVE_ARGS:-} >>"$LOG" 2>&1 &
    HEARTH_SERVE_PID=$!
    BG_PIDS+=("$HEARTH_SERVE_PID")
    local i
    for i in $(seq 100); do
        ip netns exec "$NS_P" bash -c "exec 3<>/dev/tcp/$A_S/$HEARTH_PORT" 2>/dev/null && return 0
        sleep 0.1
    done
    echo "run.sh: hearth volume serve did not start listening" >&2
    return 1
}
stop_hearth() {
    [[ -n "${HEARTH_SERVE_PID:-}" ]] || return 0
    pkill -TERM -P "$HEARTH_SERVE_PID" 2>/dev/null || true  # serve itself: the child of our wrapper
    wait "$HEARTH_SERVE_PID" 2>/dev/null || true
    HEARTH_SERVE_PID=
}

# >>> hearth invocations >>>
hearth_push() {  # $1 NAME=PATH of the volume, $2 the standby's filesystem to flush afterwards
    if [[ "${HEARTH_VOLUME_READY:-0}" != 1 ]]; then
        echo "hearth volume push not yet available" >&2
        exit 3
    fi
    ip netns exec "$NS_P" "$HEARTH" volume push --identity "$HEARTH_DIR/p-id" --state "$HEARTH_DIR/p-state" \
        --volume "$1" --to "$A_S:$HEARTH_PORT=$HEARTH_S_ID" &&
        sync -f "$2"
}
# files backend on the machine's own filesystem.
run_hearth_files() { hearth_push "files=$FILES_SRC" "$FILES_DST_HEARTH"; }
# The same source pushed by a repeating push (`--every 1h`, so only SIGUSR1 starts a pass), which watches
# it between passes (docs/volume.md, "Watching instead of walking"), as volume files-watch into its own
# standby folder. A pass is timed from the signal until the push's own metrics count one more finished
# sync (polled every 10 ms by hearth_watch_poll), then the standby's filesystem is flushed as for the others.
# The first pass is timed from the start of the process (polled every 0.1 s), and walks.
HEARTH_WATCH_METRICS=9478
hearth_watch_count() {
    ip netns exec "$NS_P" curl -s "127.0.0.1:$HEARTH_WATCH_METRICS/metrics" 2>/dev/null |
        awk '/^hearth_volume_sync_duration_seconds_count[{]volume="files-watch"[}]/ { print $2 }'
}
# Waits until the count exceeds $1, polling every $2 seconds (default 0.01), from one bash inside the
# primary's namespace that uses only builtins (`/dev/tcp`, `read -t` on a fifo): starting `ip netns exec
# curl` for each poll took about 1.2 s of CPU from the push during a 2 s pass on two cores.
hearth_watch_poll() {
    local want='hearth_volume_sync_duration_seconds_count{volume="files-watch"} ' fifo line n i
    fifo=$(mktemp -u)
    mkfifo "$fifo"
    exec 4<>"$fifo"
    rm -f "$fifo"
    for ((i = 0; i < 300000; i++)); do
        if exec 3<>"/dev/tcp/127.0.0.1/$HEARTH_WATCH_METRICS"; then
            printf 'GET /metrics HTTP/1.0\r\nConnection: close\r\n\r\n' >&3
            n=
            while IFS= read -r line <&3; do
                [[ $line == "$want"* ]] && n=${line#"$want"}
            done
            exec 3<&-
            [[ -n $n && ${n%%.*} -gt $1 ]] && return 0
        fi 2>/dev/null
        read -r -t "${2:-0.01}" -u 4 || true
    done
    return 1
}
hearth_watch_wait() {  # $1: the count to exceed, $2: seconds between polls (default 0.01)
    ip netns exec "$NS_P" bash -c 'hearth_watch_poll "$@"' poll "$1" "${2:-0.01}" && return 0
    echo "the repeating push did not finish a pass" >&2
    return 1
}
run_hearth_watch_first() {
    if [[ "${HEARTH_VOLUME_READY:-0}" != 1 ]]; then
        echo "hearth volume push not yet available" >&2
        exit 3
    fi
    ip netns exec "$NS_P" "$HEARTH" volume push --identity "$HEARTH_DIR/p-id" --state "$HEARTH_DIR/p-state" \
        --volume "files-watch=$FILES_SRC" --to "$A_S:$HEARTH_PORT=$HEARTH_S_ID" --every 1h \
        --metrics "127.0.0.1:$HEARTH_WATCH_METRICS" >>"$HEARTH_DIR/watch.log" 2>&1 &
    echo $! >"$HEARTH_DIR/watch.pid"
    # Polled every 0.1 s: a 40 s pass needs no finer grain.
    hearth_watch_wait 0 0.1 && sync -f "$FILES_DST_WATCH"
}
run_hearth_watch_pass() {
    local before
    before=$(hearth_watch_count)
    kill -USR1 "$(cat "$HEARTH_DIR/watch.pid")"
    hearth_watch_wait "$before" && sync -f "$FILES_DST_WATCH"
}
# The subvolume: `push --backend auto` (the default) picks the btrfs backend.
run_hearth_btrfs() { hearth_push "btrfs=$MP/vol" "$MS"; }
# <<< end of hearth invocations <<<
export -f hearth_push run_hearth_files run_hearth_btrfs hearth_watch_count hearth_watch_poll hearth_watch_wait \
    run_hearth_watch_first run_hearth_watch_pass
export NS_P NS_S A_P A_S HEARTH_PORT HEARTH_WATCH_METRICS

gen() { python3 "$here/gen-tree.py" "$@" 2>>"$LOG"; tail -n 1 "$LOG" >&2; }

# Empties every copy of the files section and gives hearth new keys and states (so that its next push
# is a first sync again), then waits: after 100,000 files are deleted, ext4 is slow to allocate inodes
# for about half a minute (it passes over recently deleted ones, reading each from disk), which would be
# charged to whichever tool came first.
wipe_first_copies() {
    local F=$WORK/files
    if [[ -f "${HEARTH_DIR:-}/watch.pid" ]]; then
        kill "$(cat "$HEARTH_DIR/watch.pid")" 2>/dev/null || true
        while kill -0 "$(cat "$HEARTH_DIR/watch.pid")" 2>/dev/null; do sleep 0.1; done
    fi
    stop_hearth
    say "files: emptying the copies for another round of first syncs"
    rm -rf "$F/tar" "$F/rsyncd" "$F/rsync-ssh" "$F/hearth" "$F/hearth-watch" "$WORK/hearth-files"
    mkdir -p "$F/tar" "$F/rsyncd" "$F/rsync-ssh" "$F/hearth" "$F/hearth-watch"
    HEARTH_SERVE_ARGS="--volume files-watch=$FILES_DST_WATCH" setup_hearth files "$FILES_DST_HEARTH"
    sync
    sleep 40
}

# ---------------------------------------------------------------------------------------------------
files_section() {
    local F=$WORK/files
    FILES_SRC=$F/src
    FILES_DST_HEARTH=$F/hearth/vol
    FILES_DST_WATCH=$F/hearth-watch/vol
    export FILES_SRC FILES_DST_HEARTH FILES_DST_WATCH
    mkdir -p "$F/rsyncd" "$F/rsync-ssh" "$F/tar" "$F/hearth"
    say "files: generating $FILES files / $BYTES in $FILES_SRC"
    gen create "$FILES_SRC" --seed "$SEED" --files "$FILES" --bytes "$BYTES"

    cat >"$F/rsyncd.conf" <<EOF
address = $A_S
port = 8730
use chroot = no
munge symlinks = no
numeric ids = yes
reverse lookup = no
uid = 0
gid = 0
[dst]
path = $F/rsyncd
read only = no
EOF
    ip netns exec "$NS_S" rsync --daemon --no-detach --config="$F/rsyncd.conf" --log-file="$F/rsyncd.log" &
    BG_PIDS+=($!)
    start_sshd
    mkdir -p "$F/hearth-watch"
    HEARTH_SERVE_ARGS="--volume files-watch=$FILES_DST_WATCH" setup_hearth files "$FILES_DST_HEARTH"
    local sync_dst="sync -f $F"
    local c_tar c_rd c_rs
    c_tar=$(pipe_cmd 9100 "tar -x -C $F/tar" "tar -c -C $FILES_SRC ." "$F")
    c_rd="ip netns exec $NS_P rsync -a --delete --contimeout=10 $FILES_SRC/ rsync://$A_S:8730/dst/ && $sync_dst"
    c_rs="ip netns exec $NS_P rsync -a --delete -e $WORK/bin/ssh $FILES_SRC/ $A_S:$F/rsync-ssh/ && $sync_dst"

    # First syncs: each round starts from empty copies, and the order of the tools rotates from round
    # to round, because the disk of a shared machine drifts during a run and a fixed order charges
    # the drift to whoever comes last. The last round's copies stay for the passes below.
    local r i k t=$F/times
    mkdir -p "$t"
    local names=("tar \\| socat \\| tar" "rsync daemon") cmds=("$c_tar" "$c_rd") keys=(tar rd)
    if ((HAVE_SSH)); then names+=("rsync over ssh"); cmds+=("$c_rs"); keys+=(rs); fi
    names+=("hearth (files)" "hearth (files, push --every)")
    cmds+=("run_hearth_files first" "run_hearth_watch_first")
    keys+=(hf hw)
    for r in $(seq "$FIRST_ROUNDS"); do
        ((r == 1)) || wipe_first_copies
        for i in "${!keys[@]}"; do
            k=$(((i + r - 1) % ${#keys[@]}))
            time_into "${names[$k]}" "first, round $r" "${cmds[$k]}" "$t/first-${keys[$k]}"
        done
    done
    rm -rf "$F/tar"
    for k in "${!keys[@]}"; do
        row_from "${names[$k]}" first "$t/first-${keys[$k]}" "${cmds[$k]}"
    done

    # Each round changes 1 % of the files anew, and every tool syncs it once.
    for r in $(seq "$ROUNDS"); do
        say "files: mutating 1% of the files (round $r of $ROUNDS)"
        gen mutate "$FILES_SRC" --seed "$SEED" --round "$r"
        time_into "rsync daemon" "1% changed, round $r" "$c_rd" "$t/rd"
        ((HAVE_SSH)) && time_into "rsync over ssh" "1% changed, round $r" "$c_rs" "$t/rs"
        time_into "hearth (files)" "1% changed, round $r" "run_hearth_files changed" "$t/hf"
        time_into "hearth (files, push --every)" "1% changed, round $r" "run_hearth_watch_pass" "$t/hw"
    done
    row_from "rsync daemon" "1% changed" "$t/rd" "$c_rd"
    ((HAVE_SSH)) && row_from "rsync over ssh" "1% changed" "$t/rs" "$c_rs"
    row_from "hearth (files)" "1% changed" "$t/hf" "run_hearth_files changed"
    row_from "hearth (files, push --every)" "1% changed" "$t/hw" "run_hearth_watch_pass"

    measure_repeat "rsync daemon" "no change" "$c_rd"
    ((HAVE_SSH)) && measure_repeat "rsync over ssh" "no change" "$c_rs"
    measure_repeat "hearth (files)" "no change" "run_hearth_files unchanged"
    measure_repeat "hearth (files, push --every)" "no change" "run_hearth_watch_pass"
    if [[ -f "${HEARTH_DIR:-}/watch.pid" ]]; then
        # The long-running push's memory after all its passes (`ip netns exec` execs hearth: same pid).
        WATCH_MEMORY=$(awk '/^VmRSS|^VmHWM/ { printf "%s %d MB  ", $1, $2 / 1024 }' "/proc/$(cat "$HEARTH_DIR/watch.pid")/status" 2>/dev/null || true)
        kill "$(cat "$HEARTH_DIR/watch.pid")" 2>/dev/null || true
    fi
    ((HAVE_SSH)) || row "rsync over ssh" all "left out: no sshd" "-"

    # The copies must equal the source, or the times mean nothing: a dry run that would change nothing.
    local dst
    for dst in "$F/rsyncd" "$F/rsync-ssh" $([[ $HEARTH_VOLUME_READY == 1 ]] && echo "$FILES_DST_HEARTH $FILES_DST_WATCH"); do
        [[ -n "$dst" && -d "$dst" ]] || continue
        ((HAVE_SSH)) || [[ $dst != "$F/rsync-ssh" ]] || continue
        if [[ -n "$(rsync -a --delete --dry-run --itemize-changes "$FILES_SRC/" "$dst/" | grep -v '^\.d..t' || true)" ]]; then
            say "files: $dst differs from the source"
            FAILED=1
        else
            say "files: $dst equals the source (rsync --dry-run: nothing to do)"
        fi
    done
    stop_hearth
    stop_sshd
    rm -rf "$F"
}

# ---------------------------------------------------------------------------------------------------
make_btrfs() {  # $1 image, $2 size in bytes, $3 mount point
    truncate -s "$2" "$1"
    mkfs.btrfs -q -f "$1" >>"$LOG"
    local loop
    loop=$(losetup -f --show "$1")
    LOOPS+=("$loop")
    mkdir -p "$3"
    mount "$loop" "$3"
    MOUNTS+=("$3")
}

btrfs_section() {
    local B=$WORK/btrfs
    mkdir -p "$B"
    MP=$B/primary
    MS=$B/standby
    export MP MS
    local img=$((TREE_BYTES * 2 + (1 << 30)))
    make_btrfs "$B/primary.img" "$img" "$MP"
    make_btrfs "$B/standby.img" $((TREE_BYTES * 4 + (1 << 30))) "$MS"
    btrfs -q subvolume create "$MP/vol"
    mkdir -p "$MP/.raw" "$MP/.btrbk" "$MS/raw" "$MS/btrbk" "$MS/hearth"
    say "btrfs: generating $FILES files / $BYTES in $MP/vol"
    gen create "$MP/vol" --seed "$SEED" --files "$FILES" --bytes "$BYTES"
    start_sshd
    setup_hearth btrfs "$MS/hearth/vol"

    cat >"$B/btrbk.conf" <<EOF
timestamp_format        long-iso
snapshot_preserve_min   all
target_preserve_min     all
ssh_identity            $WORK/ssh/id
ssh_user                root
lockfile                $B/btrbk.lock
volume $MP
  snapshot_dir .btrbk
  subvolume vol
    target send-receive ssh://$A_S$MS/btrbk
EOF
    local c_btrbk="PATH=$WORK/bin:\$PATH ip netns exec $NS_P btrbk -q -c $B/btrbk.conf run && sync -f $MS"
    raw() {  # $1 snapshot, $2 parent or empty
        local parent=""
        [[ -n "$2" ]] && parent="-p $MP/.raw/$2 "
        pipe_cmd 9101 "btrfs receive -q $MS/raw" \
            "btrfs subvolume snapshot -r $MP/vol $MP/.raw/$1 >/dev/null && btrfs send -q $parent$MP/.raw/$1" "$MS"
    }

    measure_once "btrfs send \\| receive" first "$(raw s1 "")"
    ((HAVE_SSH)) && measure_once "btrbk (ssh)" first "$c_btrbk"
    measure_once "hearth (on btrfs)" first "run_hearth_btrfs first"

    say "btrfs: mutating 1% of the files"
    gen mutate "$MP/vol" --seed "$SEED" --round 1
    measure_once "btrfs send \\| receive" "1% changed" "$(raw s2 s1)"
    ((HAVE_SSH)) && measure_once "btrbk (ssh)" "1% changed" "$c_btrbk"
    measure_once "hearth (on btrfs)" "1% changed" "run_hearth_btrfs changed"

    # Each repeat makes snapshot s3 anew, so the one left by the previous repeat goes first, on both sides.
    measure_repeat "btrfs send \\| receive" "no change" "$(raw s3 s2)" \
        "btrfs -q subvolume delete $MP/.raw/s3 $MS/raw/s3 >/dev/null 2>&1 || true"
    # btrbk makes a new timestamped snapshot on every run and sends it incrementally from the previous one.
    ((HAVE_SSH)) && measure_repeat "btrbk (ssh)" "no change" "$c_btrbk"
    measure_repeat "hearth (on btrfs)" "no change" "run_hearth_btrfs unchanged"
    ((HAVE_SSH)) || row "btrbk" all "left out: no sshd (btrbk needs ssh for a remote target)" "-"

    local got
    got=$(rsync -a --dry-run --itemize-changes --delete "$MP/.raw/s3/" "$MS/raw/s3/" | grep -v '^\.d..t' || true)
    if [[ -n "$got" ]]; then say "btrfs: the received s3 differs from the sent one"; FAILED=1; fi
    stop_hearth
}

# ---------------------------------------------------------------------------------------------------
((HAVE_SSH)) && setup_ssh
start=$(date +%s)
[[ $ONLY != btrfs ]] && files_section
[[ $ONLY != files ]] && btrfs_section

cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')
echo "### hearth volume vs rsync, tar, btrfs send and btrbk ($FILES files, $BYTES, seed $SEED)"
echo
echo "$(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores ($cpu), load before/after: see below; link: veth between"
echo "two network namespaces$( ((RATE_MBIT > 0)) && echo ", shaped to $RATE_MBIT Mbit/s with tbf"). Caches dropped before every run: $( ((DROP)) && echo yes || echo no)."
echo "Every command ends with \`sync -f\` on the standby's filesystem. \"client CPU\" counts only the processes"
echo "the command itself started (not the rsync daemon, sshd or \`hearth volume serve\` on the standby)."
echo
echo '```sh'
echo "bench/volume/run.sh --files $FILES --bytes $BYTES --seed $SEED --runs $RUNS --rounds $ROUNDS --first-rounds $FIRST_ROUNDS --rate $RATE_MBIT --only $ONLY$( ((DROP)) || echo " --no-drop-caches")"
echo '```'
echo
echo "| Tool | Pass | Wall time | Command |"
echo "|---|---|---:|---|"
printf '%s\n' "${ROWS[@]}"
echo
echo "Commands (primary namespace $NS_P at $A_P, standby $NS_S at $A_S):"
echo
for i in "${!CMDS[@]}"; do
    printf '%s. `%s`\n' "$((i + 1))" "${CMDS[$i]}"
done
echo
echo "hearth's functions as run (\`bash -c 'run_hearth_… PASS'\`):"
echo
echo '```sh'
declare -f hearth_push run_hearth_files run_hearth_btrfs hearth_watch_count hearth_watch_poll hearth_watch_wait run_hearth_watch_first run_hearth_watch_pass
echo '```'
echo
[[ -n "${WATCH_MEMORY:-}" ]] && echo "Memory of the long-running push (push --every) after its last pass: $WATCH_MEMORY(/proc/PID/status)." && echo
echo "Load average at the end: $(cut -d' ' -f1-3 /proc/loadavg); total time $(($(date +%s) - start)) s."
exit "$FAILED"
