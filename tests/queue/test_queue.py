"""The reliable queue against a real Redis."""

from __future__ import annotations

import json
import threading

import pytest

from stagerd.errors import ServiceUnavailable
from stagerd.job import Job
from stagerd.queue import trail
from stagerd.queue.keys import QueueKeys
from stagerd.queue.orphans import recover_orphans
from stagerd.queue.redis_queue import ReliableQueue, connect, enqueue_once


@pytest.fixture
def keys(queue_name: str) -> QueueKeys:
    return QueueKeys(queue_name)


def _queue(redis_url: str, keys: QueueKeys, worker: str, ttl: float = 5.0) -> ReliableQueue:
    return ReliableQueue(connect(redis_url), keys, worker, heartbeat_ttl=ttl, max_attempts=3)


def _push(redis_client, keys: QueueKeys, *batch_ids: str) -> None:
    for batch_id in batch_ids:
        redis_client.rpush(keys.pending, Job.new(batch_id).to_json())


def test_fifo_pop_ack_and_attempts(redis_url, redis_client, keys) -> None:
    _push(redis_client, keys, "a", "b")
    q = _queue(redis_url, keys, "w1")
    assert q.register() == 0
    first = q.pop(timeout=0.1)
    assert first is not None and first.batch_id == "a" and first.attempt == 1
    assert redis_client.lrange(keys.processing("w1"), 0, -1) == [first.raw]
    q.ack(first)
    assert redis_client.llen(keys.processing("w1")) == 0
    assert redis_client.hget(keys.attempts, "a") is None
    second = q.pop(timeout=0.1)
    assert second is not None and second.batch_id == "b"
    assert q.pop(timeout=0.1) is None  # b is in flight, pending is empty
    assert redis_client.llen(keys.pending) == 0


def test_seed_producer_payload_is_consumed(redis_url, redis_client, keys) -> None:
    # Exactly what the seed's transfer worker pushes (naive utcnow, no size/sha256).
    seed = {
        "batch_id": "s1",
        "s3_key": "archives/s1.tar",
        "file_count": 3,
        "transferred_at": "2026-11-29T10:00:00",
    }
    redis_client.rpush(keys.pending, json.dumps(seed))
    q = _queue(redis_url, keys, "w1")
    q.register()
    d = q.pop(timeout=0.1)
    assert d is not None and d.job is not None and d.job.file_count == 3 and d.job.sha256 is None


def test_invalid_payload_is_delivered_with_reason_and_dead_lettered(
    redis_url, redis_client, keys
) -> None:
    redis_client.rpush(keys.pending, b"{not json")
    q = _queue(redis_url, keys, "w1")
    q.register()
    d = q.pop(timeout=0.1)
    assert d is not None and d.job is None and d.error and "not JSON" in d.error
    assert q.retry_or_dead(d, d.error, permanent=True) == "dead"
    envelope = json.loads(redis_client.lindex(keys.dead, 0))
    assert envelope["payload"] == "{not json" and "not JSON" in envelope["error"]
    assert envelope["worker"] == "w1" and envelope["id"]
    assert redis_client.llen(keys.processing("w1")) == 0


def test_retry_then_dead_after_max_attempts(redis_url, redis_client, keys) -> None:
    _push(redis_client, keys, "flaky")
    q = _queue(redis_url, keys, "w1")
    q.register()
    outcomes = []
    for _ in range(3):
        d = q.pop(timeout=0.1)
        assert d is not None
        outcomes.append(q.retry_or_dead(d, f"boom {d.attempt}", permanent=False))
    assert outcomes == ["requeued", "requeued", "dead"]
    assert redis_client.llen(keys.pending) == 0
    assert json.loads(redis_client.lindex(keys.dead, 0))["attempts"] == 3


def test_restarted_worker_takes_back_own_jobs_in_order(redis_url, redis_client, keys) -> None:
    _push(redis_client, keys, "a", "b", "c", "d")
    crashed = _queue(redis_url, keys, "w1", ttl=0.3)
    crashed.register()
    assert crashed.pop(0.1) is not None and crashed.pop(0.1) is not None
    # A restart of the same worker id after the predecessor died (heartbeat expiring).
    restarted = _queue(redis_url, keys, "w1", ttl=0.3)
    assert restarted.register(wait=5) == 2
    order = [restarted.pop(0.1) for _ in range(4)]
    assert [d.batch_id for d in order if d] == ["a", "b", "c", "d"]
    assert [d.attempt for d in order if d] == [2, 2, 1, 1]


def test_live_twin_worker_id_is_refused(redis_url, keys) -> None:
    live = _queue(redis_url, keys, "twin", ttl=5)
    live.register()
    twin = _queue(redis_url, keys, "twin", ttl=5)
    with pytest.raises(ServiceUnavailable, match="twin"):
        twin.register(wait=0.2)


def test_recover_orphans_requeues_at_head_and_dead_letters_exhausted(
    redis_url, redis_client, keys
) -> None:
    _push(redis_client, keys, "x", "y", "z", "later")
    dead = _queue(redis_url, keys, "dead-worker", ttl=0.2)
    dead.register()
    x, y = dead.pop(0.1), dead.pop(0.1)
    assert x and y
    redis_client.hset(keys.attempts, "y", 3)  # y has used up its attempts
    alive = _queue(redis_url, keys, "alive", ttl=30)
    alive.register()
    z = alive.pop(0.1)
    assert z is not None
    threading.Event().wait(0.4)  # let the dead worker's heartbeat expire

    dry = recover_orphans(redis_client, keys, max_attempts=3, dry_run=True)
    assert (
        dry.dead_workers == ["dead-worker"] and dry.requeued == ["x"] and dry.dead_lettered == ["y"]
    )
    assert redis_client.llen(keys.processing("dead-worker")) == 2  # dry run changed nothing

    report = recover_orphans(redis_client, keys, max_attempts=3)
    assert report.requeued == ["x"] and report.dead_lettered == ["y"]
    assert [json.loads(r)["batch_id"] for r in redis_client.lrange(keys.pending, 0, -1)] == [
        "x",
        "later",
    ]
    assert json.loads(redis_client.lindex(keys.dead, 0))["batch_id"] == "y"
    # The live worker's job is untouched, and a second pass finds nothing to do.
    assert redis_client.llen(keys.processing("alive")) == 1
    again = recover_orphans(redis_client, keys, max_attempts=3)
    assert again.requeued == [] and again.dead_lettered == []


def test_ack_after_janitor_requeued_does_not_duplicate(redis_url, redis_client, keys) -> None:
    _push(redis_client, keys, "slow")
    q = _queue(redis_url, keys, "w1", ttl=0.2)
    q.register()
    d = q.pop(0.1)
    assert d is not None
    threading.Event().wait(0.4)
    recover_orphans(redis_client, keys, max_attempts=3)
    q.dead_letter(d, "late failure")  # the stalled worker's late transition must be a no-op
    assert redis_client.llen(keys.dead) == 0
    assert redis_client.llen(keys.pending) == 1


def test_enqueue_once_is_atomic_across_threads(redis_url, redis_client, keys) -> None:
    job = Job.new("once", size=10, sha256="ab" * 32)
    results: list[bool] = []
    barrier = threading.Barrier(8)

    def run() -> None:
        client = connect(redis_url)
        barrier.wait()
        results.append(enqueue_once(client, keys, job))

    threads = [threading.Thread(target=run) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False] * 7 + [True]
    assert redis_client.llen(keys.pending) == 1
    assert enqueue_once(redis_client, keys, job) is False
    assert enqueue_once(redis_client, keys, job, force=True) is True
    changed = Job.new("once", size=11, sha256="cd" * 32)
    assert enqueue_once(redis_client, keys, changed) is True
    assert redis_client.llen(keys.pending) == 3


def test_phase_and_in_flight(redis_url, redis_client, keys) -> None:
    _push(redis_client, keys, "p")
    q = _queue(redis_url, keys, "w1")
    q.register()
    d = q.pop(0.1)
    assert d is not None
    q.set_phase(d, "staging")
    assert json.loads(redis_client.hget(keys.phase("w1"), "p"))["phase"] == "staging"
    assert [x.batch_id for x in q.in_flight()] == ["p"]
    q.ack(d)
    assert redis_client.hget(keys.phase("w1"), "p") is None
    q.deregister()
    assert not redis_client.exists(keys.heartbeat("w1"))


def test_a_phase_is_in_the_trail_as_soon_as_status_shows_it(redis_url, redis_client, keys) -> None:
    # A kill right after status shows "processing" must leave "processing" in the trail:
    # set_phase writes both in one transaction, so no reader sees one without the other.
    _push(redis_client, keys, "p")
    q = _queue(redis_url, keys, "w1")
    q.register()
    d = q.pop(0.1)
    assert d is not None
    q.set_phase(d, "staged")
    q.set_phase(d, "processing")
    assert json.loads(redis_client.hget(keys.phase("w1"), "p"))["phase"] == "processing"
    assert trail.take_died(redis_client, keys, "p", d.attempt + 1) == trail.Died(
        "processing", d.attempt, "w1"
    )


def test_refunded_requeue_gives_the_attempt_back_only_if_it_moved(
    redis_url, redis_client, keys
) -> None:
    _push(redis_client, keys, "handed-back")
    q = _queue(redis_url, keys, "w1", ttl=0.2)
    q.register()
    d = q.pop(0.1)
    assert d is not None and d.attempt == 1
    q.requeue(d, front=True, refund=True)
    assert int(redis_client.hget(keys.attempts, "handed-back")) == 0
    again = q.pop(0.1)
    assert again is not None and again.attempt == 1
    threading.Event().wait(0.4)
    recover_orphans(redis_client, keys, max_attempts=3)  # the janitor moved it first
    q.requeue(again, front=True, refund=True)  # a late hand-back: no move, no refund
    assert int(redis_client.hget(keys.attempts, "handed-back")) == 1
    assert redis_client.llen(keys.pending) == 1
