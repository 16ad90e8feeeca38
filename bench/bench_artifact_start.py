"""Benchmark the artifact's start: ``dist/stagerd --version`` after the first run.

    python bench/bench_artifact_start.py [--artifact dist/stagerd] [--runs 21]
                                         [--python /usr/bin/python3]

Runs the artifact once on an empty SHIV_ROOT (it unpacks and compiles), then --runs times,
and prints one JSON line: first-run seconds, median and p90 of the later runs, and the same
for ``python -m stagerd --version`` from the checkout beside it. The issue's target: a
median within 0.25 s after the first run. Run it on a quiet machine: it measures wall time.
The interpreter is given explicitly so a shim (pyenv) in front of python3 is not measured.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def timed(cmd: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    return time.perf_counter() - started


def series(cmd: list[str], env: dict[str, str], runs: int) -> dict[str, float]:
    times = sorted(timed(cmd, env) for _ in range(runs))
    return {
        "median_s": round(statistics.median(times), 4),
        "p90_s": round(times[int(0.9 * (len(times) - 1))], 4),
        "min_s": round(times[0], 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--artifact", type=Path, default=ROOT / "dist" / "stagerd")
    parser.add_argument("--runs", type=int, default=21)
    parser.add_argument("--python", default=sys.executable)
    args = parser.parse_args()
    if not args.artifact.is_file():
        sys.exit(f"{args.artifact}: not found; build it with build/shiv.sh")
    root = Path(tempfile.mkdtemp(prefix="bench-shiv-root-"))
    try:
        env = {"PATH": os.environ.get("PATH", ""), "HOME": "/dev/null", "SHIV_ROOT": str(root)}
        artifact = [args.python, str(args.artifact), "--version"]
        first = timed(artifact, env)
        later = series(artifact, env, args.runs)
        checkout_env = {**env, "PYTHONPATH": str(ROOT)}
        # The checkout needs its dependencies: run it with this (the project venv's) Python.
        checkout = series([sys.executable, "-m", "stagerd", "--version"], checkout_env, args.runs)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(
        json.dumps(
            {
                "bench": "artifact_start",
                "artifact_bytes": args.artifact.stat().st_size,
                "first_run_s": round(first, 3),
                "artifact": later,
                "checkout": checkout,
                "target_median_s": 0.25,
                "ok": later["median_s"] <= 0.25,
                "loadavg_1m": os.getloadavg()[0],
            }
        )
    )


if __name__ == "__main__":
    main()
