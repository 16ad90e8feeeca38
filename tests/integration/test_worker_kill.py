"""SIGKILL the worker in each phase (download, extract, process, commit; and with a batch
prefetched), restart it: every batch ends ``done`` exactly once with its results, nothing
is left on scratch or in the queue.

The kill takes the worker's whole process tree, as systemd's cgroup kill does. A slow S3
link (throttling proxy) stretches staging so the kill lands inside the phase; the commit
phase is held open by a row lock the test takes, so the kill lands inside the transaction.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import psycopg
import pytest

from stagerd.db import ledger as db
from stagerd.queue.keys import QueueKeys
from tests.faultproxy import FaultProxy
from tests.worker_support import (
    WAVINFO,
    dead_letters,
    make_tar,
    phases,
    put_batch,
    scratch_leftovers,
    start_worker,
    wait_for,
)

FILES = 12
# ~3.8 MB per batch through a 1 MB/s link: ~4 s of staging, data arriving in the stager's
# 1 MiB reads, so each phase lasts long enough to be hit.
RATE = 1_000_000


def descendants(pid: int) -> list[int]:
    """*pid* and every process below it (from /proc), children first."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out: list[int] = []
    stack = [pid]
    while stack:
        current = stack.pop()
        out.append(current)
        stack.extend(children.get(current, []))
    return out[::-1]


def kill_tree(proc: subprocess.Popen[str]) -> None:
    for pid in descendants(proc.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait(10)


def _batch_files(scratch: Path, batch: str, sub: str) -> list[Path]:
    path = scratch / batch / sub
    try:
        return [p for p in path.iterdir() if p.is_file()] if path.is_dir() else []
    except OSError:
        return []


def _lock_waiter(database_url: str, app: str) -> bool:
    with psycopg.connect(database_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s"
            " AND wait_event_type = 'Lock'",
            (app,),
        ).fetchone()
    return bool(row and row[0])


@pytest.mark.parametrize("phase", ["download", "extract", "process", "commit", "prefetched"])
def test_sigkill_in_each_phase_then_restart(
    phase: str,
    stagerd_env: dict[str, str],
    s3_server: Any,
    s3_client: Any,
    s3_bucket: str,
    redis_client: Any,
    queue_name: str,
    database_url: str,
    scratch_dir: Path,
) -> None:
    worker = stagerd_env["STAGERD_WORKER_ID"]
    env = {**stagerd_env, "STAGERD_HEARTBEAT_TTL": "2s", "STAGERD_PROCESSOR": WAVINFO}
    bodies = {f"k{i}": make_tar(files=FILES, seconds=20) for i in range(2)}
    for batch, body in bodies.items():
        put_batch(s3_client, redis_client, s3_bucket, queue_name, batch, body)

    proxy = FaultProxy(s3_server.endpoint, throttle_down=RATE).start()
    args = ["--prefetch", "1" if phase == "prefetched" else "0"]
    if phase == "download":
        args.append("--keep-archive")
    if phase in ("process", "commit"):
        env["STAGERD_PROCESSOR"] = f"{WAVINFO} --sleep 4"
    if phase == "prefetched":  # processing outlasts the next batch's ~4 s staging
        env["STAGERD_PROCESSOR"] = f"{WAVINFO} --sleep 8"
    first = start_worker({**env, "S3_ENDPOINT": proxy.endpoint}, *args)
    lock: list[psycopg.Connection[Any]] = []
    try:
        in_phase = phases_of(redis_client, queue_name, worker)
        _reach(phase, in_phase, scratch_dir, database_url, f"stagerd-{worker}", lock)
        kill_tree(first)
    except AssertionError:
        kill_tree(first)
        raise AssertionError(f"worker log:\n{first.stderr.read()[-4000:]}") from None  # type: ignore[union-attr]
    finally:
        if first.poll() is None:
            kill_tree(first)
        for conn in lock:
            conn.rollback()
            conn.close()
        proxy.stop()

    keys = QueueKeys(queue_name)
    assert redis_client.llen(keys.processing(worker)) >= 1  # the killed job is in flight

    second = start_worker({**env, "STAGERD_PROCESSOR": WAVINFO}, "--burst")
    _out, err = second.communicate(timeout=120)
    assert second.returncode == 0, err[-3000:]

    ledger = db.Ledger(database_url)
    try:
        for batch in bodies:
            row = ledger.batch(batch)
            assert row is not None and row.state == "done", (batch, row)
            items = ledger.results(batch)
            assert len(items) == FILES and len({i for i, _ in items}) == FILES
        assert ledger.batch("k0").attempts == 2  # type: ignore[union-attr]
    finally:
        ledger.close()
    assert redis_client.llen(keys.pending) == 0
    assert redis_client.llen(keys.processing(worker)) == 0
    assert dead_letters(redis_client, queue_name) == []
    assert scratch_leftovers(scratch_dir) == []


def _reach(
    phase: str,
    in_phase: Any,
    scratch_dir: Path,
    database_url: str,
    worker_app: str,
    lock: list[psycopg.Connection[Any]],
) -> None:
    """Return once the first batch (k0) is inside *phase*."""
    if phase == "download":
        # The keep-archive download writes archive.tar.part, renamed when complete.
        part = scratch_dir / "k0" / "archive.tar.part"
        wait_for(lambda: part.exists() and part.stat().st_size > 0, 30, "download")
        assert not _batch_files(scratch_dir, "k0", "input")
    elif phase == "extract":
        wait_for(lambda: _batch_files(scratch_dir, "k0", "input"), 30, "extraction")
        assert in_phase().get("k0") == "staging"
    elif phase == "process":
        wait_for(lambda: in_phase().get("k0") == "processing", 30, "processing")
    elif phase == "commit":
        wait_for(lambda: in_phase().get("k0") == "processing", 30, "processing")
        conn = psycopg.connect(database_url)
        lock.append(conn)
        # Hold the row: the worker's commit transaction blocks inside, where we kill it.
        conn.execute("SELECT 1 FROM stagerd_batches WHERE batch_id = 'k0' FOR UPDATE")
        wait_for(lambda: in_phase().get("k0") == "committing", 30, "committing")
        wait_for(lambda: _lock_waiter(database_url, worker_app), 10, "commit tx")
    else:
        wait_for(lambda: in_phase() == {"k0": "processing", "k1": "staged"}, 30, "k1 prefetched")


def phases_of(redis: Any, queue: str, worker: str) -> Any:
    return lambda: phases(redis, queue, worker)
