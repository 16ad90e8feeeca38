"""prefetch (issue 11): processor idle time between batches, prefetch 1 beside prefetch 0.

Staging time is whatever stagerd takes for the archive (measured first: two batches through
``gpu --burst --prefetch 0`` with an instant processor, ``stage_seconds`` read from the
ledger); the processor then sleeps k x that, so the ratio staging:processing is 1:k as
measured on this machine, not as guessed. The processor logs its own start and end
(``date +%s.%N``, no interpreter start-up), so "idle between batches" is the gap from one
batch's end to the next one's start as the processor saw it. batches/hour is over the
processor's span (first start to last end): the steady state a fleet sees.
"""

from __future__ import annotations

import statistics
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import data
from bench.context import BenchContext, stagerd_has
from bench.measure import Sample
from bench.model import Check, Contender, RunFailed, ScenarioResult, interleave
from bench.peers import Command
from bench.scenarios.common import migrate_once, run_command, with_extra

SCRIPT = """#!/bin/sh
echo "start $STAGERD_BATCH_ID $(date +%s.%N)" >> {log}
sleep {seconds:.3f}
echo '{{"stagerd": "end", "count": 0}}' > "$STAGERD_RESULTS"
echo "end $STAGERD_BATCH_ID $(date +%s.%N)" >> {log}
"""


def run_1to3(ctx: BenchContext) -> ScenarioResult:
    return measure(ctx, "prefetch_1to3", 3.0)


def run_1to1(ctx: BenchContext) -> ScenarioResult:
    return measure(ctx, "prefetch_1to1", 1.0)


def measure(ctx: BenchContext, name: str, k: float) -> ScenarioResult:
    n = ctx.sizes.prefetch_batches
    result = ScenarioResult(name, f"Prefetch, staging:processing = 1:{k:g}", {"batches": n})
    result.columns = ["idle_fraction", "batches_per_hour"]
    missing = stagerd_has("commands.gpu", "db", "gpu.stage")
    if missing:
        result.skipped = f"stagerd not measured: {missing} (prefetch has no peer: none overlaps)"
        return result
    archive = data.sized_archive(ctx.data_dir, ctx.sizes.prefetch_archive)
    with ctx.bucket("pf") as bucket:
        ctx.s3_client().upload_file(str(archive.path), bucket, "archives/pf-src.tar")
        stage_s = _calibrate(ctx, bucket, archive)
        process_s = k * stage_s
        result.params.update(
            archive_bytes=archive.size,
            stage_seconds=round(stage_s, 3),
            process_seconds=round(process_s, 3),
        )
        result.contenders = interleave(
            [
                Contender("stagerd --prefetch 1", _once(ctx, bucket, archive, 1, process_s), True),
                Contender(
                    "stagerd --prefetch 0 (plain loop)", _once(ctx, bucket, archive, 0, process_s)
                ),
            ],
            ctx.rounds,
        )
    result.add_ratios()
    first = result.contenders[0]
    if first.ok and k > 1:
        idle = first.median("idle_fraction")
        result.checks.append(
            Check("idle between batches / processing time (prefetch 1)", idle, "<", 0.05)
        )
    result.add_rss_check()
    return result


def _enqueue(ctx: BenchContext, bucket: str, archive: data.Archive, prefix: str, count: int) -> str:
    """Server-side copies of the archive as <prefix>-NN batches, RPUSHed as producers do."""
    import redis

    from stagerd.job import Job

    client, queue = ctx.s3_client(), f"bench:{prefix}:queue:unpack"
    r = redis.Redis.from_url(ctx.redis_url)
    for i in range(count):
        job = Job.new(f"{prefix}-{i:02d}", size=archive.size, sha256=archive.sha256)
        client.copy_object(
            Bucket=bucket,
            Key=job.s3_key,
            CopySource={"Bucket": bucket, "Key": "archives/pf-src.tar"},
        )
        r.rpush(queue, job.to_json())
    r.close()
    return queue


def _run_gpu(
    ctx: BenchContext, bucket: str, archive: data.Archive, prefetch: int, seconds: float, count: int
) -> tuple[Sample, str, Path]:
    prefix = f"pf{uuid.uuid4().hex[:6]}"
    queue = _enqueue(ctx, bucket, archive, prefix, count)
    scratch = ctx.fresh_dir(f"{prefix}-scratch")
    log = scratch.parent / f"{prefix}-processor.log"
    script = scratch.parent / f"{prefix}-processor.sh"
    script.write_text(SCRIPT.format(log=log, seconds=seconds))
    script.chmod(0o755)
    env = ctx.stagerd_env(bucket, scratch, STAGERD_QUEUE=queue, STAGERD_WORKER_ID=f"bench-{prefix}")
    migrate_once(ctx, env)
    argv = ctx.stagerd(
        "gpu",
        "--burst",
        "--concurrency",
        "1",
        "--prefetch",
        str(prefetch),
        "--processor",
        str(script),
    )
    sample, _ = run_command(Command(argv, env), scratch=[scratch], timeout=1800)
    return sample, prefix, log


def _ledger(ctx: BenchContext, prefix: str) -> list[dict[str, Any]]:
    import psycopg
    from psycopg.rows import dict_row

    with psycopg.connect(ctx.database_url, row_factory=dict_row) as conn:
        sql = "SELECT batch_id, state, stage_seconds, process_seconds FROM stagerd_batches WHERE batch_id LIKE %s"
        return list(conn.execute(sql, (f"{prefix}-%",)).fetchall())


_CALIBRATED: dict[tuple[str, str], float] = {}


def _calibrate(ctx: BenchContext, bucket: str, archive: data.Archive) -> float:
    """Median staging seconds of the archive (measured once per run, shared by both ratios)."""
    key = (ctx.database_url, archive.sha256)
    if key not in _CALIBRATED:
        _CALIBRATED[key] = _measure_staging(ctx, bucket, archive)
    return _CALIBRATED[key]


def _measure_staging(ctx: BenchContext, bucket: str, archive: data.Archive) -> float:
    count = 1 if ctx.quick else 2
    _, prefix, _ = _run_gpu(ctx, bucket, archive, 0, 0.0, count)
    rows = _ledger(ctx, prefix)
    stages = [float(r["stage_seconds"]) for r in rows if r["stage_seconds"] is not None]
    if len(stages) != count:
        raise RunFailed(f"calibration: ledger rows {rows}")
    return statistics.median(stages)


def processor_gaps(log: Path) -> tuple[list[float], list[float], float]:
    """(processing durations, idle gaps between batches, span first start -> last end)."""
    events: dict[str, dict[str, float]] = {}
    for line in log.read_text().splitlines():
        kind, batch, stamp = line.split()
        events.setdefault(batch, {})[kind] = float(stamp)
    runs = sorted((e["start"], e["end"]) for e in events.values() if len(e) == 2)
    durations = [end - start for start, end in runs]
    gaps = [runs[i + 1][0] - runs[i][1] for i in range(len(runs) - 1)]
    return durations, gaps, runs[-1][1] - runs[0][0]


def _once(
    ctx: BenchContext, bucket: str, archive: data.Archive, prefetch: int, seconds: float
) -> Callable[[int], Sample]:
    def once(_round: int) -> Sample:
        n = ctx.sizes.prefetch_batches
        sample, prefix, log = _run_gpu(ctx, bucket, archive, prefetch, seconds, n)
        durations, gaps, span = processor_gaps(log)
        done = [r for r in _ledger(ctx, prefix) if r["state"] == "done"]
        if len(durations) != n or len(done) != n:
            raise RunFailed(f"{len(durations)} processor runs, {len(done)} done rows, expected {n}")
        mean_gap = statistics.fmean(gaps) if gaps else 0.0
        return with_extra(
            sample,
            idle_fraction=mean_gap / statistics.fmean(durations),
            mean_idle_seconds=mean_gap,
            batches_per_hour=n / span * 3600,
            stage_seconds=statistics.median(float(r["stage_seconds"] or 0) for r in done),
        )

    return once
