"""Leases and fencing (issue 17): tokens at pickup, a ledger that refuses older tokens
inside the commit transaction, heartbeats that re-assert the registration, recovery that
finds processing lists by scanning. Real Redis and PostgreSQL."""

from __future__ import annotations

from typing import Any

import pytest

from stagerd.db import ledger as db
from stagerd.errors import LeaseLost
from stagerd.job import Job
from stagerd.queue.keys import QueueKeys
from stagerd.queue.lease import Fence, LeaseBook
from stagerd.queue.orphans import recover_orphans
from stagerd.queue.redis_queue import ReliableQueue
from stagerd.retry import RetryPolicy
from tests.worker_support import wait_for

FAST = RetryPolicy(attempts=2, base=0.05, max_delay=0.1, total=2.0, classify=db.is_db_transient)


@pytest.fixture
def ledger(database_url: str) -> Any:
    db.migrate(database_url)
    ledger = db.Ledger(database_url, policy=FAST)
    yield ledger
    ledger.close()


def test_commit_with_an_older_token_is_refused(ledger: Any) -> None:
    assert ledger.begin("b1", "archives/b1.tar", worker="zombie", sha256=None, lease=5)
    # Recovery gave the batch to another worker: its pickup carries a newer token.
    assert ledger.begin("b1", "archives/b1.tar", worker="alive", sha256=None, lease=6)
    with pytest.raises(LeaseLost):
        ledger.commit_results("b1", [("z", {"by": "zombie"})], lease=5)
    assert ledger.results("b1") == []
    assert ledger.commit_results("b1", [("a", {"by": "alive"})], lease=6) is True
    row = ledger.batch("b1")
    assert row.state == "done" and row.lease == 6
    assert ledger.results("b1") == [("a", {"by": "alive"})]


def test_a_late_claim_with_an_older_token_is_refused(ledger: Any) -> None:
    assert ledger.begin("b2", "archives/b2.tar", worker="new", sha256=None, lease=9)
    with pytest.raises(LeaseLost):
        ledger.begin("b2", "archives/b2.tar", worker="stalled", sha256=None, lease=8)
    # The zombie's state writes do not touch the row either.
    ledger.mark_requeued("b2", "zombie shutting down", lease=8)
    ledger.record_failure("b2", "zombie failed", outcome="dead", lease=8)
    row = ledger.batch("b2")
    assert (row.state, row.worker, row.lease) == ("staging", "new", 9)
    assert ledger.max_lease() == 9


def test_pickups_carry_increasing_tokens_and_beats_reassert_registration(
    redis_client: Any, queue_name: str
) -> None:
    keys = QueueKeys(queue_name)
    queue = ReliableQueue(redis_client, keys, "w-a", heartbeat_ttl=5)
    queue.register()
    for batch in ("x1", "x2"):
        redis_client.rpush(keys.pending, Job.new(batch).to_json())
    first, second = queue.pop(0.1), queue.pop(0.1)
    assert first is not None and second is not None
    assert 0 < first.lease < second.lease
    assert queue.heartbeat().lost is False
    # Recovery drops a worker from the set (it stalled); the next beat says so and
    # registers it again.
    redis_client.srem(keys.workers, "w-a")
    beat = queue.heartbeat()
    assert beat.lost is True and beat.twin is None
    assert redis_client.sismember(keys.workers, "w-a")
    # A second process with the same id: our key holds its token.
    redis_client.set(keys.heartbeat("w-a"), "other-token")
    assert queue.heartbeat().twin == "other-token"


def test_recovery_finds_a_processing_list_outside_the_workers_set(
    redis_client: Any, queue_name: str
) -> None:
    keys = QueueKeys(queue_name)
    queue = ReliableQueue(redis_client, keys, "w-gone", heartbeat_ttl=0.3)
    queue.register()
    redis_client.rpush(keys.pending, Job.new("lost-1").to_json())
    assert queue.pop(0.1) is not None
    # The bug of issue 17: recovered once, removed from the set, then died with a job.
    redis_client.srem(keys.workers, "w-gone")
    wait_for(lambda: not redis_client.exists(keys.heartbeat("w-gone")), 10, "expiry")
    report = recover_orphans(redis_client, keys, max_attempts=3)
    assert report.dead_workers == ["w-gone"] and report.requeued == ["lost-1"]
    assert redis_client.llen(keys.processing("w-gone")) == 0


def test_lease_book_fences_only_batches_recovery_took(redis_client: Any, queue_name: str) -> None:
    import threading

    keys = QueueKeys(queue_name)
    queue = ReliableQueue(redis_client, keys, "w-b", heartbeat_ttl=5)
    queue.register()
    for batch in ("taken", "kept"):
        redis_client.rpush(keys.pending, Job.new(batch).to_json())
    taken, kept = queue.pop(0.1), queue.pop(0.1)
    assert taken is not None and kept is not None
    stop = threading.Event()
    book = LeaseBook()
    fences = {"taken": Fence(stop), "kept": Fence(stop)}
    book.hold(taken, fences["taken"])
    book.hold(kept, fences["kept"])
    redis_client.lrem(keys.processing("w-b"), 1, taken.raw)  # what recovery did
    assert book.check(queue) == ["taken"]
    assert fences["taken"].lost and fences["taken"].is_set()
    assert not fences["kept"].is_set()
    stop.set()  # the parent (worker stop) reaches every fence, but is not a lost lease
    assert fences["kept"].is_set() and not fences["kept"].lost
