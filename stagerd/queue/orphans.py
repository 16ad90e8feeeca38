"""Dead-worker recovery: the one routine that takes back the jobs of workers whose heartbeat
expired. Every worker's heartbeat thread (:mod:`stagerd.gpu.worker`) and the janitor
(:mod:`stagerd.janitor.run`) call :func:`recover_orphans`; nothing else moves another
worker's jobs.

The decision per job is :func:`stagerd.recovery.decide` with the owner dead and no failure
reported; the Lua script :data:`stagerd.queue.scripts.RECOVER` carries it out atomically
(re-checking the heartbeat first), and the dry run plans with ``decide`` itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from stagerd.log import get_logger
from stagerd.queue import scripts
from stagerd.queue.dlq import dead_letter_record, record_id_base
from stagerd.queue.keys import QueueKeys
from stagerd.queue.redis_queue import Delivery, processing_owners, utc_now
from stagerd.recovery import decide

if TYPE_CHECKING:
    import redis

log = get_logger(__name__)


@dataclass(frozen=True)
class RecoveryReport:
    """What one orphan-recovery pass did (or, dry, would do)."""

    dead_workers: list[str]
    requeued: list[str]
    dead_lettered: list[str]


def recover_orphans(
    client: redis.Redis, keys: QueueKeys, *, max_attempts: int, dry_run: bool = False
) -> RecoveryReport:
    """Requeue (head) or dead-letter the in-flight jobs of every worker whose heartbeat
    expired. Safe to run from many places at once: each worker's list is handled by one
    atomic script that re-checks the heartbeat first. Raises redis-py's errors."""
    workers = sorted(
        {w.decode() for w in cast(set[bytes], client.smembers(keys.workers))}
        | set(processing_owners(client, keys))
    )
    report = RecoveryReport(dead_workers=[], requeued=[], dead_lettered=[])
    for worker in workers:
        # A live owner: decide() leaves every one of its jobs, so there is nothing to read.
        if client.exists(keys.heartbeat(worker)):
            continue
        report.dead_workers.append(worker)
        if dry_run:
            requeued, dead = _plan_recovery(client, keys, worker, max_attempts)
        else:
            requeued, dead = _recover_worker(client, keys, worker, max_attempts)
        report.requeued.extend(requeued)
        report.dead_lettered.extend(dead)
        if requeued or dead:
            log.warning(
                "recovered jobs of dead worker %s: %d requeued, %d dead-lettered",
                worker,
                len(requeued),
                len(dead),
                extra={"worker": worker, "dry_run": dry_run},
            )
    return report


def _recover_worker(
    client: redis.Redis, keys: QueueKeys, worker: str, max_attempts: int
) -> tuple[list[str], list[str]]:
    """Run RECOVER over *worker*'s list: (requeued, dead-lettered) batch ids."""
    # Every field comes from the one builder; the script fills in the per-job ones.
    template = dead_letter_record(
        payload=b"", batch_id=None, error="", attempts=0, worker=worker, failed_at=utc_now()
    )
    script = client.register_script(scripts.RECOVER)
    out = cast(
        list[bytes],
        script(
            keys=[
                keys.processing(worker),
                keys.pending,
                keys.dead,
                keys.attempts,
                keys.heartbeat(worker),
                keys.workers,
                keys.phase(worker),
            ],
            args=[max_attempts, worker, template, record_id_base()],
        ),
    )
    items = [b.decode() for b in out]
    split = items.index("|")
    return items[:split], items[split + 1 :]


def _plan_recovery(
    client: redis.Redis, keys: QueueKeys, worker: str, max_attempts: int
) -> tuple[list[str], list[str]]:
    """What RECOVER would do to *worker*'s list, decided by :func:`decide`."""
    requeue: list[str] = []
    dead: list[str] = []
    for raw in cast(list[bytes], client.lrange(keys.processing(worker), 0, -1)):
        batch = Delivery.parse(raw).batch_id or ""
        # Attempts are counted per batch id; a payload without one was never counted.
        attempts = int(cast(Any, client.hget(keys.attempts, batch)) or 0) if batch else 0
        decision = decide(attempts, max_attempts, permanent=False, owner_alive=False, owner=worker)
        (dead if decision.action == "dead_letter" else requeue).append(batch)
    return requeue, dead
