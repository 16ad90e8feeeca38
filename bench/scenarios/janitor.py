"""janitor: one run over N stale (unlocked, old) and N live (locked, old) batch dirs.

stagerd's janitor is timed on the mixed root (it removes the stale half) and again on a root
holding only the locked dirs (the steady state of a busy VM: everything skipped). The peer is
``systemd-tmpfiles --clean``, whose flock rule the janitor shares; it empties old dirs but
leaves each emptied dir for its next run (the dir's mtime changes as it is emptied). ``rm -rf``
of exactly the stale dirs is the floor: what removing them costs on this disk at all.
stagerd runs with ``--min-age 0s``: its age is max(mtime, ctime) (a tar-extracted old mtime
must not make a fresh dir look stale) and ctime cannot be backdated, so with the default 15m
the freshly generated "stale" dirs would all be young; 0s makes every unlocked dir stale and
the lock the only protection, which is exactly what is measured. tmpfiles gets the same
effect with its mtime-only age (``m:15m``) on backdated dirs. The timed contenders run the scratch and queue parts only (S3 and PostgreSQL unset, so
those parts are skipped): the targets are about directories, and the object-store listing
and database round trips are a fixed cost measured separately ("all parts"), as is the
command's fixed cost on an empty root. Targets, from issue 6's wording, on the time the dirs
add to an empty-root run: "N stale cleaned in seconds" -> <= 10 s; "N locked skipped in well
under a second" -> < 1 s.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.context import BenchContext, stagerd_has
from bench.measure import Sample
from bench.model import Check, Contender, RunFailed, ScenarioResult, interleave
from bench.peers import Command
from bench.scenarios.common import last_json, run_command, with_extra

NAME = "janitor"
OLD = time.time() - 3 * 3600


def run(ctx: BenchContext) -> ScenarioResult:
    n = ctx.sizes.janitor_dirs
    result = ScenarioResult(NAME, f"Janitor over {n:,} stale + {n:,} locked dirs", {"dirs": n})
    missing = stagerd_has("commands.janitor")
    with ctx.bucket("jan") as bucket:
        contenders = []
        if missing:
            result.notes.append(f"stagerd not measured: {missing}")
        else:
            contenders += [
                Contender("stagerd janitor (stale + locked)", _stagerd(ctx, None, n, n), True),
                Contender("stagerd janitor (locked only)", _stagerd(ctx, None, 0, n), True),
                Contender("stagerd janitor (empty root)", _stagerd(ctx, None, 0, 0), True),
                Contender(
                    "stagerd janitor, all parts (locked only)", _stagerd(ctx, bucket, 0, n), True
                ),
            ]
        contenders.append(Contender("systemd-tmpfiles --clean (stale + locked)", _tmpfiles(ctx, n)))
        contenders.append(
            Contender("rm -rf of the stale dirs (floor, no lock check)", _rm_floor(ctx, n))
        )
        result.contenders = interleave(contenders, ctx.rounds)
    result.add_ratios()
    if not missing:
        _checks(result)
    return result


def _checks(result: ScenarioResult) -> None:
    """Targets on the marginal cost of the dirs: each run minus the same command on an empty
    root (interpreter + imports + Redis round trip), which the issue's wording excludes."""
    mixed, locked, empty = result.contenders[:3]
    if not (mixed.ok and locked.ok and empty.ok):
        return
    base = empty.median()
    result.params["empty_root_seconds"] = round(base, 3)
    result.checks.append(
        Check(f"{mixed.name} minus empty root", mixed.median() - base, "<=", 10.0, "s")
    )
    result.checks.append(
        Check(f"{locked.name} minus empty root", locked.median() - base, "<", 1.0, "s")
    )
    result.add_rss_check()


def make_stale(root: Path, count: int) -> None:
    for i in range(count):
        path = root / f"stale-{i:05d}"
        path.mkdir()
        (path / "input.wav").write_bytes(b"RIFF" + bytes(4092))
        os.utime(path / "input.wav", (OLD, OLD))
        os.utime(path, (OLD, OLD))


@contextmanager
def locked_dirs(ctx: BenchContext, root: Path, count: int) -> Iterator[None]:
    """N dirs locked by a separate process (a live worker's lock is another process's)."""
    holder = subprocess.Popen(
        [sys.executable, "-m", "bench.lockholder", str(root), str(count), "live"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=ctx.base_env(),
    )
    try:
        assert holder.stdout is not None
        if holder.stdout.readline().strip() != "ready":
            raise RunFailed("lock holder did not get ready")
        yield
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=60)


def _check_survivors(root: Path, stale: int, locked: int) -> None:
    live = sum(1 for p in root.iterdir() if p.name.startswith("live-"))
    left = sum(1 for p in root.iterdir() if p.name.startswith("stale-"))
    if live != locked or left != 0:
        raise RunFailed(
            f"after janitor: {live}/{locked} locked dirs, {left}/{stale} stale dirs left"
        )


def _stagerd(
    ctx: BenchContext, bucket: str | None, stale: int, locked: int
) -> Callable[[int], Sample]:
    """The janitor over *stale* + *locked* dirs; with no *bucket*, the scratch and queue parts
    only (S3 and PostgreSQL unset: skipped with a warning), which is what the targets time."""

    def once(_round: int) -> Sample:
        root = ctx.fresh_dir("janitor-scratch")
        make_stale(root, stale)
        queue = f"bench:{uuid.uuid4().hex[:8]}:queue:unpack"
        env = ctx.stagerd_env(bucket or "unused", root, STAGERD_QUEUE=queue)
        if bucket is None:
            for name in (
                "S3_ENDPOINT",
                "S3_ACCESS_KEY",
                "S3_SECRET_KEY",
                "S3_BUCKET",
                "DATABASE_URL",
            ):
                env.pop(name)
        with locked_dirs(ctx, root, locked):
            argv = ctx.stagerd("janitor", "--json", "--min-age", "0s")
            sample, out = run_command(Command(argv, env))
            _check_survivors(root, stale, locked)
        report = last_json(out)
        return with_extra(
            sample,
            removed=len(report.get("removed", [])),
            kept_locked=len(report.get("kept_locked", [])),
        )

    return once


def _rm_floor(ctx: BenchContext, n: int) -> Callable[[int], Sample]:
    """What deleting the stale dirs costs on this disk at all: ``rm -rf`` on exactly them."""

    def once(_round: int) -> Sample:
        root = ctx.fresh_dir("janitor-rm")
        make_stale(root, n)
        with locked_dirs(ctx, root, n):
            script = f"cd {root} && exec rm -rf stale-*"
            sample, _ = run_command(Command(["sh", "-c", script], ctx.base_env()))
            _check_survivors(root, n, n)
        return sample

    return once


def _tmpfiles(ctx: BenchContext, n: int) -> Callable[[int], Sample]:
    def once(_round: int) -> Sample:
        root = ctx.fresh_dir("janitor-tmpfiles")
        make_stale(root, n)
        conf = root.parent / "bench-tmpfiles.conf"
        conf.write_text(f"d {root} - - - m:15m\n")
        with locked_dirs(ctx, root, n):
            sample, _ = run_command(
                Command(["systemd-tmpfiles", "--clean", str(conf)], ctx.base_env())
            )
        emptied = sum(1 for p in root.glob("stale-*") if not any(p.iterdir()))
        return with_extra(sample, emptied=emptied)

    return once
