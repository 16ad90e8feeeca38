"""What ``stagerd doctor`` asks Redis: is it there, how deep is the queue, does it keep
its data across a restart. Read-only; every function raises
:func:`~stagerd.queue.errors.queue_errors` when Redis cannot answer."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from stagerd.queue.redis_queue import RedisClient


def queue_depth(client: RedisClient, pending: str) -> int:
    """PING, then the length of the list *pending*."""
    client.ping()
    return int(client.llen(pending))


def persistence(client: RedisClient) -> tuple[bool, str]:
    """(AOF on, the ``save`` setting); INFO where CONFIG is not allowed (managed Redis),
    which says nothing about snapshots ("")."""
    import redis

    try:
        config = client.config_get("appendonly")
        save = client.config_get("save").get("save", "")
        return config.get("appendonly") == "yes", str(save)
    except redis.ResponseError:
        info = client.info("persistence")
        return bool(int(info.get("aof_enabled", 0))), ""
