"""Redis and PostgreSQL restarted in the middle of a run of batches (issue 8).

One real ``stagerd gpu`` process works through 8 batches with a slow-ish processor while
the test restarts its private Redis (durable AOF) or PostgreSQL twice, once cleanly and
once as a crash. Afterwards: every batch is ``done`` exactly once with one result row per
file, nothing is pending, in flight or dead-lettered, scratch is empty, and the worker that
rode through both restarts is the very same process (it recovered, nobody restarted it).
"""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis

from stagerd.db import ledger as db
from stagerd.queue.keys import QueueKeys
from tests.worker_support import (
    WAVINFO,
    dead_letters,
    make_tar,
    put_batch,
    scratch_leftovers,
    start_worker,
    wait_for,
)

BATCHES = 8
FILES = 3


def _done(database_url: str) -> int:
    """Batches ``done`` in the ledger; -1 while PostgreSQL is away (a restart in progress)."""
    try:
        with psycopg.connect(database_url, connect_timeout=2) as conn:
            row = conn.execute(
                "SELECT count(*) FROM stagerd_batches WHERE state = 'done'"
            ).fetchone()
    except psycopg.Error:
        return -1
    return int(row[0]) if row else 0


def _postmaster_started(database_url: str) -> str:
    with psycopg.connect(database_url, connect_timeout=5) as conn:
        row = conn.execute("SELECT pg_postmaster_start_time()::text").fetchone()
    return str(row[0]) if row else ""


def _run_with_restarts(
    env: dict[str, str],
    client: Any,
    s3_client: Any,
    bucket: str,
    queue: str,
    database_url: str,
    restarts: list[tuple[int, Callable[[], None]]],
    identity: Callable[[], str],
) -> subprocess.Popen[str]:
    """Queue the batches, start one worker, apply each restart once *n* batches are done,
    wait for all of them; the worker is returned still running (asserted alive throughout)."""
    for i in range(BATCHES):
        put_batch(s3_client, client, bucket, queue, f"r{i}", make_tar(files=FILES))
    worker = start_worker(env, "--prefetch", "1")
    seen = [identity()]
    try:
        for after, restart in restarts:
            wait_for(lambda n=after: _done(database_url) >= n, 40, f"{after} batches done")  # type: ignore[misc]
            assert worker.poll() is None, "worker died before the restart"
            restart()
            seen.append(identity())
            assert worker.poll() is None, "worker died during the restart"
        wait_for(lambda: _done(database_url) == BATCHES, 50, "all batches done", interval=0.2)
        assert worker.poll() is None, "worker died"
        assert len(set(seen)) == len(restarts) + 1, seen  # the server really restarted
    except AssertionError:
        worker.kill()
        _out, err = worker.communicate(timeout=10)
        raise AssertionError(f"worker log tail:\n{err[-4000:]}") from None
    return worker


def _stop(worker: subprocess.Popen[str]) -> str:
    worker.send_signal(signal.SIGTERM)
    _out, err = worker.communicate(timeout=30)
    assert worker.returncode == 0, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    return err


def _assert_exactly_once(database_url: str) -> None:
    ledger = db.Ledger(database_url)
    try:
        assert ledger.count_by_state() == {"done": BATCHES}
        for i in range(BATCHES):
            items = ledger.results(f"r{i}")
            assert len(items) == FILES, (f"r{i}", items)
            assert len({item for item, _ in items}) == FILES  # no duplicate result rows
    finally:
        ledger.close()


def _assert_quiet(client: Any, queue: str, worker_id: str, scratch: Path) -> None:
    keys = QueueKeys(queue)
    assert client.llen(keys.pending) == 0
    assert client.llen(keys.processing(worker_id)) == 0
    assert dead_letters(client, queue) == []
    assert scratch_leftovers(scratch) == []


@pytest.fixture
def worker_env(stagerd_env: dict[str, str]) -> dict[str, str]:
    return {
        **stagerd_env,
        "STAGERD_PROCESSOR": f"{WAVINFO} --sleep 0.7",
        "STAGERD_HEARTBEAT_TTL": "2s",
    }


def test_redis_restarted_twice_mid_run_loses_and_duplicates_nothing(
    worker_env: dict[str, str],
    restartable_redis: Any,
    s3_client: Any,
    s3_bucket: str,
    queue_name: str,
    database_url: str,
    scratch_dir: Path,
) -> None:
    client = redis.Redis.from_url(restartable_redis.url)
    env = {**worker_env, "REDIS_URL": restartable_redis.url}
    worker = _run_with_restarts(
        env,
        client,
        s3_client,
        s3_bucket,
        queue_name,
        database_url,
        [
            (2, lambda: restartable_redis.restart(down_for=1.5)),
            (5, lambda: restartable_redis.restart(down_for=1.0, crash=True)),
        ],
        lambda: str(client.info("server")["run_id"]),
    )
    _stop(worker)
    _assert_exactly_once(database_url)
    _assert_quiet(client, queue_name, env["STAGERD_WORKER_ID"], scratch_dir)
    client.close()


def test_postgres_restarted_twice_mid_run_loses_and_duplicates_nothing(
    worker_env: dict[str, str],
    restartable_postgres: Any,
    s3_client: Any,
    s3_bucket: str,
    redis_client: Any,
    queue_name: str,
    scratch_dir: Path,
) -> None:
    url = restartable_postgres.url
    env = {**worker_env, "DATABASE_URL": url}
    worker = _run_with_restarts(
        env,
        redis_client,
        s3_client,
        s3_bucket,
        queue_name,
        url,
        [
            (2, lambda: restartable_postgres.restart(mode="fast", down_for=1.5)),
            (5, lambda: restartable_postgres.restart(mode="immediate", down_for=1.0)),
        ],
        lambda: _postmaster_started(url),
    )
    _stop(worker)
    _assert_exactly_once(url)
    _assert_quiet(redis_client, queue_name, env["STAGERD_WORKER_ID"], scratch_dir)
