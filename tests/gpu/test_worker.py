"""The worker loop in-process (``run(settings, options, stop)``) against real S3, Redis,
PostgreSQL and the shipped sample processor: the pipeline, poison input, retries and
dead-lettering, redelivery, shutdown semantics, reconnection."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from stagerd.db import ledger as db
from stagerd.gpu.worker import WorkerOptions, run
from stagerd.queue.keys import QueueKeys
from stagerd.retry import RetryPolicy
from tests.worker_support import (
    WAVINFO,
    dead_letters,
    make_tar,
    pending_ids,
    phases,
    put_batch,
    scratch_leftovers,
    wait_for,
)

FAST_STAGE = RetryPolicy(attempts=2, base=0.01, max_delay=0.05, total=5)


def options(**changes: Any) -> WorkerOptions:
    base: dict[str, Any] = {
        "burst": True,
        "processor": WAVINFO,
        "stage_policy": FAST_STAGE,
        "tick": 0.1,
        "reserve_timeout": 5.0,
    }
    return WorkerOptions(**{**base, **changes})


def run_in_thread(settings: Any, opts: WorkerOptions, stop: threading.Event) -> threading.Thread:
    errors: list[BaseException] = []

    def target() -> None:
        try:
            run(settings, opts, stop)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.errors = errors  # type: ignore[attr-defined]
    thread.start()
    return thread


def run_burst(settings: Any, opts: WorkerOptions, timeout: float = 60) -> None:
    stop = threading.Event()
    thread = run_in_thread(settings, opts, stop)
    thread.join(timeout)
    if thread.is_alive():
        stop.set()
        thread.join(30)
        pytest.fail(f"worker did not finish within {timeout}s")
    if thread.errors:  # type: ignore[attr-defined]
        raise thread.errors[0]  # type: ignore[attr-defined]


@pytest.fixture
def ledger(database_url: str) -> Any:
    db.migrate(database_url)
    ledger = db.Ledger(database_url)
    yield ledger
    ledger.close()


def assert_quiet(redis: Any, queue: str, worker: str, scratch: Path) -> None:
    keys = QueueKeys(queue)
    assert redis.llen(keys.pending) == 0
    assert redis.llen(keys.processing(worker)) == 0
    assert scratch_leftovers(scratch) == []


def test_end_to_end_batches_are_done_once_with_results(
    settings: Any,
    s3_client: Any,
    s3_bucket: str,
    redis_client: Any,
    queue_name: str,
    ledger: db.Ledger,
    scratch_dir: Path,
) -> None:
    for i in range(3):
        put_batch(s3_client, redis_client, s3_bucket, queue_name, f"b{i}", make_tar(files=2 + i))
    run_burst(settings, options(prefetch=1))
    for i in range(3):
        row = ledger.batch(f"b{i}")
        assert row is not None and row.state == "done", row
        assert row.file_count == 2 + i and row.archive_bytes and row.extracted_bytes
        assert row.stage_seconds is not None and row.process_seconds is not None
        items = ledger.results(f"b{i}")
        assert len(items) == 2 + i
        assert all(item.endswith(".wav") for item, _ in items)
    assert dead_letters(redis_client, queue_name) == []
    assert_quiet(redis_client, queue_name, settings.worker_id, scratch_dir)
    assert not redis_client.exists(QueueKeys(queue_name).heartbeat(settings.worker_id))

    # Redelivery of a done batch: acknowledged and skipped, no duplicate rows.
    put_batch(s3_client, redis_client, s3_bucket, queue_name, "b0", make_tar(files=2))
    run_burst(settings, options())
    assert len(ledger.results("b0")) == 2
    assert ledger.batch("b0").attempts == 1  # type: ignore[union-attr]
    assert_quiet(redis_client, queue_name, settings.worker_id, scratch_dir)


def test_poison_input_is_dead_lettered_and_the_worker_carries_on(
    settings: Any,
    s3_client: Any,
    s3_bucket: str,
    redis_client: Any,
    queue_name: str,
    ledger: db.Ledger,
    scratch_dir: Path,
) -> None:
    redis_client.rpush(queue_name, b"{not json")
    redis_client.rpush(queue_name, b'{"s3_key": "archives/x.tar"}')
    redis_client.rpush(queue_name, b'{"batch_id": "../etc", "s3_key": "archives/../etc.tar"}')
    put_batch(s3_client, redis_client, s3_bucket, queue_name, "missing", b"", enqueue=True)
    s3_client.delete_object(Bucket=s3_bucket, Key="archives/missing.tar")
    put_batch(s3_client, redis_client, s3_bucket, queue_name, "corrupt", os.urandom(20000))
    put_batch(
        s3_client, redis_client, s3_bucket, queue_name, "mismatch", make_tar(), sha256="0" * 64
    )
    put_batch(s3_client, redis_client, s3_bucket, queue_name, "good", make_tar(files=2))
    run_burst(settings.replace(max_attempts=2), options())

    dead = dead_letters(redis_client, queue_name)
    by_batch = {d["batch_id"]: d for d in dead}
    assert len(dead) == 6, dead
    assert sum(1 for d in dead if d["batch_id"] is None) == 3
    assert "not JSON" in dead[0]["error"]
    assert "batch_id" in dead[1]["error"]
    assert set(by_batch) == {None, "missing", "corrupt", "mismatch"}
    for name in ("missing", "corrupt", "mismatch"):
        assert by_batch[name]["attempts"] == 1, by_batch[name]  # permanent: no retries
        assert ledger.batch(name).state == "dead"  # type: ignore[union-attr]
    assert (
        "sha" in by_batch["mismatch"]["error"].lower()
        or "digest" in by_batch["mismatch"]["error"].lower()
    )
    assert ledger.batch("good").state == "done"  # type: ignore[union-attr]
    assert len(ledger.recent_failures(20)) == 6
    assert_quiet(redis_client, queue_name, settings.worker_id, scratch_dir)


@pytest.mark.parametrize("failure", ["exit", "timeout"])
def test_processor_failure_reaches_dead_letter_after_max_attempts(
    failure: str,
    settings: Any,
    s3_client: Any,
    s3_bucket: str,
    redis_client: Any,
    queue_name: str,
    ledger: db.Ledger,
    scratch_dir: Path,
) -> None:
    put_batch(s3_client, redis_client, s3_bucket, queue_name, "bad", make_tar())
    processor = f"{WAVINFO} --fail" if failure == "exit" else f"{WAVINFO} --sleep 30"
    run_burst(
        settings.replace(max_attempts=3, process_timeout=1.0),
        options(processor=processor),
        timeout=90,
    )
    (dead,) = dead_letters(redis_client, queue_name)
    assert dead["batch_id"] == "bad" and dead["attempts"] == 3
    assert "processing failed" in dead["error"]
    row = ledger.batch("bad")
    assert row is not None and row.state == "dead" and row.attempts == 3
    history = [f for f in ledger.recent_failures(10) if f.batch_id == "bad"]
    assert [f.outcome for f in history] == ["dead", "requeued", "requeued"]
    assert ledger.results("bad") == []
    assert_quiet(redis_client, queue_name, settings.worker_id, scratch_dir)


def test_keep_failed_keeps_the_dead_batch_dir(
    settings: Any,
    s3_client: Any,
    s3_bucket: str,
    redis_client: Any,
    queue_name: str,
    scratch_dir: Path,
) -> None:
    put_batch(s3_client, redis_client, s3_bucket, queue_name, "kept", make_tar())
    run_burst(
        settings.replace(max_attempts=1), options(processor=f"{WAVINFO} --fail", keep_failed=True)
    )
    assert scratch_leftovers(scratch_dir) == ["kept"]
    assert (scratch_dir / "kept" / "input").is_dir()


def test_over_budget_archive_is_dead_lettered_at_once(
    settings: Any,
    s3_client: Any,
    s3_bucket: str,
    redis_client: Any,
    queue_name: str,
    ledger: db.Ledger,
    scratch_dir: Path,
) -> None:
    put_batch(s3_client, redis_client, s3_bucket, queue_name, "huge", make_tar(files=4, seconds=4))
    put_batch(s3_client, redis_client, s3_bucket, queue_name, "small", make_tar(files=1))
    run_burst(settings.replace(scratch_budget=100_000), options())
    (dead,) = dead_letters(redis_client, queue_name)
    assert dead["batch_id"] == "huge" and dead["attempts"] == 1
    assert "budget" in dead["error"].lower()
    assert ledger.batch("small").state == "done"  # type: ignore[union-attr]
    assert_quiet(redis_client, queue_name, settings.worker_id, scratch_dir)


def test_concurrency_two_shares_one_budget(
    settings: Any,
    s3_client: Any,
    s3_bucket: str,
    redis_client: Any,
    queue_name: str,
    ledger: db.Ledger,
    scratch_dir: Path,
) -> None:
    for i in range(5):
        put_batch(s3_client, redis_client, s3_bucket, queue_name, f"c{i}", make_tar(files=2))
    metrics = scratch_dir.parent / "textfile" / "stagerd.prom"
    run_burst(
        settings.replace(metrics_file=metrics),
        options(concurrency=2, processor=f"{WAVINFO} --sleep 0.3"),
    )
    assert ledger.count_by_state() == {"done": 5}
    text = (metrics.parent / "stagerd-gpu.prom").read_text()
    assert 'stagerd_batches_total{outcome="done"} 5.0' in text
    assert 'stagerd_phase_seconds_count{phase="processing"} 5.0' in text
    assert_quiet(redis_client, queue_name, settings.worker_id, scratch_dir)


def _start_processing(settings: Any, opts: WorkerOptions, redis_client: Any, queue_name: str):
    stop = threading.Event()
    thread = run_in_thread(settings, opts, stop)
    wait_for(
        lambda: phases(redis_client, queue_name, settings.worker_id).get("p0") == "processing",
        30,
        "p0 processing",
    )
    return stop, thread


def test_stop_drains_the_processing_batch(
    settings: Any,
    s3_client: Any,
    s3_bucket: str,
    redis_client: Any,
    queue_name: str,
    ledger: db.Ledger,
    scratch_dir: Path,
) -> None:
    for i in range(3):
        put_batch(s3_client, redis_client, s3_bucket, queue_name, f"p{i}", make_tar())
    opts = options(burst=False, prefetch=1, processor=f"{WAVINFO} --sleep 2", drain_timeout=20)
    stop, thread = _start_processing(settings, opts, redis_client, queue_name)
    wait_for(
        lambda: phases(redis_client, queue_name, settings.worker_id).get("p1") == "staged",
        20,
        "p1 prefetched",
    )
    stop.set()
    # The prefetched batch goes back to the head at once, before p0 finishes draining.
    wait_for(lambda: pending_ids(redis_client, queue_name) == ["p1", "p2"], 5, "p1 requeued")
    assert ledger.batch("p0").state == "processing"  # type: ignore[union-attr]
    thread.join(30)
    assert not thread.is_alive() and not thread.errors  # type: ignore[attr-defined]
    assert ledger.batch("p0").state == "done"  # type: ignore[union-attr]
    assert ledger.batch("p1").state == "requeued"  # type: ignore[union-attr]
    # Handing back is not a failed attempt.
    assert redis_client.hget(QueueKeys(queue_name).attempts, "p1") in (None, b"0")
    assert scratch_leftovers(scratch_dir) == []


def test_drain_timeout_kills_and_requeues(
    settings: Any,
    s3_client: Any,
    s3_bucket: str,
    redis_client: Any,
    queue_name: str,
    ledger: db.Ledger,
    scratch_dir: Path,
) -> None:
    put_batch(s3_client, redis_client, s3_bucket, queue_name, "p0", make_tar())
    opts = options(burst=False, processor=f"{WAVINFO} --sleep 30", drain_timeout=0.5)
    stop, thread = _start_processing(settings, opts, redis_client, queue_name)
    started = time.monotonic()
    stop.set()
    thread.join(20)
    assert not thread.is_alive() and not thread.errors  # type: ignore[attr-defined]
    assert time.monotonic() - started < 15
    assert pending_ids(redis_client, queue_name) == ["p0"]
    assert ledger.batch("p0").state == "requeued"  # type: ignore[union-attr]
    assert dead_letters(redis_client, queue_name) == []
    assert scratch_leftovers(scratch_dir) == []


def test_postgres_connection_lost_mid_job_is_not_lost(
    settings: Any,
    s3_client: Any,
    s3_bucket: str,
    redis_client: Any,
    queue_name: str,
    ledger: db.Ledger,
    database_url: str,
    scratch_dir: Path,
) -> None:
    put_batch(s3_client, redis_client, s3_bucket, queue_name, "p0", make_tar(files=2))
    opts = options(processor=f"{WAVINFO} --sleep 1.5")
    _stop, thread = _start_processing(settings, opts, redis_client, queue_name)
    with psycopg.connect(database_url, autocommit=True) as admin:
        killed = admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
            (f"stagerd-{settings.worker_id}",),
        ).fetchall()
    assert killed, "the worker's PostgreSQL connection was not found"
    thread.join(30)
    assert not thread.is_alive() and not thread.errors  # type: ignore[attr-defined]
    assert ledger.batch("p0").state == "done"  # type: ignore[union-attr]
    assert len(ledger.results("p0")) == 2
    assert_quiet(redis_client, queue_name, settings.worker_id, scratch_dir)


class OwnRedis:
    """A private redis-server (AOF, fsync always) that the test may restart."""

    def __init__(self, directory: Path) -> None:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.directory = directory
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        import redis

        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir",
             str(self.directory), "--appendonly", "yes", "--appendfsync", "always",
             "--save", ""],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        client = redis.Redis.from_url(self.url)
        wait_for(lambda: _pings(client), 10, "redis-server up")
        client.close()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


def _pings(client: Any) -> bool:
    import redis

    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


def test_redis_restart_mid_job_loses_nothing(
    settings: Any,
    s3_client: Any,
    s3_bucket: str,
    queue_name: str,
    ledger: db.Ledger,
    scratch_dir: Path,
    tmp_path: Path,
) -> None:
    import redis

    server = OwnRedis(tmp_path)
    server.start()
    try:
        client = redis.Redis.from_url(server.url)
        for i in range(2):
            put_batch(s3_client, client, s3_bucket, queue_name, f"p{i}", make_tar(files=2))
        own = settings.replace(redis_url=server.url)
        opts = options(processor=f"{WAVINFO} --sleep 2", prefetch=0)
        _stop, thread = _start_processing(own, opts, client, queue_name)
        server.stop()  # mid-processing: Redis gone for about a second
        time.sleep(1)
        server.start()
        thread.join(60)
        assert not thread.is_alive() and not thread.errors  # type: ignore[attr-defined]
        assert ledger.count_by_state() == {"done": 2}
        assert len(ledger.results("p0")) == 2
        assert dead_letters(client, queue_name) == []
        assert_quiet(client, queue_name, settings.worker_id, scratch_dir)
        client.close()
    finally:
        server.stop()
