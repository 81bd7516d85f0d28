#!/usr/bin/env python3
"""Deterministic test trees for the `hearth volume` benchmark (bench/volume/run.sh).

    gen-tree.py create DIR [--seed 1] [--files 100000] [--bytes 5G]
    gen-tree.py mutate DIR [--seed 1] [--round 1] [--fraction 0.01]

`create` writes a tree shaped like a services data directory: many small config-like text files, some
MB-sized binary files, a few large ones (most of the bytes), nested folders, some empty files and relative
symlinks. The same seed and parameters always give the same tree (names, contents, modes and mtimes).

`mutate` changes about `--fraction` of the regular files, chosen from the sorted list of paths, so the same
seed, round and starting tree always give the same result: rewrites part of a file in place (same size),
appends, deletes some files and adds a few new ones. Run it with the same arguments on two copies of a tree
and they stay identical. Contents are pseudo-random bytes (incompressible, no duplicates between files),
except the small text files, which compress like real configuration does.
"""

import argparse
import os
import random
import sys

BLOCK = 1 << 20
BASE_MTIME = 1_767_225_600  # 2026-01-01, so trees made on different days are identical.
WORDS = (
    "server listen port host path data cache log level timeout retry user group enabled "
    "database url token replicas backup volume image tag env memory cpu driver mount"
).split()


def parse_size(text):
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = text[-1] if text and text[-1] in units else ""
    return int(float(text[: len(text) - len(unit)]) * units[unit])


def text_content(rng, size):
    """Config-like text of exactly `size` bytes."""
    lines = []
    total = 0
    while total < size:
        line = f"{rng.choice(WORDS)}_{rng.randrange(1000)} = {rng.choice(WORDS)}-{rng.randrange(10**6)}\n"
        lines.append(line)
        total += len(line)
    return "".join(lines).encode()[:size]


def write_random(f, rng, size):
    left = size
    while left > 0:
        n = min(BLOCK, left)
        f.write(rng.randbytes(n))
        left -= n


def plan_sizes(rng, files, total):
    """Sizes for `files` regular files adding up to about `total` bytes: ~97% small text (0-16 KiB),
    ~3% medium binary (log-uniform over 64 KiB-8 MiB, scaled so they hold 60% of the remaining bytes,
    i.e. around a MB each at the default scale) and one large file per 10,000 sharing the rest."""
    n_large = max(1, files // 10000)
    n_medium = max(1, files * 3 // 100)
    n_small = max(0, files - n_large - n_medium)
    small = []
    for _ in range(n_small):
        # Mostly a few hundred bytes to a few KiB, like configuration; one in 50 is empty.
        small.append(0 if rng.random() < 0.02 else int(min(16384, rng.lognormvariate(7.3, 1.0))))
    rest = max(0, total - sum(small))
    medium = [2 ** rng.uniform(16, 23) for _ in range(n_medium)]
    scale = rest * 0.6 / sum(medium)
    medium = [max(4096, int(m * scale)) for m in medium]
    weights = [rng.uniform(0.5, 1.5) for _ in range(n_large)]
    large_bytes = max(0, rest - sum(medium))
    large = [int(large_bytes * w / sum(weights)) for w in weights]
    kinds = [("small", s) for s in small] + [("medium", s) for s in medium] + [("large", s) for s in large]
    rng.shuffle(kinds)
    return kinds


def make_dirs(rng, root, count):
    """`count` nested folders: each new folder goes under a random earlier one, so depth varies (mostly
    2-6 levels) like services/<name>/config/... trees."""
    dirs = [""]
    for i in range(count):
        parent = rng.choice(dirs) if len(dirs) < 8 or rng.random() < 0.9 else ""
        kind = rng.choice(["svc", "config", "data", "db", "media", "cache", "logs", "plugins", "d"])
        path = os.path.join(parent, f"{kind}{i:05d}")
        dirs.append(path)
    for d in dirs:
        os.makedirs(os.path.join(root, d), exist_ok=True)
    return dirs


def create(args):
    rng = random.Random(f"create-{args.seed}")
    root = args.dir
    if os.path.exists(root) and os.listdir(root):
        sys.exit(f"gen-tree: {root} exists and is not empty; give an empty or new folder")
    os.makedirs(root, exist_ok=True)
    total = parse_size(args.bytes)
    dirs = make_dirs(rng, root, max(1, args.files // 25))
    plan = plan_sizes(rng, args.files, total)
    paths = []
    written = 0
    for i, (kind, size) in enumerate(plan):
        d = rng.choice(dirs)
        ext = {"small": rng.choice([".conf", ".yaml", ".json", ".ini", ".txt"]), "medium": ".bin", "large": ".img"}[kind]
        rel = os.path.join(d, f"f{i:06d}{ext}")
        path = os.path.join(root, rel)
        with open(path, "wb") as f:
            if kind == "small":
                f.write(text_content(rng, size))
            else:
                write_random(f, rng, size)
        os.chmod(path, rng.choice([0o644, 0o644, 0o600, 0o640, 0o755]))
        t = BASE_MTIME + rng.randrange(30 * 86400)
        os.utime(path, (t, t))
        paths.append(rel)
        written += size
    # Relative symlinks to files elsewhere in the tree (0.5% of the files), plus a dangling one, as
    # services keep them (current -> releases/x, and links whose target is made later).
    for j in range(max(1, args.files // 200)):
        target = rng.choice(paths)
        d = rng.choice(dirs)
        link = os.path.join(root, d, f"link{j:05d}")
        os.symlink(os.path.relpath(os.path.join(root, target), os.path.join(root, d)), link)
    os.symlink("does-not-exist-yet", os.path.join(root, "dangling-link"))
    # Fixed times on folders and links too (deepest first, as setting a child's time changes nothing in
    # its parent's), so two trees made with the same seed compare equal by metadata as well.
    for dirpath, dirnames, filenames in sorted(os.walk(root), key=lambda w: -w[0].count(os.sep)):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                os.utime(path, (BASE_MTIME, BASE_MTIME), follow_symlinks=False)
        os.utime(dirpath, (BASE_MTIME, BASE_MTIME))
    print(f"gen-tree: {len(paths)} files, {written} bytes, {len(dirs)} folders in {root}", file=sys.stderr)


def regular_files(root):
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            if os.path.isfile(path) and not os.path.islink(path):
                out.append(os.path.relpath(path, root))
    return sorted(out)


def mutate(args):
    rng = random.Random(f"mutate-{args.seed}-{args.round}")
    root = args.dir
    files = regular_files(root)
    if not files:
        sys.exit(f"gen-tree: no files under {root}")
    count = max(1, round(len(files) * args.fraction))
    chosen = rng.sample(files, min(count, len(files)))
    stats = {"rewritten": 0, "appended": 0, "deleted": 0, "created": 0, "bytes": 0}
    for n, rel in enumerate(chosen):
        path = os.path.join(root, rel)
        r = rng.random()
        size = os.path.getsize(path)
        if r < 0.10:
            os.unlink(path)
            stats["deleted"] += 1
        elif r < 0.20:
            new = os.path.join(os.path.dirname(path), f"new-r{args.round}-{n:06d}.conf")
            data = text_content(rng, int(min(65536, rng.lognormvariate(7.3, 1.2))))
            with open(new, "wb") as f:
                f.write(data)
            stats["created"] += 1
            stats["bytes"] += len(data)
        elif r < 0.55 or size == 0:
            data = rng.randbytes(int(min(65536, 1 + rng.lognormvariate(7, 1.5))))
            with open(path, "ab") as f:
                f.write(data)
            stats["appended"] += 1
            stats["bytes"] += len(data)
        else:
            # Rewrite a range in place: up to 64 KiB or a tenth of the file, whichever is larger, so a big
            # file changes in the middle, as a database page or a media index would.
            length = min(size, max(1, rng.randrange(1, max(2, max(65536, size // 10)))))
            offset = rng.randrange(0, size - length + 1)
            with open(path, "r+b") as f:
                f.seek(offset)
                f.write(rng.randbytes(length))
            stats["rewritten"] += 1
            stats["bytes"] += length
    print(f"gen-tree: mutate round {args.round}: {stats} of {len(files)} files in {root}", file=sys.stderr)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("create", help="write a new tree")
    c.add_argument("dir")
    c.add_argument("--seed", type=int, default=1)
    c.add_argument("--files", type=int, default=100_000)
    c.add_argument("--bytes", default="5G", help="total size, e.g. 500M, 5G")
    c.set_defaults(func=create)
    m = sub.add_parser("mutate", help="change a fraction of the files of a tree")
    m.add_argument("dir")
    m.add_argument("--seed", type=int, default=1)
    m.add_argument("--round", type=int, default=1, help="a different round changes different files")
    m.add_argument("--fraction", type=float, default=0.01)
    m.set_defaults(func=mutate)
    args = p.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
