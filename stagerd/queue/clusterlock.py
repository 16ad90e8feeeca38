"""The janitor's cluster lock: one Redis key with a TTL, so that two janitors (on any
hosts) never run the cluster parts at once; the loser skips them.

Contract: :func:`acquire` is SET NX with a TTL, so a janitor that dies holding the lock
blocks the others only until the TTL runs out; :func:`release` deletes the key only while
it still holds the caller's token (one script), so a holder whose lock expired and was
taken by another never frees the new holder's lock. Both raise
:func:`~stagerd.queue.errors.queue_errors` (Redis unreachable); neither retries.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from stagerd.queue import scripts

if TYPE_CHECKING:
    from stagerd.queue.redis_queue import RedisClient


def acquire(client: RedisClient, key: str, token: str, ttl: float) -> bool:
    """Whether *token* now holds *key*, for *ttl* seconds (False: another holds it)."""
    return bool(client.set(key, token, nx=True, px=int(ttl * 1000)))


def release(client: RedisClient, key: str, token: str) -> None:
    """Delete *key* if *token* still holds it; otherwise leave it to its holder."""
    client.eval(scripts.RELEASE_LOCK, 1, key, token)
