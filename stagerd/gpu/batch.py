"""One batch's lifetime in a worker: what it holds from its pop to its one exit.

A popped batch holds four things of its worker process: a place in the in-flight count
(``--burst`` and the budget wait read it), its slot's prefetch token, its lease
registration (:class:`~stagerd.queue.lease.LeaseBook`, which the heartbeat fences) and,
once reserved, its scratch reservation. :class:`Batch` owns all four, and
:meth:`Batch.close`, run when its ``with`` block is left, gives them back in one place,
exactly once, whatever ended the batch: done, a failure in any phase, a hand-back, a lease
lost, or an exception that ends the worker.

A batch crosses threads: the stager stages it, the processor thread processes it. The
stager's block ends with :meth:`Batch.pass_on`, which leaves everything held; the
processor thread's ``with batch:`` block (or the stager's own hand-back on shutdown) is
the one whose exit closes.

The release order matters: the lease registration first (the job may already have left
our processing list, and the heartbeat must not read that as a lost lease), then the
reservation (its directory removed unless :attr:`Batch.keep`), then the in-flight count
and the token last, so a stager waiting on either finds the space already free.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from types import TracebackType

    from stagerd.gpu.stage import StageResult
    from stagerd.job import Job
    from stagerd.processor.runner import ProcessOutcome
    from stagerd.queue.lease import Fence, LeaseBook
    from stagerd.queue.redis_queue import Delivery
    from stagerd.scratch.space import Reservation

# The strings are a contract: the queue's phase hash and trail, and the failure records'
# ``phase`` column ("validate" is before any phase is set).
Phase = Literal["validate", "staging", "staged", "processing", "committing"]
# How a batch ended, as logs, the ``stagerd_batches{outcome}`` metric (done, failed, dead)
# and the failure records (dead, requeued, died) spell it; "abandoned": its lease was lost.
Outcome = Literal["done", "failed", "requeued", "dead", "died", "abandoned"]


class InFlight:
    """How many batches this worker process holds, across slots (for --burst and waits)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count = 0

    def add(self, n: int) -> None:
        with self._lock:
            self._count += n

    @property
    def count(self) -> int:
        with self._lock:
            return self._count


class Batch:
    """One popped job's hold on this worker: in-flight count, slot token, lease and
    scratch reservation, released together by :meth:`close` (see the module docstring).

    *requeue* hands the job back to the head of the queue (attempt refunded) for
    :meth:`hand_back`; *token* is the slot's prefetch semaphore, already acquired."""

    def __init__(
        self,
        delivery: Delivery,
        *,
        in_flight: InFlight,
        leases: LeaseBook,
        requeue: Callable[[Delivery, str], None],
        token: threading.Semaphore | None = None,
    ) -> None:
        self.delivery = delivery
        self.fence: Fence | None = None
        self.reservation: Reservation | None = None
        # Keep the scratch dir on close (results waiting for a commit, --keep-failed).
        self.keep = False
        # How it ended, once it did through done, a failure ending or a hand-back; None
        # while in flight, for a deferred commit, and for a job settled at its claim
        # (acknowledged as already done, a reused id dead-lettered, a lease lost there).
        self.outcome: Outcome | None = None
        self._in_flight = in_flight
        self._leases = leases
        self._requeue = requeue
        self._token = token
        self._counted = False
        self._passed = False
        self._closed = False
        self._lock = threading.Lock()

    def __enter__(self) -> Batch:
        if not self._counted:
            self._counted = True
            self._in_flight.add(1)
        self._passed = False
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self._passed:
            self.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def pass_on(self) -> None:
        """Leaving this block keeps everything held: another thread's block closes."""
        self._passed = True

    def hold(self, fence: Fence) -> Fence:
        """Register the lease (for the heartbeat's check) under *fence*."""
        self.fence = fence
        self._leases.hold(self.delivery, fence)
        return fence

    def drop_lease(self) -> None:
        """Unregister the lease now (idempotent): the job is about to leave our list."""
        if self.fence is not None:
            self._leases.drop(self.fence)

    def own(self, reservation: Reservation) -> Reservation:
        """The batch's scratch reservation, released (or kept) by :meth:`close`."""
        self.reservation = reservation
        return reservation

    def hand_back(self, reason: str) -> None:
        """Leave the job for another worker: back to the head of pending, its attempt not
        counted, the scratch dir removed on close. Raises what the requeue raised (e.g.
        LeftForRecovery: the job then stays in our processing list for recovery)."""
        self.keep = False
        self._requeue(self.delivery, reason)
        self.outcome = "requeued"

    def end(self, outcome: Outcome, *, keep: bool = False) -> None:
        """Note how the batch ended (its queue transition already happened)."""
        self.outcome = outcome
        self.keep = keep

    def close(self) -> None:
        """Give everything back, once (later calls do nothing)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            self.drop_lease()
            if self.reservation is not None:
                self.reservation.release(remove=not self.keep)
        finally:
            if self._counted:
                self._in_flight.add(-1)
            if self._token is not None:
                self._token.release()


@dataclass
class Staged:
    """A batch whose input is on scratch, waiting for (or under) processing."""

    batch: Batch
    job: Job
    result: StageResult
    # Results a previous run of this worker processed but could not commit (resume.py).
    processed: ProcessOutcome | None = None

    @property
    def delivery(self) -> Delivery:
        return self.batch.delivery

    @property
    def reservation(self) -> Reservation:
        assert self.batch.reservation is not None  # staged means reserved
        return self.batch.reservation

    @property
    def fence(self) -> Fence:
        assert self.batch.fence is not None  # staged means claimed
        return self.batch.fence
