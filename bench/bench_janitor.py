"""Benchmark the janitor's scratch sweep: N stale dirs removed, N live locked dirs skipped.

    python bench/bench_janitor.py [--count 10000] [--files 3] [--dir /data/scratch-bench]

Prints one JSON line per scenario. The issue's targets: 10,000 stale directories cleaned in
seconds, 10,000 locked ones skipped in well under a second.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path


def make_dirs(root: Path, count: int, files: int) -> None:
    for i in range(count):
        batch = root / f"batch-{i:06d}"
        (batch / "input").mkdir(parents=True)
        for j in range(files):
            (batch / "input" / f"{j}.wav").write_bytes(b"\0" * 4096)


def lock_all(root: Path) -> list[int]:
    fds = []
    for name in os.listdir(root):
        fd = os.open(root / name, os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fds.append(fd)
    return fds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--files", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()
    # Run from a checkout without installing: the package lives next to bench/.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from stagerd.sweep import sweep_scratch

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, args.count + 100)), hard))
    base = Path(tempfile.mkdtemp(dir=args.dir, prefix="bench-janitor-"))
    try:
        root = base / "scratch"
        root.mkdir()
        make_dirs(root, args.count, args.files)
        fds = lock_all(root)
        started = time.perf_counter()
        result = sweep_scratch(root, min_age=0, now=time.time() + 3600)
        locked_s = time.perf_counter() - started
        assert len(result.kept_locked) == args.count and not result.removed
        print(
            json.dumps({"scenario": "locked", "count": args.count, "seconds": round(locked_s, 3)})
        )
        for fd in fds:
            os.close(fd)
        started = time.perf_counter()
        result = sweep_scratch(root, min_age=0, now=time.time() + 3600)
        stale_s = time.perf_counter() - started
        assert len(result.removed) == args.count and os.listdir(root) == []
        print(
            json.dumps(
                {
                    "scenario": "stale",
                    "count": args.count,
                    "files_each": args.files,
                    "seconds": round(stale_s, 3),
                    "freed_bytes": result.freed_bytes,
                }
            )
        )
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
