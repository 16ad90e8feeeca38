"""The benchmark's one command.

    python -m bench.run [--quick] [--scale] [--rounds N] [--only SCENARIO,...]
                        [--s3 seaweedfs|swift] [--profile] [--results-dir DIR] [--report PATH]
                        [--strict] [--update]

Starts the local services (``build/services.sh``: idempotent), generates the data under
``bench/work/`` (cached between runs), runs each scenario with stagerd and its peers
interleaved for several rounds, prints one PASS/FAIL line per target and writes
``<results-dir>/<timestamp>.json``, ``<results-dir>/latest.json`` and the Markdown report
with its PNG plots. ``--quick`` uses small sizes (the test suite runs it); the full run takes
~45 minutes on two cores and must not be run beside other heavy work. ``--scale`` runs the
scale set instead (upload, resume and stage at 2 and 8 GiB: seconds per GiB and peak RSS at
each; ~30 minutes, ~30 GiB of free disk). ``--s3 swift`` runs against the Swift all-in-one
(``build/swift.sh start current``) instead of SeaweedFS. ``--profile`` adds one py-spy run of
stagerd per scenario and saves a flame graph and its top functions (bench/profile.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote

from bench import report, scratchfs, services
from bench.context import FULL, QUICK, ROOT, BenchContext
from bench.model import ScenarioResult, scenario_from_dict
from bench.scenarios import SCALE_SCENARIOS, SCENARIOS

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")
DATABASE_URL = os.environ.get("BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run (~1 min)")
    p.add_argument(
        "--scale",
        action="store_true",
        help=f"the scale set ({', '.join(SCALE_SCENARIOS)}): 2 and 8 GiB (--quick: 8/32 MiB)",
    )
    p.add_argument("--rounds", type=int, help="interleaved rounds (default 3; --quick: 1)")
    p.add_argument(
        "--only",
        help=f"comma-separated scenarios among: {', '.join([*SCENARIOS, *SCALE_SCENARIOS])}",
    )
    p.add_argument("--s3", choices=("seaweedfs", "swift"), default="seaweedfs")
    p.add_argument(
        "--profile",
        action="store_true",
        help="one extra py-spy run of stagerd per scenario: <results-dir>/profiles/*.svg",
    )
    p.add_argument(
        "--results-dir",
        type=Path,
        help="default bench/results (--scale: bench/results/scale; --s3 swift: .../swift)",
    )
    p.add_argument(
        "--report",
        type=Path,
        help="default bench/REPORT.md (--scale: REPORT-scale.md; --s3 swift: REPORT-swift.md)",
    )
    p.add_argument(
        "--beside",
        type=Path,
        help="a results JSON to compare with, scenario by scenario (--s3 swift: the default "
        "SeaweedFS run's bench/results/latest.json)",
    )
    p.add_argument("--work", type=Path, default=ROOT / "bench" / "work")
    p.add_argument("--strict", action="store_true", help="exit 1 when any target FAILs")
    p.add_argument(
        "--update",
        action="store_true",
        help="keep the other scenarios of <results-dir>/latest.json, replace those run now",
    )
    args = p.parse_args(argv)
    registry = SCALE_SCENARIOS if args.scale else SCENARIOS
    names = args.only.split(",") if args.only else list(registry)
    unknown = [n for n in names if n not in registry]
    if unknown:
        p.error(f"unknown scenario(s): {', '.join(unknown)} (choose from {', '.join(registry)})")
    args.names = names
    # A scale or Swift run never overwrites the default run's report and results.
    suffix = [
        x for x in ("scale" if args.scale else "", "" if args.s3 == "seaweedfs" else args.s3) if x
    ]
    if args.results_dir is None:
        args.results_dir = (
            ROOT / "bench" / "results" / "-".join(suffix) if suffix else ROOT / "bench" / "results"
        )
    if args.report is None:
        args.report = ROOT / "bench" / ("REPORT" + "".join(f"-{x}" for x in suffix) + ".md")
    if args.beside is None and args.s3 != "seaweedfs":
        default = (
            ROOT / "bench" / "results" / ("scale/latest.json" if args.scale else "latest.json")
        )
        args.beside = default if default.exists() else None
    if args.rounds is not None and args.rounds < 1:
        p.error("--rounds must be >= 1")
    return args


@contextmanager
def bench_database(url: str) -> Iterator[str]:
    """A fresh PostgreSQL schema for this run (search_path in the URL), dropped afterwards."""
    import psycopg

    schema = f"bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    sep = "&" if "?" in url else "?"
    try:
        yield f"{url}{sep}options={quote(f'-csearch_path={schema}')}"
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def host_info() -> dict[str, Any]:
    mem = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    return {
        "cpus": os.cpu_count(),
        "memory_bytes": mem,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "load_average": list(os.getloadavg()),
    }


def run_scenarios(ctx: BenchContext, names: list[str]) -> list[ScenarioResult]:
    results = []
    registry = {**SCENARIOS, **SCALE_SCENARIOS}
    for name in names:
        print(f"== {name}", flush=True)
        started = time.perf_counter()
        result = registry[name](ctx)
        result.params["scenario_seconds"] = round(time.perf_counter() - started, 1)
        scratchfs.clear(ctx.work / "runs")  # errors already carry log tails
        for line in report.result_lines(result):
            print(f"   {line}", flush=True)
        results.append(result)
    return results


def fold_into_latest(latest: Path, fresh: list[ScenarioResult]) -> list[ScenarioResult]:
    """The previous run's scenarios, those run now replacing theirs (registry order kept)."""
    if not latest.exists():
        return fresh
    old = json.loads(latest.read_text())
    by_name = {d["name"]: scenario_from_dict(d) for d in old["scenarios"]}
    for r in fresh:
        r.notes.append(f"measured in a later run than {old['started_at'][:19]}Z (--update)")
    by_name.update({r.name: r for r in fresh})
    return [by_name[n] for n in [*SCENARIOS, *SCALE_SCENARIOS] if n in by_name]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    target = services.SEAWEEDFS if args.s3 == "seaweedfs" else services.swift_target()
    services.ensure(target)
    started = datetime.now(timezone.utc)
    with bench_database(DATABASE_URL) as database_url:
        ctx = BenchContext(
            quick=args.quick,
            rounds=args.rounds or (1 if args.quick else 2 if args.scale else 3),
            sizes=QUICK if args.quick else FULL,
            s3=target,
            redis_url=REDIS_URL,
            database_url=database_url,
            work=args.work,
            server_pids=services.server_pids(target),
            profile_dir=args.results_dir / "profiles" if args.profile else None,
            scale=args.scale,
        )
        if not ctx.server_pids:
            print(f"note: no local process found for {target.endpoint}: no server CPU")
        with scratchfs.scratch_filesystem(ctx.work, ctx.quick) as scratch_fs:
            print(f"scratch: {scratch_fs}", flush=True)
            results = run_scenarios(ctx, args.names)
    if args.update:
        results = fold_into_latest(args.results_dir / "latest.json", results)
    doc = report.document(ctx, results, started, {**host_info(), "scratch_fs": scratch_fs})
    if args.beside is not None:
        doc["beside"] = report.beside(doc, json.loads(args.beside.read_text()), str(args.beside))
    json_path, md_path = report.write(doc, results, args.results_dir, args.report)
    failed = [c for r in results for c in r.checks if not c.passed]
    print(f"results: {json_path}\nreport:  {md_path}")
    print(f"targets: {doc['summary']['passed']} PASS, {doc['summary']['failed']} FAIL")
    return 1 if (args.strict and failed) else 0


if __name__ == "__main__":
    sys.exit(main())
