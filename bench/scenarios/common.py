"""Helpers shared by the scenarios: run a command measured, read stagerd's JSON output."""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.context import STAGERD_ROOT, BenchContext, sync_disks
from bench.measure import Sample, run_measured
from bench.model import RunFailed
from bench.peers import Command


def run_command(
    cmd: Command,
    *,
    scratch: Sequence[Path] = (),
    timeout: float = 900.0,
    server: Sequence[int] = (),
) -> tuple[Sample, str]:
    """Run *cmd* measured (*server*: the S3 server's pids, see run_measured); a non-zero exit
    raises RunFailed with the tail of stderr.

    The default timeout is far above any contender's 8 GiB run here, and short enough that a
    hung peer costs one sample, not the run (boto3 ``download_fileobj`` to a pipe once held a
    full run for 18 min; bench/sdk.py now ends that one itself, see boto3_get)."""
    sample, out, err = run_measured(
        cmd.argv, env=cmd.env, cwd=STAGERD_ROOT, scratch=scratch, timeout=timeout, server=server
    )
    if sample.returncode != 0:
        raise RunFailed.of(Path(cmd.argv[0]).name + " " + " ".join(cmd.argv[1:3]), sample, err, out)
    return sample, out


def last_json(stdout: str) -> dict[str, Any]:
    """The JSON object stagerd printed: all of stdout (pretty-printed), else its last JSON line."""
    try:
        whole = json.loads(stdout)
    except ValueError:
        whole = None
    if isinstance(whole, dict):
        return whole
    for raw in reversed(stdout.strip().splitlines()):
        line = raw.strip()
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except ValueError:
                continue
            if isinstance(value, dict):
                return value
    raise ValueError(f"no JSON object in output: {stdout[-300:]!r}")


def with_extra(sample: Sample, **extra: Any) -> Sample:
    return dataclasses.replace(sample, extra={**sample.extra, **extra})


def clear(ctx: BenchContext, path: Path) -> None:
    """Remove a run's output and flush the disk, outside the timed region."""
    shutil.rmtree(path, ignore_errors=True)
    sync_disks(ctx)


def dir_stats(path: Path) -> tuple[int, int]:
    """(regular files, apparent bytes) under *path*: the extraction really happened."""
    files = size = 0
    for p in path.rglob("*"):
        if p.is_file() and not p.is_symlink():
            files += 1
            size += p.stat().st_size
    return files, size


_MIGRATED: set[str] = set()


def migrate_once(ctx: BenchContext, env: dict[str, str]) -> None:
    """``stagerd db migrate`` on the run's schema, once per run (it is idempotent, but each
    call is a full interpreter start: seconds a --quick run cannot spare)."""
    if ctx.database_url in _MIGRATED:
        return
    argv = [ctx.python, "-m", "stagerd", "db", "migrate"]
    run_command(Command(argv, env), timeout=120)
    _MIGRATED.add(ctx.database_url)
