"""The reliable Redis queue (rq's intermediate-queue pattern).

Contract:

- Producers RPUSH JSON onto the pending list (the seed's ``queue:unpack``); consumers take
  from the left, so the list is FIFO.
- ``pop`` moves a payload atomically (BLMOVE) into the worker's own processing list: a job
  is always in exactly one list, so a crash at any instant loses nothing.
- Attempts are counted at pickup (per batch id), so a job that kills its worker every time
  still reaches the dead-letter list after ``max_attempts``.
- Every transition out of a processing list (ack, requeue, dead-letter, orphan recovery) is
  one Lua script that first removes the payload from the processing list and acts only if
  it was there: two parties racing over one job (a worker finishing while the janitor
  requeues it) can never both act.
- Workers keep a heartbeat key with a TTL. A worker whose heartbeat expired is dead; its
  in-flight jobs go back to the head of the pending list (order kept) or, when their
  attempts are used up, to the dead-letter list (:mod:`stagerd.queue.orphans`). Dead
  workers are found by scanning for processing lists, not only through the workers set, so
  a worker that was dropped from the set (recovered while stalled) and died later is still
  found.
- Requeue or dead-letter is always :func:`stagerd.recovery.decide`'s decision; the Lua
  scripts (:mod:`stagerd.queue.scripts`) carry it out atomically, and dead letters are the
  records of :func:`stagerd.queue.dlq.dead_letter_record`.
- Every pickup carries a lease token: a global epoch (INCR), so a later pickup of a batch
  always carries a larger token than an earlier one. The ledger keeps the newest token per
  batch and refuses writes carrying an older one (fencing, :mod:`stagerd.db.ledger`).
- Every heartbeat re-asserts the registration (heartbeat key + workers set) in one script
  and reports whether it had been lost (recovery took this worker's jobs) and whether
  another process holds the id (a twin with the same worker id).
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, cast

from stagerd.errors import ConfigError, InvalidJob, ServiceUnavailable
from stagerd.job import Job
from stagerd.log import get_logger
from stagerd.queue import scripts, trail
from stagerd.queue.dlq import dead_letter_record
from stagerd.queue.keys import QueueKeys
from stagerd.recovery import decide

if TYPE_CHECKING:
    from typing import TypeAlias

    import redis

    from stagerd.config.settings import Settings

    # The client type roles annotate with, so that only this edge imports redis-py.
    RedisClient: TypeAlias = redis.Redis

log = get_logger(__name__)

# redis-py's own retries of a connection or timeout error, per command (see connect).
REDIS_RETRIES = 6


def connect(url: str, *, retries: int = REDIS_RETRIES) -> redis.Redis:
    """A Redis client that retries its own connection errors briefly and detects dead
    connections, so a Redis restart costs a few seconds rather than a crash.

    The bound, set deliberately: redis-py makes at most ``retries + 1`` attempts per
    command (7 by default), sleeping ``min(2, 0.1 * 2**n)`` s after the n-th failure (0.2,
    0.4, 0.8, 1.6, 2, 2: 7 s in all), each connect bounded by a 5 s timeout. That rides out
    a restart for the callers without a policy of their own (the janitor, transfer's
    enqueue); the worker's service policy (:func:`stagerd.queue.errors.is_transient_redis`)
    retries whole operations above it. A connection that breaks in the middle of a command
    is re-dialled inside that command's retry (redis-py nests the two), so the strict
    bound is ``(retries + 1) ** 2`` dials per command.

    Interactive tools pass ``retries=1``: an operator asking for status wants to hear at
    once that Redis is down, not after the long services' patience. Raises ConfigError for
    an unparsable *url* (without quoting it)."""
    import redis as redis_lib
    from redis.backoff import ExponentialBackoff
    from redis.retry import Retry

    try:
        return redis_lib.Redis.from_url(
            url,
            socket_timeout=30,
            socket_connect_timeout=5,
            health_check_interval=15,
            retry=Retry(ExponentialBackoff(cap=2.0, base=0.1), retries),
            retry_on_error=[redis_lib.ConnectionError, redis_lib.TimeoutError],
        )
    except ValueError:
        # redis-py's message may quote the URL; the variable's name is enough to act on.
        raise ConfigError("REDIS_URL: redis-py cannot parse it") from None


def connect_plain(url: str) -> redis.Redis:
    """A client with redis-py's own retry defaults and the janitor's timeouts (5 s to
    connect, 30 s per command): the janitor's one client for its cluster parts. Raises
    ValueError for an unparsable *url*, and :func:`~stagerd.queue.errors.queue_errors`."""
    import redis as redis_lib

    return redis_lib.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=30)


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat()


@dataclass(frozen=True)
class Delivery:
    """One popped payload: the exact bytes, the parsed job (or why it is invalid)."""

    raw: bytes
    job: Job | None
    error: str | None
    attempt: int
    # The lease token of this pickup (0: none, e.g. a payload parsed outside a pop).
    lease: int = 0

    @property
    def batch_id(self) -> str | None:
        return self.job.batch_id if self.job else None

    @classmethod
    def parse(cls, raw: bytes, attempt: int = 0) -> Delivery:
        try:
            return cls(raw=raw, job=Job.from_json(raw), error=None, attempt=attempt)
        except InvalidJob as exc:
            return cls(raw=raw, job=None, error=str(exc), attempt=attempt)


@dataclass(frozen=True)
class Beat:
    """What one heartbeat found: *lost*: the registration was gone (another worker
    recovered our jobs while we were stalled, or Redis lost its data); *twin*: the
    heartbeat key held another process's token (a second process with our worker id)."""

    lost: bool
    twin: str | None


class ReliableQueue:
    """One worker process's view of the queue. Thread-safe (redis-py pools connections)."""

    def __init__(
        self,
        client: redis.Redis,
        keys: QueueKeys,
        worker_id: str,
        *,
        heartbeat_ttl: float = 60.0,
        max_attempts: int = 3,
    ) -> None:
        self.client = client
        self.keys = keys
        self.worker_id = worker_id
        self.heartbeat_ttl = heartbeat_ttl
        self.max_attempts = max_attempts
        # Distinguishes this process from a predecessor or a twin with the same worker id.
        self.token = f"{uuid.uuid4().hex[:12]}"
        self._move = client.register_script(scripts.MOVE)
        self._beat = client.register_script(scripts.BEAT)

    @classmethod
    def from_settings(cls, settings: Settings, worker_id: str | None = None) -> ReliableQueue:
        return cls(
            connect(settings.redis_url),
            QueueKeys(settings.queue),
            worker_id or settings.worker_id,
            heartbeat_ttl=settings.heartbeat_ttl,
            max_attempts=settings.max_attempts,
        )

    @property
    def processing(self) -> str:
        return self.keys.processing(self.worker_id)

    def register(self, wait: float | None = None) -> int:
        """Start heartbeating and take back this worker id's in-flight jobs.

        If another process holds the id's heartbeat, wait up to *wait* seconds (default
        1.5 x TTL: the normal case is our own SIGKILLed predecessor whose key is expiring).
        Raises ServiceUnavailable if the id stays taken.
        """
        hb = self.keys.heartbeat(self.worker_id)
        ttl_ms = max(1, int(self.heartbeat_ttl * 1000))
        deadline = time.monotonic() + (1.5 * self.heartbeat_ttl if wait is None else wait)
        logged = False
        while not self.client.set(hb, self.token, px=ttl_ms, nx=True):
            if time.monotonic() >= deadline:
                raise ServiceUnavailable(
                    f"worker id {self.worker_id!r} is in use by a live process "
                    "(its heartbeat keeps being renewed); give each process its own STAGERD_WORKER_ID"
                )
            if not logged:
                log.warning(
                    "worker id %s has a live heartbeat; waiting for it to expire",
                    self.worker_id,
                    extra={"worker": self.worker_id},
                )
                logged = True
            time.sleep(min(0.5, self.heartbeat_ttl / 4))
        self.client.sadd(self.keys.workers, self.worker_id)
        return self._take_back_own()

    def _take_back_own(self) -> int:
        moved = 0
        # RPOP/LPUSH one by one keeps the original order at the head of the pending list.
        while self.client.lmove(self.processing, self.keys.pending, "RIGHT", "LEFT") is not None:
            moved += 1
        self.client.delete(self.keys.phase(self.worker_id))
        if moved:
            log.info(
                "took back %d in-flight job(s) of a previous run",
                moved,
                extra={"worker": self.worker_id},
            )
        return moved

    def heartbeat(self) -> Beat:
        """Renew the heartbeat and re-assert the registration; call at least every TTL/3."""
        member, before = cast(
            list[Any],
            self._beat(
                keys=[self.keys.heartbeat(self.worker_id), self.keys.workers],
                args=[self.worker_id, self.token, max(1, int(self.heartbeat_ttl * 1000))],
            ),
        )
        held = before.decode() if isinstance(before, bytes) else str(before)
        return Beat(lost=not int(member), twin=held if held and held != self.token else None)

    def holds(self, d: Delivery) -> bool:
        """Whether *d* is still in this worker's processing list (still ours to finish)."""
        return self.client.lpos(self.processing, cast(str, d.raw)) is not None

    def new_lease(self, d: Delivery, floor: int = 0) -> Delivery:
        """*d* with a fresh lease token, the epoch first raised to *floor* (the ledger's
        newest token: after a Redis data loss the counter restarts below it)."""
        if floor:
            raise_epoch(self.client, self.keys, floor)
        lease = int(self.client.incr(self.keys.epoch))
        return Delivery(raw=d.raw, job=d.job, error=d.error, attempt=d.attempt, lease=lease)

    def deregister(self) -> None:
        """Clean shutdown: drop the heartbeat (only if it is still ours)."""
        hb = self.keys.heartbeat(self.worker_id)
        if self.client.get(hb) == self.token.encode():
            self.client.delete(hb)

    def pop(self, timeout: float = 1.0) -> Delivery | None:
        """Take the oldest pending job into this worker's processing list, or None."""
        # Redis >= 6 takes fractional timeouts; redis-py's annotation says int.
        raw = self.client.blmove(
            self.keys.pending, self.processing, cast(int, timeout), "LEFT", "RIGHT"
        )
        if raw is None:
            return None
        raw = cast(bytes, raw)
        delivery = Delivery.parse(raw)
        if delivery.batch_id is None:
            return delivery
        pipe = self.client.pipeline(transaction=True)
        pipe.hincrby(self.keys.attempts, delivery.batch_id, 1)
        pipe.incr(self.keys.epoch)
        attempt, lease = pipe.execute()
        return Delivery(raw=raw, job=delivery.job, error=None, attempt=attempt, lease=lease)

    def _transition(
        self, d: Delivery, target: str, mode: str, envelope: str = "", *, refund: bool = False
    ) -> bool:
        keys = [self.processing, target, self.keys.attempts, self.keys.phase(self.worker_id)]
        args: list[bytes | str] = [d.raw, mode, d.batch_id or "", envelope, "1" if refund else "0"]
        return bool(self._move(keys=keys, args=args))

    def ack(self, d: Delivery) -> None:
        """The job is finished for good: forget it."""
        self._transition(d, self.keys.pending, "ack")

    def requeue(self, d: Delivery, *, front: bool = True, refund: bool = False) -> None:
        """Give the job back (front: it goes next, e.g. shutdown; back: retry later).

        *refund*: the hand-back was not a failed attempt (shutdown, prefetch), so the attempt
        counted at pickup is given back, in the same script and only if the job was still
        ours to move."""
        self._transition(d, self.keys.pending, "front" if front else "back", refund=refund)

    def dead_letter(self, d: Delivery, reason: str) -> None:
        """Park the job in the dead-letter list with *reason*."""
        self._transition(d, self.keys.dead, "dead", self.envelope(d, reason))

    def retry_or_dead(self, d: Delivery, reason: str, *, permanent: bool) -> str:
        """Carry out :func:`stagerd.recovery.decide` for a failed attempt: dead-letter a
        permanent or exhausted failure (returns "dead"), else requeue at the tail
        ("requeued")."""
        decision = decide(
            d.attempt, self.max_attempts, permanent=permanent, owner_alive=True, failure=reason
        )
        if decision.action == "dead_letter":
            self.dead_letter(d, decision.reason)
            return "dead"
        self.requeue(d, front=False)
        return "requeued"

    def envelope(self, d: Delivery, reason: str) -> str:
        """The dead-letter record of *d* failed with *reason* on this worker, now."""
        return dead_letter_record(
            payload=d.raw,
            batch_id=d.batch_id,
            error=reason,
            attempts=d.attempt,
            worker=self.worker_id,
            failed_at=utc_now(),
        )

    def set_phase(self, d: Delivery, phase: str) -> None:
        """Record what the job is doing now, for ``stagerd status``, and in the trail.

        One MULTI/EXEC: the published phase and the trail change together, so a worker
        killed the instant ``stagerd status`` shows a phase leaves that same phase in the
        trail for the next pickup to report (two round trips left a window where status
        said "processing" while the trail still said "staged")."""
        field = d.batch_id or "(invalid)"
        value = json.dumps({"phase": phase, "since": time.time(), "attempt": d.attempt})
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(self.keys.phase(self.worker_id), field, value)
        if d.batch_id is not None:
            trail.mark(pipe, self.keys, d.batch_id, phase, d.attempt, self.worker_id)
        pipe.execute()

    def in_flight(self) -> list[Delivery]:
        """This worker's in-flight jobs, oldest first."""
        raws = cast(list[bytes], self.client.lrange(self.processing, 0, -1))
        return [Delivery.parse(raw) for raw in raws]


def processing_owners(client: redis.Redis, keys: QueueKeys) -> list[str]:
    """Worker ids that have a processing list (found by SCAN, whatever the workers set says)."""
    prefix = keys.processing("")
    pattern = glob_escape(prefix) + "*"
    owners = {raw.decode()[len(prefix) :] for raw in client.scan_iter(match=pattern, count=1000)}
    return sorted(o for o in owners if o)


def raise_epoch(client: redis.Redis, keys: QueueKeys, floor: int) -> None:
    """Raise the lease epoch to at least *floor* (never lowers it; atomic)."""
    client.eval(scripts.EPOCH_FLOOR, 1, keys.epoch, floor)


def glob_escape(text: str) -> str:
    """*text* as a literal in a SCAN MATCH pattern."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def enqueue_once(client: redis.Redis, keys: QueueKeys, job: Job, *, force: bool = False) -> bool:
    """RPUSH *job* unless this batch was already enqueued with the same archive digest.

    Atomic (one Lua script), so concurrent transfers of one batch enqueue it once. Returns
    True when the job was pushed.
    """
    marker = job.sha256 or f"size:{job.size}"
    script = client.register_script(scripts.ENQUEUE_ONCE)
    pushed = script(
        keys=[keys.pending, keys.enqueued],
        args=[job.batch_id, marker, job.to_json(), "1" if force else "0"],
    )
    return bool(pushed)
