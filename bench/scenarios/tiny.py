"""tiny: N tiny batches end to end, transfer -> queue -> gpu -> PostgreSQL, no-op processor.

Both pipelines run as daemons started before the clock, the way they run in production
(``stagerd transfer watch INBOX`` on the transfer host, ``stagerd gpu`` on the GPU VM), and
one warm-up batch goes through first so neither is billed for its start-up. The clock runs
from the first archive renamed into the inbox to the N-th batch's row in PostgreSQL. The peer
is the seed's flow with the obvious loops around it (bench/naive.py: watch + upload_file +
RPUSH; BLPOP + download_file + extractall + processor + INSERT), and the same loops moving
the archives with s5cmd, with obstore, and with s5cmd plus SHA-256 checked end to end (the
verifying peer). CPU is both daemons' process trees over the timed span, per batch.
"""

from __future__ import annotations

import os
import resource
import shutil
import statistics
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from bench import data
from bench.context import BenchContext, stagerd_has
from bench.measure import Sample, tree_cpu
from bench.model import Check, Contender, RunFailed, ScenarioResult, interleave
from bench.peers import Command
from bench.scenarios.common import migrate_once, with_extra
from bench.scenarios.daemons import daemons, log_tail, wait_for

NAME = "tiny"
NOOP = (
    "#!/bin/sh\n# bench no-op processor: no results (said explicitly by the trailer), exit 0\n"
    'echo \'{"stagerd": "end", "count": 0}\' > "$STAGERD_RESULTS"\n'
)


def run(ctx: BenchContext) -> ScenarioResult:
    n = ctx.sizes.tiny_batches
    result = ScenarioResult(NAME, f"{n} tiny batches end to end", {"batches": n})
    result.columns = ["transfer_side_seconds", "cpu_ms_per_batch"]
    missing = stagerd_has("commands.transfer", "commands.gpu", "db")
    archives = data.tiny_batches(ctx.data_dir, n + 1)
    noop = write_noop(ctx)
    with ctx.bucket("tiny") as bucket:
        contenders = []
        if missing:
            result.notes.append(f"stagerd not measured: {missing}")
        else:
            contenders.append(
                Contender(
                    "stagerd (transfer watch + gpu)", _stagerd(ctx, bucket, archives, noop), True
                )
            )
        for name, via, verify, role in LOOPS:
            if ctx.quick and name not in QUICK_LOOPS:
                continue
            run = _naive(ctx, bucket, archives, noop, via, verify)
            contenders.append(Contender(name, run, role=role))
        result.contenders = interleave(contenders, ctx.rounds)
    result.add_ratios("batches_per_s")
    if not missing and result.contenders[0].ok:
        rate = result.contenders[0].median("batches_per_s")
        result.checks.append(Check("stagerd end-to-end batches/s", rate, ">=", 50, "/s"))
        _cpu_check(result)
        result.add_rss_check()
    return result


# The peer loops (bench/naive.py with VIA): the seed's boto3 flow, one s5cmd process per
# transfer, obstore in-process, and the verifying peer (s5cmd + SHA-256 on both sides, as
# in the other scenarios). --quick runs the seed's flow and the verifying one.
LOOPS = (
    ("naive (seed flow in loops)", "boto3", False, "peer"),
    ("s5cmd in loops", "s5cmd", False, "peer"),
    ("obstore in loops", "obstore", False, "peer"),
    ("s5cmd + SHA-256 in loops", "s5cmd", True, "verify"),
)
QUICK_LOOPS = ("naive (seed flow in loops)", "s5cmd + SHA-256 in loops")


def _cpu_check(result: ScenarioResult) -> None:
    """CPU per batch (both pipelines' process trees) <= 1.3x the verifying loops'."""
    mine = result.contenders[0]
    verify = next((c for c in result.contenders if c.role == "verify" and c.ok), None)
    if verify is None:
        return
    ratio = mine.median("cpu_ms_per_batch") / verify.median("cpu_ms_per_batch")
    label = f"CPU per batch vs verifying peer ({verify.name})"
    result.checks.append(Check(label, ratio, "<=", 1.3))


def write_noop(ctx: BenchContext) -> Path:
    path = ctx.work / "noop-processor.sh"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(NOOP)
    path.chmod(0o755)
    return path


def _stage_inputs(ctx: BenchContext, archives: list[data.Archive], prefix: str) -> list[Path]:
    """Copies named <prefix>-NNNN.tar (the batch id is the stem) next to the inbox."""
    outbox = ctx.fresh_dir(f"{prefix}-outbox")
    out = []
    for i, a in enumerate(archives):
        dest = outbox / f"{prefix}-{i:04d}.tar"
        shutil.copyfile(a.path, dest)
        out.append(dest)
    return out


def _pg_count(ctx: BenchContext, table: str, prefix: str, done_only: bool) -> Callable[[], int]:
    import psycopg

    conn = psycopg.connect(ctx.database_url, autocommit=True)
    state = " AND state = 'done'" if done_only else ""
    sql = f"SELECT count(*) FROM {table} WHERE batch_id LIKE %s{state}"

    def count() -> int:
        try:
            row = conn.execute(sql, (f"{prefix}-%",)).fetchone()
        except psycopg.errors.UndefinedTable:
            return 0
        return int(row[0]) if row else 0

    return count


def _drive(
    ctx: BenchContext,
    cmds: list[Command],
    inputs: list[Path],
    inbox: Path,
    count: Callable[[], int],
    name: str,
) -> Sample:
    """Warm up with one batch, then time the rest from first rename to last row."""
    logs = ctx.work / "runs" / f"{name}-logs"
    shutil.rmtree(logs, ignore_errors=True)
    with daemons(cmds, logs) as (procs, poller):
        try:
            os.rename(inputs[0], inbox / inputs[0].name)
            wait_for("the warm-up batch", lambda: count() >= 1, 120, procs)
            pids = [p.pid for p in procs]
            cpu_before = {pid: tree_cpu([pid]) for pid in pids}
            children_before = _children_cpu()
            server_before = tree_cpu(ctx.server_pids)
            started = time.perf_counter()
            for path in inputs[1:]:
                os.rename(path, inbox / path.name)
            marks: dict[str, float] = {}

            def finished() -> bool:
                # When the inbox empties, the transfer side is done: which side bounds the rate.
                if "transfer" not in marks and not any(inbox.glob("*.tar")):
                    marks["transfer"] = time.perf_counter() - started
                return count() >= len(inputs)

            wait_for(f"{len(inputs)} batches", finished, 600, procs)
            seconds = time.perf_counter() - started
            cpu = _window_cpu(procs, cpu_before, children_before)
            server_cpu = tree_cpu(ctx.server_pids) - server_before
        except RunFailed as exc:
            raise RunFailed(f"{exc}\n{log_tail(logs)}") from None
        peak = max(poller.peak_rss.values())
    n = len(inputs) - 1
    return Sample(
        seconds,
        peak,
        0,
        0,
        {
            "batches_per_s": n / seconds,
            "transfer_side_seconds": marks.get("transfer", seconds),
            "per_process_peak_rss": list(poller.peak_rss.values()),
            "cpu_ms_per_batch": 1000 * cpu / n,
        },
        cpu_seconds=cpu,
        server_cpu_seconds=server_cpu if ctx.server_pids else None,
    )


def _stagerd(
    ctx: BenchContext, bucket: str, archives: list[data.Archive], noop: Path
) -> Callable[[int], Sample]:
    def once(_round: int) -> Sample:
        prefix = f"tiny{uuid.uuid4().hex[:6]}"
        inputs = _stage_inputs(ctx, archives, prefix)
        inbox, scratch = ctx.fresh_dir(f"{prefix}-inbox"), ctx.fresh_dir(f"{prefix}-scratch")
        env = ctx.stagerd_env(
            bucket,
            scratch,
            STAGERD_QUEUE=f"bench:{prefix}:queue:unpack",
            STAGERD_WORKER_ID=f"bench-{prefix}",
        )
        migrate_once(ctx, env)
        gpu = ctx.stagerd("gpu", "--concurrency", "1", "--prefetch", "1", "--processor", str(noop))
        watch = ctx.stagerd("transfer", "watch", str(inbox), "--delete-after")
        count = _pg_count(ctx, "stagerd_batches", prefix, done_only=True)
        sample = _drive(ctx, [Command(gpu, env), Command(watch, env)], inputs, inbox, count, prefix)
        return with_extra(sample, **ledger_medians(ctx, prefix))

    return once


def ledger_medians(ctx: BenchContext, prefix: str) -> dict[str, float]:
    """Median per-phase seconds of this run's batches, from stagerd's ledger (GPU side)."""
    import psycopg

    phases = ("stage_seconds", "process_seconds", "commit_seconds")
    sql = f"SELECT {', '.join(phases)} FROM stagerd_batches WHERE batch_id LIKE %s"
    with psycopg.connect(ctx.database_url) as conn:
        rows = conn.execute(sql, (f"{prefix}-%",)).fetchall()
    return {
        f"gpu_{name}": statistics.median(float(r[i]) for r in rows if r[i] is not None)
        for i, name in enumerate(phases)
        if any(r[i] is not None for r in rows)
    }


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _window_cpu(
    procs: list[subprocess.Popen[bytes]], before: dict[int, float], children_before: float
) -> float:
    """CPU of the daemons' trees since *before*. A daemon that already exited (the naive
    loops stop after N batches) is gone from /proc, so its share comes from what this
    process collected when it reaped it (RUSAGE_CHILDREN), minus what it had used before."""
    live = [p.pid for p in procs if p.poll() is None]
    total = sum(tree_cpu([pid]) - before[pid] for pid in live)
    exited = [p.pid for p in procs if p.pid not in live]
    if exited:
        total += _children_cpu() - children_before - sum(before[pid] for pid in exited)
    return total


def _naive(
    ctx: BenchContext,
    bucket: str,
    archives: list[data.Archive],
    noop: Path,
    via: str = "boto3",
    verify: bool = False,
) -> Callable[[int], Sample]:
    def once(_round: int) -> Sample:
        prefix = f"naive{uuid.uuid4().hex[:6]}"
        inputs = _stage_inputs(ctx, archives, prefix)
        inbox, scratch = ctx.fresh_dir(f"{prefix}-inbox"), ctx.fresh_dir(f"{prefix}-scratch")
        queue = f"bench:{prefix}:queue:unpack"
        env = {**ctx.stagerd_env(bucket, scratch)}
        n = str(len(inputs))
        tail = [via, *(["verify"] if verify else [])]
        produce = [ctx.python, "-m", "bench.naive", "produce", str(inbox), queue, n, *tail]
        consume = [ctx.python, "-m", "bench.naive", "consume", n, queue, str(noop), str(scratch)]
        consume += tail
        count = _pg_count(ctx, "naive_batches", prefix, done_only=False)
        return _drive(
            ctx, [Command(consume, env), Command(produce, env)], inputs, inbox, count, prefix
        )

    return once
