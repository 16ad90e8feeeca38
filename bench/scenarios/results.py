"""results_1m: one batch whose processor writes 1,000,000 result rows (``--quick``: 20,000),
through ``stagerd gpu --burst`` into PostgreSQL.

What it shows: the rows are streamed from the results file into one COPY inside the commit
transaction (stagerd/results.py, Ledger.commit_results), so the worker's peak RSS does not
grow with the results (target: under 200 MB; before issue 18 a 300,000-row file took the
worker to 334 MB). The clock runs from the worker's start to its exit, commit included.
The peer is the obvious way (the seed's flow, and stagerd before issue 18): run the same
processor, read the whole results file into a list, ``executemany`` it into a table; its
peak RSS grows with the rows. It runs one round only: its result is known by design.
"""

from __future__ import annotations

import io
import tarfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.context import BenchContext, stagerd_has
from bench.measure import Sample
from bench.model import Check, Contender, RunFailed, ScenarioResult, interleave
from bench.peers import Command
from bench.scenarios.common import migrate_once, run_command, with_extra

NAME = "results_1m"
PROCESSOR = """import json, os
n = int(os.environ["BENCH_ROWS"])
with open(os.environ["STAGERD_RESULTS"], "w") as out:
    for i in range(n):
        row = {"item": f"seg-{i:08d}", "start": i * 0.5, "end": i * 0.5 + 0.5,
               "text": "a transcribed segment of speech " * 2}
        out.write(json.dumps(row) + "\\n")
    out.write(json.dumps({"stagerd": "end", "count": n}) + "\\n")
"""


def run(ctx: BenchContext) -> ScenarioResult:
    rows = ctx.sizes.result_rows
    result = ScenarioResult(NAME, f"{rows:,} result rows in one batch", {"rows": rows})
    result.columns = ["rows_per_s"]
    missing = stagerd_has("commands.gpu", "db", "results")
    if missing:
        result.skipped = f"stagerd not measured: {missing}"
        return result
    script = ctx.work / "results-processor.py"
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(PROCESSOR)
    with ctx.bucket("results") as bucket:
        contenders = [
            Contender("stagerd gpu (streamed commit)", _stagerd(ctx, bucket, script), True),
            Contender("naive (list + executemany)", _naive(ctx, script), max_rounds=1),
        ]
        result.contenders = interleave(contenders, ctx.rounds)
    result.add_ratios("peak_rss")
    if result.contenders[0].ok:
        result.add_rss_check()
        committed = min(result.contenders[0].metric("committed"))
        result.checks.append(Check("rows committed", committed, ">=", rows, "rows"))
    return result


def _stagerd(ctx: BenchContext, bucket: str, script: Path) -> Callable[[int], Sample]:
    import redis

    def once(round_no: int) -> Sample:
        batch_id = f"results-{round_no}-{uuid.uuid4().hex[:6]}"
        queue = f"bench:{batch_id}:queue"
        scratch = ctx.fresh_dir(f"results-scratch-{round_no}")
        env = ctx.stagerd_env(
            bucket, scratch, STAGERD_QUEUE=queue, STAGERD_WORKER_ID=f"bench-{batch_id}",
            STAGERD_MAX_RESULTS=str(ctx.sizes.result_rows), BENCH_ROWS=str(ctx.sizes.result_rows),
        )  # fmt: skip
        migrate_once(ctx, env)
        _enqueue(ctx, bucket, queue, batch_id, redis.Redis.from_url(ctx.redis_url))
        argv = ctx.stagerd("gpu", "--burst", "--processor", f"{ctx.python} {script}")
        sample, _ = run_command(Command(argv, env), scratch=[scratch], timeout=3600)
        committed = _count(ctx, batch_id)
        if committed != ctx.sizes.result_rows:
            raise RunFailed(f"{committed} of {ctx.sizes.result_rows} rows committed")
        return with_extra(
            sample, committed=committed, rows_per_s=committed / max(sample.seconds, 1e-9)
        )

    return once


NAIVE = """import json, os, subprocess, sys
import psycopg
env = {**os.environ, "STAGERD_RESULTS": sys.argv[2]}
subprocess.run([sys.executable, sys.argv[1]], env=env, check=True)
rows = [json.loads(line) for line in open(sys.argv[2])]
rows = [(r["item"], json.dumps(r)) for r in rows if "item" in r]
with psycopg.connect(os.environ["DATABASE_URL"]) as conn:
    conn.execute("CREATE TABLE IF NOT EXISTS naive_results (item text, result jsonb)")
    conn.execute("TRUNCATE naive_results")
    with conn.cursor() as cur:
        cur.executemany("INSERT INTO naive_results VALUES (%s, %s)", rows)
"""


def _naive(ctx: BenchContext, script: Path) -> Callable[[int], Sample]:
    def once(round_no: int) -> Sample:
        work = ctx.fresh_dir(f"results-naive-{round_no}")
        env = {**ctx.stagerd_env("unused", work), "BENCH_ROWS": str(ctx.sizes.result_rows)}
        argv = [ctx.python, "-c", NAIVE, str(script), str(work / "results.jsonl")]
        sample, _ = run_command(Command(argv, env), timeout=3600)
        return sample

    return once


def _enqueue(ctx: BenchContext, bucket: str, queue: str, batch_id: str, r: Any) -> None:
    from stagerd.job import Job

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("clip-000.wav")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"RIFF"))
    body = buf.getvalue()
    ctx.s3_client().put_object(Bucket=bucket, Key=f"archives/{batch_id}.tar", Body=body)
    r.rpush(queue, Job.new(batch_id, size=len(body)).to_json())


def _count(ctx: BenchContext, batch_id: str) -> int:
    import psycopg

    with psycopg.connect(ctx.database_url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM stagerd_results WHERE batch_id = %s", (batch_id,)
        ).fetchone()
    return int(row[0]) if row else 0
