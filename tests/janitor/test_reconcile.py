"""Issue 17 (b) and ``stagerd reconcile``: when Redis forgets (FLUSHALL on a private
redis-server, as a restart without persistence does) with ten batches queued or in flight,
the worker abandons its in-flight batches (registration lost) and one reconcile re-enqueues
every lost batch from S3 + ledger; all ten end done exactly once."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import redis as redis_lib

from stagerd.db import ledger as db
from stagerd.queue.keys import QueueKeys
from tests.reliability_support import Proc, counting_processor, processor_runs
from tests.worker_support import make_tar, phases, wait_for

BATCHES = [f"rf-{i:02d}" for i in range(10)]


def _states(database_url: str) -> dict[str, str]:
    ledger = db.Ledger(database_url)
    try:
        return {b: (r.state if (r := ledger.batch(b)) else "none") for b in BATCHES}
    finally:
        ledger.close()


def test_one_reconcile_after_flushall_recovers_every_batch(
    stagerd_env: dict[str, str],
    restartable_redis: Any,
    database_url: str,
    run_cli: Any,
    tmp_path: Path,
) -> None:
    db.migrate(database_url)
    runs = tmp_path / "runs"
    env = {
        **stagerd_env,
        "REDIS_URL": restartable_redis.url,
        "STAGERD_HEARTBEAT_TTL": "3s",
        "STAGERD_PROCESSOR": counting_processor(runs, "--sleep", "1"),
    }
    for batch in BATCHES:
        path = tmp_path / f"{batch}.tar"
        path.write_bytes(make_tar(files=2))
        up = run_cli(
            ["transfer", "upload", str(path), "--batch-id", batch, "--progress", "none"], env=env
        )
        assert up.returncode == 0, up.stderr
    client = redis_lib.Redis.from_url(restartable_redis.url)
    worker_id = env["STAGERD_WORKER_ID"]
    worker = Proc(env, tmp_path / "worker.log", "gpu", "--prefetch", "1")
    try:
        wait_for(
            lambda: list(_states(database_url).values()).count("done") >= 1,
            120,
            "a first batch done",
            interval=0.5,
        )
        wait_for(
            lambda: (
                "processing" in phases(client, stagerd_env["STAGERD_QUEUE"], worker_id).values()
            ),
            60,
            "a batch in flight",
        )
        client.flushall()
        wait_for(lambda: worker.has("registration_lost"), 60, "the worker notices")
        lost = [b for b, s in _states(database_url).items() if s != "done"]
        assert lost, "everything finished before the FLUSHALL"
        result = run_cli(["reconcile", "--json"], env=env)
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        assert report["archives"] == 10
        # Everything not done at the time of the reconcile, and nothing done, re-enqueued.
        assert set(report["reenqueued"]) <= set(lost)
        wait_for(
            lambda: set(_states(database_url).values()) == {"done"},
            240,
            "all ten done",
            interval=0.5,
        )
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{worker.tail(80)}") from None
    finally:
        worker.kill()
    keys = QueueKeys(stagerd_env["STAGERD_QUEUE"])
    ledger = db.Ledger(database_url)
    try:
        assert all(len(ledger.results(b)) == 2 for b in BATCHES)
    finally:
        ledger.close()
    assert set(processor_runs(runs)) == set(BATCHES)
    assert client.llen(keys.pending) == 0 and client.llen(keys.processing(worker_id)) == 0
    # A second reconcile finds nothing to do.
    again = json.loads(run_cli(["reconcile", "--json"], env=env).stdout)
    assert again["reenqueued"] == [] and again["done_or_dead"] == 10


def test_reconcile_leaves_young_unenqueued_uploads_and_dry_run_changes_nothing(
    stagerd_env: dict[str, str],
    redis_client: Any,
    queue_name: str,
    database_url: str,
    run_cli: Any,
    tmp_path: Path,
) -> None:
    db.migrate(database_url)
    path = tmp_path / "a.tar"
    path.write_bytes(make_tar(files=1))
    base = ["transfer", "upload", str(path), "--progress", "none"]
    assert run_cli([*base, "--batch-id", "young", "--no-enqueue"], env=stagerd_env).returncode == 0
    assert run_cli([*base, "--batch-id", "lost"], env=stagerd_env).returncode == 0
    redis_client.delete(queue_name)  # the job of "lost" vanished
    dry = json.loads(run_cli(["reconcile", "--dry-run", "--json"], env=stagerd_env).stdout)
    assert dry["reenqueued"] == ["lost"] and dry["too_young"] == ["young"]
    assert redis_client.llen(queue_name) == 0
    done = run_cli(["reconcile", "--json", "--min-age", "0s"], env=stagerd_env)
    assert done.returncode == 0, done.stderr
    assert sorted(json.loads(done.stdout)["reenqueued"]) == ["lost", "young"]
    jobs = {
        json.loads(raw)["batch_id"]: json.loads(raw)
        for raw in redis_client.lrange(queue_name, 0, -1)
    }
    assert set(jobs) == {"lost", "young"}
    # The seed's payload, plus size and digest from the digest record in S3.
    assert {"batch_id", "s3_key", "file_count", "transferred_at"} <= set(jobs["lost"])
    assert jobs["lost"]["s3_key"] == "archives/lost.tar" and jobs["lost"]["file_count"] == 1
    assert jobs["lost"]["size"] == path.stat().st_size and len(jobs["lost"]["sha256"]) == 64
    # Nothing is enqueued twice: the jobs are in the queue now.
    again = json.loads(run_cli(["reconcile", "--json", "--min-age", "0s"], env=stagerd_env).stdout)
    assert again["reenqueued"] == [] and again["in_queues"] == 2
