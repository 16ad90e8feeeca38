"""The queue edge's operations for roles: the cluster lock, the health probes, the atomic
read of every list, the error tuple, against a real Redis."""

from __future__ import annotations

from typing import Any

import redis

from stagerd.job import Job
from stagerd.queue import clusterlock
from stagerd.queue.errors import queue_errors
from stagerd.queue.health import persistence, queue_depth
from stagerd.queue.keys import QueueKeys
from stagerd.queue.redis_queue import connect_plain
from stagerd.queue.snapshot import queued_batch_ids


def test_cluster_lock_is_exclusive_and_released_only_by_its_holder(
    redis_url: str, queue_name: str
) -> None:
    client = connect_plain(redis_url)
    key = QueueKeys(queue_name).janitor_lock
    try:
        assert clusterlock.acquire(client, key, "one", 30.0)
        assert not clusterlock.acquire(client, key, "two", 30.0)
        assert 0 < int(client.pttl(key)) <= 30_000
        clusterlock.release(client, key, "two")  # not the holder: nothing happens
        assert client.get(key) == b"one"
        clusterlock.release(client, key, "one")
        assert client.get(key) is None
        assert clusterlock.acquire(client, key, "two", 30.0)
    finally:
        client.delete(key)
        client.close()


def test_queue_depth_and_persistence(redis_client: Any, queue_name: str) -> None:
    keys = QueueKeys(queue_name)
    assert queue_depth(redis_client, keys.pending) == 0
    redis_client.rpush(keys.pending, b"a", b"b")
    assert queue_depth(redis_client, keys.pending) == 2
    aof, save = persistence(redis_client)
    assert isinstance(aof, bool) and isinstance(save, str)


def test_queued_batch_ids_reads_every_list(redis_client: Any, queue_name: str) -> None:
    keys = QueueKeys(queue_name)
    redis_client.rpush(keys.pending, Job.new("p1").to_json(), b"not json")
    redis_client.rpush(keys.dead, b'{"batch_id": "d1", "error": "x"}')
    redis_client.rpush(keys.processing("w1"), Job.new("w1job").to_json())
    # Not a list: skipped, not an error.
    redis_client.set(keys.processing("odd"), b"x")
    assert queued_batch_ids(redis_client, keys) == {"p1", "d1", "w1job"}


def test_an_unreachable_redis_raises_within_queue_errors() -> None:
    client = connect_plain("redis://127.0.0.1:1/0")
    try:
        try:
            clusterlock.acquire(client, "k", "t", 1.0)
        except queue_errors() as exc:
            assert isinstance(exc, (redis.RedisError, OSError))
        else:
            raise AssertionError("no error from a closed port")
    finally:
        client.close()
    assert queue_errors(ValueError) == (redis.RedisError, OSError, ValueError)
