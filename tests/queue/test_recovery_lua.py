"""The Lua executors decide exactly as stagerd.recovery.decide, against a real Redis.

Every case runs the real scripts (RECOVER through recover_orphans, MOVE through
retry_or_dead) on this test's own keys and reads where the job ended: still in the
processing list (leave), back in pending (requeue) or in the dead-letter list, whose record
must carry decide's reason and the one record shape.
"""

from __future__ import annotations

import itertools
import json
import re

import pytest

from stagerd.job import Job
from stagerd.queue.dlq import DeadLetter, dead_letter_record
from stagerd.queue.keys import QueueKeys
from stagerd.queue.orphans import recover_orphans
from stagerd.queue.redis_queue import ReliableQueue, connect
from stagerd.recovery import Decision, decide

# None: a payload without a batch id (its attempts are never counted); 0: a batch id whose
# attempts hash entry is missing (Redis forgot it, or the attempt was refunded).
ATTEMPTS = [None, 0, 1, 2, 3, 4]
LIMITS = [1, 2, 3]
RECORD_KEYS = set(
    json.loads(
        dead_letter_record(
            payload=b"", batch_id=None, error="", attempts=0, worker="", failed_at=""
        )
    )
)
ID = re.compile(r"^[0-9a-f]{12}$")


@pytest.fixture
def keys(queue_name: str) -> QueueKeys:
    return QueueKeys(queue_name)


def _payload(attempt: int | None) -> bytes:
    return b'{"not": "a job"}' if attempt is None else Job.new("case").to_json().encode()


def _where(redis_client, keys: QueueKeys, worker: str) -> tuple[str, dict | None]:
    if redis_client.llen(keys.processing(worker)):
        return "leave", None
    if redis_client.llen(keys.pending):
        return "requeue", None
    (raw,) = redis_client.lrange(keys.dead, 0, -1)
    return "dead_letter", json.loads(raw)


def _check_record(record: dict, *, worker: str, attempts: int, payload: bytes) -> None:
    assert set(record) == RECORD_KEYS
    assert ID.match(record["id"]), record["id"]
    assert record["worker"] == worker and record["attempts"] == attempts
    assert record["payload"] == payload.decode() and record["failed_at"]


@pytest.mark.parametrize(
    ("attempt", "limit", "owner_alive"), list(itertools.product(ATTEMPTS, LIMITS, [False, True]))
)
def test_recover_script_agrees_with_decide(
    redis_client, keys, attempt: int | None, limit: int, owner_alive: bool
) -> None:
    worker = "w-case"
    payload = _payload(attempt)
    redis_client.rpush(keys.processing(worker), payload)
    redis_client.sadd(keys.workers, worker)
    if attempt is not None:
        redis_client.hset(keys.attempts, "case", attempt)
    if owner_alive:
        redis_client.set(keys.heartbeat(worker), "token", px=30_000)
    expected = decide(attempt or 0, limit, permanent=False, owner_alive=owner_alive, owner=worker)

    plan = recover_orphans(redis_client, keys, max_attempts=limit, dry_run=True)
    report = recover_orphans(redis_client, keys, max_attempts=limit)

    action, record = _where(redis_client, keys, worker)
    assert action == expected.action
    batch = "" if attempt is None else "case"
    for r in (plan, report):
        assert r.requeued == ([batch] if action == "requeue" else [])
        assert r.dead_lettered == ([batch] if action == "dead_letter" else [])
    if record is not None:
        assert record["error"] == expected.reason and record["batch_id"] == "case"
        _check_record(record, worker=worker, attempts=attempt or 0, payload=payload)


@pytest.mark.parametrize(
    ("attempt", "limit", "permanent"), list(itertools.product(ATTEMPTS, LIMITS, [False, True]))
)
def test_transition_scripts_carry_out_decide(
    redis_url, redis_client, keys, attempt: int | None, limit: int, permanent: bool
) -> None:
    worker = "w-live"
    payload = _payload(attempt)
    redis_client.rpush(keys.pending, payload)
    if attempt is not None:
        redis_client.hset(keys.attempts, "case", max(0, attempt - 1))  # the pickup counts one
    q = ReliableQueue(connect(redis_url), keys, worker, heartbeat_ttl=30, max_attempts=limit)
    q.register()
    d = q.pop(0.1)
    assert d is not None
    expected = decide(d.attempt, limit, permanent=permanent, owner_alive=True, failure="boom")

    outcome = q.retry_or_dead(d, "boom", permanent=permanent)

    action, record = _where(redis_client, keys, worker)
    assert action == expected.action
    assert outcome == {"requeue": "requeued", "dead_letter": "dead"}[action]
    if record is not None:
        assert record["error"] == expected.reason == "boom"
        assert record["batch_id"] == (None if attempt is None else "case")
        _check_record(record, worker=worker, attempts=d.attempt, payload=payload)


def test_a_live_workers_jobs_are_left_even_when_exhausted(redis_url, redis_client, keys) -> None:
    redis_client.rpush(keys.pending, Job.new("busy").to_json())
    q = ReliableQueue(connect(redis_url), keys, "w-busy", heartbeat_ttl=30, max_attempts=1)
    q.register()
    assert q.pop(0.1) is not None
    assert decide(1, 1, permanent=False, owner_alive=True) == Decision("leave")
    report = recover_orphans(redis_client, keys, max_attempts=1)
    assert report.dead_workers == [] and redis_client.llen(keys.processing("w-busy")) == 1


def test_one_pass_numbers_its_dead_letters_in_the_shared_format(redis_client, keys) -> None:
    worker = "w-many"
    for batch_id in ("m1", "m2", "m3"):
        redis_client.rpush(keys.processing(worker), Job.new(batch_id).to_json())
        redis_client.hset(keys.attempts, batch_id, 5)
    report = recover_orphans(redis_client, keys, max_attempts=3)
    assert sorted(report.dead_lettered) == ["m1", "m2", "m3"]
    entries = [DeadLetter.parse(raw) for raw in redis_client.lrange(keys.dead, 0, -1)]
    ids = [e.id for e in entries]
    assert len(set(ids)) == 3 and all(ID.match(i) for i in ids)
    assert all(e.attempts == 5 and e.worker == worker for e in entries)
