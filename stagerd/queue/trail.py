"""The phase trail: which phase each batch's current attempt reached, kept in Redis.

The per-worker phase hash (for ``stagerd status``) dies with its worker: registration and
orphan recovery delete it. The trail outlives the process, so when a job comes back after
its worker was SIGKILLed or OOM-killed, the next pickup can say "attempt 2 died during
processing" instead of a bare attempt count. An attempt that ends in an orderly way (done,
failed, handed back) clears its entry; an entry still there at pickup means the previous
attempt died.

Hash ``{queue}:trail``: batch id -> ``{"phase", "attempt", "worker", "since"}``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    import redis

    from stagerd.queue.keys import QueueKeys


@dataclass(frozen=True)
class Died:
    """What the trail knows about an attempt that never ended."""

    phase: str
    attempt: int
    worker: str

    def describe(self) -> str:
        return f"attempt {self.attempt} died during {self.phase} on worker {self.worker}"


def trail_key(keys: QueueKeys) -> str:
    return f"{keys.queue}:trail"


def mark(client: redis.Redis, keys: QueueKeys, batch_id: str, phase: str, attempt: int,
         worker: str) -> None:  # fmt: skip
    value = json.dumps({"phase": phase, "attempt": attempt, "worker": worker, "since": time.time()})
    client.hset(trail_key(keys), batch_id, value)


def clear(client: redis.Redis, keys: QueueKeys, batch_id: str) -> None:
    client.hdel(trail_key(keys), batch_id)


def take_died(client: redis.Redis, keys: QueueKeys, batch_id: str, attempt: int) -> Died | None:
    """The unfinished attempt just before *attempt* of *batch_id*, if any (read and
    cleared). An entry for any other attempt is stale (left by a job that orphan recovery
    dead-lettered, then was enqueued again) and is only cleared."""
    raw = cast(Any, client.hget(trail_key(keys), batch_id))
    if raw is None:
        return None
    client.hdel(trail_key(keys), batch_id)
    try:
        data = json.loads(raw)
        died = Died(str(data["phase"]), int(data["attempt"]), str(data["worker"]))
    except (ValueError, KeyError, TypeError):
        return None  # damaged: claiming a death we cannot describe would mislead
    return died if died.attempt == attempt - 1 else None
