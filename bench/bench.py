#!/usr/bin/env python3
"""bench.py: the writer, the replication-lag watcher and the lag calculation for the hearth vs Litestream benchmarks.

Subcommands (see bench/README-style usage in docs/benchmarks.md):

  write   --db PATH [--rate TX_PER_S] --seconds S [--commits FILE] [--init]
          One INSERT of a ~100-byte row per transaction, WAL mode, synchronous=NORMAL. With --rate 0 it writes
          as fast as it can; otherwise it paces commits against a fixed schedule (so short stalls are caught up
          instead of lowering the average rate). Prints a JSON summary; --commits stores each commit's wall time.
  watch   --bucket B --prefix P --seconds S --out FILE
          Polls the level-0 listing of an S3 replica every --interval seconds and records, for every new object,
          when it was first seen and the capture time from its LTX header (read with a 40-byte ranged GET).
  writemany --dir D --n N --rate-per-db R --seconds S
          Creates D/db0.db .. D/db{N-1}.db and writes R tx/s to each, round-robin (the light load of the CPU and
          memory figures).
  lag     --commits FILE --objects FILE [--skip S]
          For each commit at time t, the first level-0 object whose capture time >= t holds it; its lag is the
          time that object was first seen minus t. Prints p50/p90/p99/max.
  stalls  --commits FILE
          The writer's longest pauses between two commits (at a paced rate, a pause is the replicator or a
          checkpoint holding the writer up).
  seed    --db PATH --mb N
          Builds a database of about N MiB of random rows (for the restore benchmark).

Python is used (not Rust) because the writer only needs the sqlite3 module and the watcher boto3, both already on
the machine; the writer's own overhead is reported by the "without replicator" throughput figure.
"""

import argparse
import json
import os
import sqlite3
import struct
import sys
import time
from array import array


def open_db(path):
    con = sqlite3.connect(path, isolation_level=None, timeout=10)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=NORMAL")
    con.execute("PRAGMA busy_timeout=10000")
    con.execute("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, ts REAL, payload BLOB)")
    return con


def cmd_write(a):
    con = open_db(a.db)
    payload = os.urandom(100)
    times = array("d")
    start = time.time()
    end = start + a.seconds
    period = 1.0 / a.rate if a.rate > 0 else 0.0
    n = 0
    late = 0
    while True:
        if period:
            due = start + n * period
            now = time.time()
            if due >= end:
                break
            if due > now:
                time.sleep(due - now)
            elif now - due > 0.1:
                late += 1
        elif time.time() >= end:
            break
        con.execute("BEGIN IMMEDIATE")
        con.execute("INSERT INTO t (ts, payload) VALUES (?, ?)", (time.time(), payload))
        con.execute("COMMIT")
        times.append(time.time())
        n += 1
    elapsed = time.time() - start
    con.close()
    if a.commits:
        with open(a.commits, "wb") as f:
            times.tofile(f)
    print(json.dumps({"db": a.db, "tx": n, "seconds": round(elapsed, 3), "tx_per_s": round(n / elapsed, 1),
                      "target_rate": a.rate, "commits_over_100ms_late": late}))


def cmd_writemany(a):
    cons = [open_db(os.path.join(a.dir, f"db{i}.db")) for i in range(a.n)]
    payload = os.urandom(100)
    start = time.time()
    total_rate = a.rate_per_db * a.n
    n = 0
    while total_rate > 0:
        due = start + n / total_rate
        if due >= start + a.seconds:
            break
        now = time.time()
        if due > now:
            time.sleep(due - now)
        con = cons[n % a.n]
        con.execute("BEGIN IMMEDIATE")
        con.execute("INSERT INTO t (ts, payload) VALUES (?, ?)", (time.time(), payload))
        con.execute("COMMIT")
        n += 1
    elapsed = time.time() - start
    for con in cons:
        con.close()
    print(json.dumps({"dbs": a.n, "tx": n, "seconds": round(elapsed, 3), "rate_per_db": a.rate_per_db}))


def s3_client():
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=os.environ["BENCH_ENDPOINT"], region_name="garage",
                        config=Config(retries={"max_attempts": 1}, s3={"addressing_style": "path"}))


def cmd_watch(a):
    s3 = s3_client()
    l0 = a.prefix.rstrip("/") + "/0000/"
    seen = {}
    rows = []
    last_key = ""
    end = time.time() + a.seconds
    polls = 0
    while time.time() < end:
        t_poll = time.time()
        kwargs = {"Bucket": a.bucket, "Prefix": l0}
        if last_key:
            kwargs["StartAfter"] = last_key
        resp = s3.list_objects_v2(**kwargs)
        t_seen = time.time()
        polls += 1
        for obj in resp.get("Contents", []):
            key = obj["Key"]
            if key in seen or not key.endswith(".ltx"):
                continue
            seen[key] = t_seen
            head = s3.get_object(Bucket=a.bucket, Key=key, Range="bytes=0-39")["Body"].read()
            (ts_ms,) = struct.unpack(">q", head[32:40])
            rows.append({"key": key, "seen": t_seen, "poll_start": t_poll, "capture_ms": ts_ms})
            last_key = max(last_key, key)
        left = a.interval - (time.time() - t_poll)
        if left > 0:
            time.sleep(left)
    with open(a.out, "w") as f:
        json.dump({"polls": polls, "objects": rows}, f)
    print(json.dumps({"polls": polls, "objects": len(rows)}))


def percentile(sorted_values, p):
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, int(round(p / 100.0 * len(sorted_values) + 0.5)) - 1))
    return sorted_values[k]


def cmd_lag(a):
    commits = array("d")
    with open(a.commits, "rb") as f:
        commits.frombytes(f.read())
    with open(a.objects) as f:
        objs = json.load(f)["objects"]
    # Sorted by capture time; an object's capture time says which commits it holds.
    objs.sort(key=lambda o: o["capture_ms"])
    caps = [o["capture_ms"] / 1000.0 for o in objs]
    if not commits:
        sys.exit("no commits")
    t0 = commits[0] + a.skip
    lags = []
    missing = 0
    j = 0
    for t in commits:
        if t < t0:
            continue
        # Capture times are whole milliseconds: a commit in the same millisecond as a capture is counted in
        # the next object, so the lag is never under-estimated.
        while j < len(caps) and caps[j] <= t:
            j += 1
        if j == len(caps):
            missing += 1
            continue
        # Level-0 files are deltas: only this one object holds commit t (until a compaction much later).
        lags.append(objs[j]["seen"] - t)
    lags.sort()
    out = {"commits": len(lags), "not_yet_replicated": missing, "objects": len(objs)}
    for p in (50, 90, 99, 100):
        out[f"p{p}_ms"] = round(percentile(lags, p) * 1000, 1)
    out["mean_ms"] = round(sum(lags) / len(lags) * 1000, 1) if lags else None
    print(json.dumps(out))


def cmd_stalls(a):
    commits = array("d")
    with open(a.commits, "rb") as f:
        commits.frombytes(f.read())
    gaps = sorted(commits[i + 1] - commits[i] for i in range(len(commits) - 1))
    out = {"commits": len(commits), "max_gap_ms": round(gaps[-1] * 1000, 1),
           "p99_9_gap_ms": round(percentile(gaps, 99.9) * 1000, 1),
           "gaps_over_50ms": sum(1 for g in gaps if g > 0.05), "gaps_over_100ms": sum(1 for g in gaps if g > 0.1)}
    print(json.dumps(out))


def cmd_seed(a):
    con = open_db(a.db)
    row = 4000
    per_tx = 256
    target = a.mb * 1024 * 1024
    n = 0
    while True:
        con.execute("BEGIN")
        for _ in range(per_tx):
            con.execute("INSERT INTO t (ts, payload) VALUES (?, ?)", (time.time(), os.urandom(row)))
        con.execute("COMMIT")
        n += per_tx
        if n % (per_tx * 64) == 0:
            con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            if os.path.getsize(a.db) >= target:
                break
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    print(json.dumps({"db": a.db, "rows": n, "bytes": os.path.getsize(a.db)}))


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write")
    w.add_argument("--db", required=True)
    w.add_argument("--rate", type=float, default=0)
    w.add_argument("--seconds", type=float, required=True)
    w.add_argument("--commits")
    w.set_defaults(f=cmd_write)
    wm = sub.add_parser("writemany")
    wm.add_argument("--dir", required=True)
    wm.add_argument("--n", type=int, required=True)
    wm.add_argument("--rate-per-db", type=float, required=True)
    wm.add_argument("--seconds", type=float, required=True)
    wm.set_defaults(f=cmd_writemany)
    wa = sub.add_parser("watch")
    wa.add_argument("--bucket", required=True)
    wa.add_argument("--prefix", required=True)
    wa.add_argument("--seconds", type=float, required=True)
    wa.add_argument("--interval", type=float, default=0.015)
    wa.add_argument("--out", required=True)
    wa.set_defaults(f=cmd_watch)
    la = sub.add_parser("lag")
    la.add_argument("--commits", required=True)
    la.add_argument("--objects", required=True)
    la.add_argument("--skip", type=float, default=5.0, help="ignore the first S seconds (start-up snapshot)")
    la.set_defaults(f=cmd_lag)
    st = sub.add_parser("stalls")
    st.add_argument("--commits", required=True)
    st.set_defaults(f=cmd_stalls)
    s = sub.add_parser("seed")
    s.add_argument("--db", required=True)
    s.add_argument("--mb", type=int, required=True)
    s.set_defaults(f=cmd_seed)
    a = p.parse_args()
    a.f(a)


if __name__ == "__main__":
    main()
