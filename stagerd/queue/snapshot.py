"""Read-only snapshots of one queue: for ``stagerd status`` (depths, workers, in-flight
jobs) and for reconcile (the batch ids of every job in any list).

The key layout stays behind the queue edge: :mod:`stagerd.ops.status` renders what
:func:`queue_snapshot` returns and never reads a Redis key itself. That snapshot is not
atomic (a job may move between two reads); it is what an operator's glance needs.
:func:`queued_batch_ids` is atomic (one script): reconcile must not miss a moving job.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from stagerd.job import loads_untrusted
from stagerd.queue import scripts
from stagerd.queue.keys import QueueKeys
from stagerd.queue.redis_queue import glob_escape, processing_owners

if TYPE_CHECKING:
    import redis


@dataclass(frozen=True)
class InFlightJob:
    """One job in a worker's processing list, with the phase its worker last recorded
    (``"queued"`` if none; *since* is a UNIX time, *attempt* as recorded)."""

    batch_id: str | None
    phase: str
    since: float | None
    attempt: int | None


@dataclass(frozen=True)
class WorkerSnapshot:
    """A worker known to the queue; *heartbeat_ttl_ms* is its heartbeat's remaining TTL
    (None or <= 0: expired, the worker is dead)."""

    id: str
    heartbeat_ttl_ms: int | None
    in_flight: tuple[InFlightJob, ...]

    @property
    def alive(self) -> bool:
        return self.heartbeat_ttl_ms is not None and self.heartbeat_ttl_ms > 0


@dataclass(frozen=True)
class QueueSnapshot:
    """The pending and dead-letter depths of one queue and every worker it knows."""

    name: str
    pending: int
    dead: int
    workers: tuple[WorkerSnapshot, ...]


def queue_snapshot(client: redis.Redis, keys: QueueKeys) -> QueueSnapshot:
    """Read the queue's state. Raises redis-py's errors (and OSError)."""
    pending = int(client.llen(keys.pending))
    dead = int(client.llen(keys.dead))
    # Also workers dropped from the set that still hold jobs (found by their lists).
    registered = {w.decode() for w in cast(set[bytes], client.smembers(keys.workers))}
    workers = sorted(registered | set(processing_owners(client, keys)))
    return QueueSnapshot(
        name=keys.pending,
        pending=pending,
        dead=dead,
        workers=tuple(_worker(client, keys, worker) for worker in workers),
    )


def _worker(client: redis.Redis, keys: QueueKeys, worker: str) -> WorkerSnapshot:
    phases: dict[str, Any] = {
        k.decode(): json.loads(v)
        for k, v in cast(dict[bytes, bytes], client.hgetall(keys.phase(worker))).items()
    }
    jobs = []
    for raw in cast(list[bytes], client.lrange(keys.processing(worker), 0, -1)):
        try:
            batch_id = loads_untrusted(raw).get("batch_id")
        except (ValueError, AttributeError):
            batch_id = None
        info = phases.get(batch_id or "(invalid)", {})
        jobs.append(
            InFlightJob(
                batch_id=batch_id,
                phase=info.get("phase", "queued"),
                since=info.get("since"),
                attempt=info.get("attempt"),
            )
        )
    ttl = client.pttl(keys.heartbeat(worker))
    return WorkerSnapshot(
        id=worker, heartbeat_ttl_ms=None if ttl is None else int(ttl), in_flight=tuple(jobs)
    )


def queued_batch_ids(client: redis.Redis, keys: QueueKeys) -> set[str]:
    """Batch ids of every job in any list of the queue (pending, dead-letter, every
    processing list), read in one script. Payloads that do not parse are skipped. Raises
    :func:`~stagerd.queue.errors.queue_errors`."""
    pattern = glob_escape(keys.processing("")) + "*"
    raws = cast(
        list[bytes], client.eval(scripts.SNAPSHOT_LISTS, 2, keys.pending, keys.dead, pattern)
    )
    ids = set()
    for raw in raws:
        try:
            data = loads_untrusted(raw)
        except ValueError:
            continue
        if isinstance(data, dict):
            # Dead-letter envelopes carry the batch id too.
            batch = data.get("batch_id")
            if isinstance(batch, str):
                ids.add(batch)
    return ids
