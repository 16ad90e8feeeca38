"""Stopping never waits on an unreachable service (issue 14): ``systemctl stop`` with Redis
or PostgreSQL down must end with a clean exit, not a watchdog kill.

Through a real ``stagerd gpu`` process on private servers: a batch processing and one
prefetched, the service stopped, SIGTERM. The worker exits 0 with a log line saying what it
left for recovery; once the service is back, a restarted worker finishes both batches,
each exactly once, and scratch ends empty.

The guard itself (stagerd.shutdown) is pure logic and tested with a failing callable.
"""

from __future__ import annotations

import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest
import redis

from stagerd.db import ledger as db
from stagerd.errors import PermanentError, ServiceUnavailable
from stagerd.queue.keys import QueueKeys
from stagerd.retry import RetryPolicy
from stagerd.shutdown import SHUTDOWN_ATTEMPTS, LeftForRecovery, ShutdownGuard
from tests.worker_support import (
    WAVINFO,
    make_tar,
    phases,
    put_batch,
    scratch_leftovers,
    start_worker,
    wait_for,
)

FAST = RetryPolicy(attempts=50, base=0.001, max_delay=0.001, total=60.0)


class Failing:
    """A callable that raises *exc* on every call and counts the calls."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1
        raise self.exc


def test_before_stop_the_service_policy_applies_in_full() -> None:
    guard = ShutdownGuard(threading.Event())
    fn = Failing(ServiceUnavailable("down"))
    with pytest.raises(ServiceUnavailable):
        guard.call(FAST, fn, what="op", service="Redis")
    assert fn.calls == 50


def test_once_stopping_calls_are_bounded_and_a_dead_service_is_given_up() -> None:
    stop = threading.Event()
    stop.set()
    guard = ShutdownGuard(stop)
    first = Failing(ServiceUnavailable("connection refused"))
    with pytest.raises(LeftForRecovery, match="Redis unreachable"):
        guard.call(FAST, first, what="queue ack", service="Redis")
    assert first.calls == SHUTDOWN_ATTEMPTS
    # The next call to the same service is not attempted at all; another service still is.
    second = Failing(ServiceUnavailable("connection refused"))
    with pytest.raises(LeftForRecovery, match="skipped"):
        guard.call(FAST, second, what="queue requeue", service="Redis")
    assert second.calls == 0
    third = Failing(ServiceUnavailable("down"))
    with pytest.raises(LeftForRecovery):
        guard.call(FAST, third, what="ledger", service="PostgreSQL")
    assert third.calls == SHUTDOWN_ATTEMPTS


def test_permanent_errors_pass_through_while_stopping() -> None:
    stop = threading.Event()
    stop.set()
    guard = ShutdownGuard(stop)
    with pytest.raises(PermanentError):
        guard.call(FAST, Failing(PermanentError("bad")), what="op", service="Redis")
    # A permanent error says nothing about reachability: the service is not given up.
    assert guard.call(FAST, lambda: 7, what="op", service="Redis") == 7


def test_a_retry_cut_short_by_stop_gets_its_bounded_attempt() -> None:
    stop = threading.Event()
    guard = ShutdownGuard(stop)
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) == 3:
            stop.set()  # SIGTERM arrives while the call is being retried
        if len(calls) < 5:
            raise ServiceUnavailable("restarting")
        return "ok"

    assert guard.call(FAST, flaky, what="op", service="Redis") == "ok"
    assert len(calls) == 5  # 3 under the service policy, then 2 bounded ones


@pytest.fixture
def slow_env(stagerd_env: dict[str, str]) -> dict[str, str]:
    return {
        **stagerd_env,
        "STAGERD_PROCESSOR": f"{WAVINFO} --sleep 8",
        "STAGERD_HEARTBEAT_TTL": "3s",
    }


def _processing_and_prefetched(client: Any, queue: str, worker: str) -> bool:
    values = set(phases(client, queue, worker).values())
    return values == {"processing", "staged"}


def _sigterm(worker: subprocess.Popen[str]) -> str:
    worker.send_signal(signal.SIGTERM)
    # TimeoutStopSec is the drain timeout + 60 s and WatchdogSec 2 min: a stop must end
    # well inside both however long the service stays down.
    _out, err = worker.communicate(timeout=100)
    assert worker.returncode == 0, err[-4000:]
    assert "Traceback" not in err, err[-4000:]
    return err


def _finish_and_check(
    env: dict[str, str], client: Any, queue: str, database_url: str, scratch: Path
) -> None:
    worker = start_worker(env, "--burst")
    _out, err = worker.communicate(timeout=120)
    assert worker.returncode == 0, err[-4000:]
    ledger = db.Ledger(database_url)
    try:
        assert ledger.count_by_state() == {"done": 2}
        assert len(ledger.results("s0")) == 3 and len(ledger.results("s1")) == 3
    finally:
        ledger.close()
    keys = QueueKeys(queue)
    assert client.llen(keys.pending) == 0
    assert client.llen(keys.processing(env["STAGERD_WORKER_ID"])) == 0
    assert client.llen(keys.dead) == 0
    assert scratch_leftovers(scratch) == []


def test_stop_with_redis_down_exits_cleanly_and_loses_nothing(
    slow_env: dict[str, str],
    restartable_redis: Any,
    s3_client: Any,
    s3_bucket: str,
    queue_name: str,
    database_url: str,
    scratch_dir: Path,
) -> None:
    client = redis.Redis.from_url(restartable_redis.url)
    env = {**slow_env, "REDIS_URL": restartable_redis.url}
    for i in range(2):
        put_batch(s3_client, client, s3_bucket, queue_name, f"s{i}", make_tar(files=3))
    worker = start_worker(env, "--prefetch", "1", "--drain-timeout", "2s")
    wid = env["STAGERD_WORKER_ID"]
    try:
        wait_for(lambda: _processing_and_prefetched(client, queue_name, wid), 60, "two in flight")
    except AssertionError:
        worker.kill()
        raise AssertionError(worker.communicate(timeout=10)[1][-4000:]) from None
    restartable_redis.stop()
    err = _sigterm(worker)
    assert "stays in the processing list for recovery" in err
    assert "stopping without deregistering" in err
    restartable_redis.start()
    _finish_and_check(env, client, queue_name, database_url, scratch_dir)
    client.close()


def test_stop_with_postgres_down_exits_cleanly_and_loses_nothing(
    slow_env: dict[str, str],
    restartable_postgres: Any,
    s3_client: Any,
    s3_bucket: str,
    redis_client: Any,
    queue_name: str,
    scratch_dir: Path,
) -> None:
    url = restartable_postgres.url
    env = {**slow_env, "DATABASE_URL": url}
    for i in range(2):
        put_batch(s3_client, redis_client, s3_bucket, queue_name, f"s{i}", make_tar(files=3))
    worker = start_worker(env, "--prefetch", "1", "--drain-timeout", "2s")
    wid = env["STAGERD_WORKER_ID"]
    try:
        wait_for(
            lambda: _processing_and_prefetched(redis_client, queue_name, wid), 60, "two in flight"
        )
    except AssertionError:
        worker.kill()
        raise AssertionError(worker.communicate(timeout=10)[1][-4000:]) from None
    restartable_postgres.stop()
    err = _sigterm(worker)
    assert "PostgreSQL unreachable" in err
    restartable_postgres.start()
    _finish_and_check(env, redis_client, queue_name, url, scratch_dir)
