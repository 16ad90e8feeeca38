"""How a batch's job ends: the queue calls of the pipeline and every ending but "done".

Every failure ends in exactly one queue transition, decided in :meth:`BatchEndings.fail`:

- shutdown (``stop`` / ``kill`` set): back to the HEAD of pending, the attempt refunded;
- the worker itself cannot work (scratch root gone, a service not answering: asked of
  :class:`~stagerd.gpu.health.WorkerHealth` after the failure): back to the head, the attempt
  refunded, and the worker pauses until it recovers;
- permanent error (poison payload, corrupt archive, over budget): dead-letter at once;
- transient error: :meth:`ReliableQueue.retry_or_dead` (dead after STAGERD_MAX_ATTEMPTS);
- any other exception inside a batch's steps is that batch's: it is dead-lettered with the
  exception's type and first line, and the worker goes on.

A lease lost abandons the batch instead: nothing committed, no queue or ledger transition.
The queue transition always comes first; the ledger record after it is best effort.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar, cast

from stagerd.errors import LeaseLost, StagerdError
from stagerd.log import get_logger
from stagerd.queue import trail
from stagerd.queue.lease import Fence, LeaseBook
from stagerd.retry import Policies, brief, is_transient
from stagerd.shutdown import ShutdownGuard

if TYPE_CHECKING:
    from stagerd.config.settings import Settings
    from stagerd.db.ledger import Ledger
    from stagerd.gpu.batch import Batch, Outcome, Phase
    from stagerd.gpu.health import WorkerHealth
    from stagerd.metrics import Metrics
    from stagerd.queue.redis_queue import Delivery, ReliableQueue
    from stagerd.s3.store import ObjectStore
    from stagerd.scratch.space import ScratchManager

T = TypeVar("T")
log = get_logger("stagerd.gpu.pipeline")  # the pipeline's log lines, wherever they live now


@dataclass(frozen=True)
class StepConfig:
    """What the steps need besides the IO edges."""

    worker_id: str
    bucket: str
    # The process's (Policies.from_settings): redis with the queue's classifier.
    policies: Policies
    keep_archive: bool = False
    keep_failed: bool = False
    process_timeout: float = 4 * 3600.0
    reserve_timeout: float = 600.0
    pop_timeout: float = 1.0


def expected(exc: BaseException) -> bool:
    """Errors stagerd raises on purpose; anything else is unexpected but still the batch's."""
    return isinstance(exc, StagerdError) or is_transient(exc)


class BatchEndings:
    """The IO edges of one worker process and the endings of its batches (thread-safe)."""

    def __init__(
        self,
        settings: Settings,
        config: StepConfig,
        *,
        queue: ReliableQueue,
        ledger: Ledger,
        scratch: ScratchManager,
        s3: ObjectStore,
        metrics: Metrics | None = None,
        guard: ShutdownGuard | None = None,
        health: WorkerHealth | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        self.settings = settings
        # The worker's: once it is stopping, service calls are bounded (stagerd.shutdown).
        self.guard = guard or ShutdownGuard()
        self.config = config
        self.queue = queue
        self.ledger = ledger
        self.scratch = scratch
        self.s3 = s3
        self.metrics = metrics
        self.health = health
        # The worker's stop: ends a pause even when the caller only passed ``kill``.
        self.stop = stop or threading.Event()
        self.leases = LeaseBook()

    # --- queue edge ---------------------------------------------------------------

    def _redis(self, fn: Callable[[], T], what: str, stop: threading.Event | None = None) -> T:
        return self.guard.call(
            self.config.policies.redis, fn, what=what, service="Redis", stop=stop
        )

    def pop(self, stop: threading.Event) -> Delivery | None:
        """The next job, or None when the queue stayed empty for ``pop_timeout``."""
        return self._redis(lambda: self.queue.pop(self.config.pop_timeout), "queue pop", stop)

    def set_phase(self, d: Delivery, phase: Phase) -> None:
        # The queue writes the status phase and the trail in one transaction.
        self._redis(lambda: self.queue.set_phase(d, phase), "queue set_phase")

    def _clear_trail(self, d: Delivery) -> None:
        if d.batch_id is not None:
            batch_id = d.batch_id
            self._redis(
                lambda: trail.clear(self.queue.client, self.queue.keys, batch_id), "queue trail"
            )

    def ack(self, d: Delivery) -> None:
        self._clear_trail(d)
        self._redis(lambda: self.queue.ack(d), "queue ack")

    # --- endings ------------------------------------------------------------------

    def dead_letter(self, d: Delivery, reason: str, phase: str) -> None:
        """Dead-letter *d* at once (the caller logged why), then record it."""
        self._redis(lambda: self.queue.dead_letter(d, reason), "queue dead_letter")
        self._record(d.job.batch_id if d.job else None, reason, "dead", d, phase)

    def abandon(self, d: Delivery, why: str) -> None:
        """Lease lost: the batch is another worker's now; do nothing more with it."""
        log.error(
            "abandoning batch %s: %s (nothing committed, no queue transition)",
            d.batch_id,
            why,
            extra={**ctx(d), "lease": d.lease, "event": "lease_abandoned"},
        )

    def abandon_keeping_results(self, batch: Batch, why: str) -> None:
        """Lease lost after the processor finished: abandon, but keep the results and their
        marker (nothing else: the input is dropped) for the batch's next owner on this host
        to adopt instead of running the processor again. Elsewhere the janitor removes the
        dir once the batch is done."""
        from stagerd.gpu.resume import keep_results_only

        self.abandon(batch.delivery, f"{why}; its finished results kept on scratch")
        if batch.reservation is not None:
            keep_results_only(batch.reservation.path)
        batch.end("abandoned", keep=True)

    def requeue(self, d: Delivery, reason: str) -> None:
        """Shutdown/prefetch hand-back: to the head of pending, attempt not counted."""
        # Handing a job back is not a failed attempt; keep STAGERD_MAX_ATTEMPTS honest.
        # Trail first: once the job is back in pending another worker may pick it up, and
        # must not read our orderly hand-back as a death.
        self._clear_trail(d)
        self._redis(lambda: self.queue.requeue(d, front=True, refund=True), "queue requeue")
        if d.batch_id is not None:
            try:
                self.ledger.mark_requeued(d.batch_id, reason, lease=d.lease or None)
            except StagerdError as exc:  # the hand-back happened; the ledger may be down
                log.warning("could not mark %s requeued: %s", d.batch_id, brief(exc))
        log.info("requeued %s at the head: %s", d.batch_id, reason, extra=ctx(d))

    def fail(
        self, batch: Batch, exc: BaseException, phase: Phase, interrupted: threading.Event
    ) -> None:
        """Carry out the ending of a failed job (see the module docstring); sets whether
        its scratch dir is kept. Raises what the queue edge raised (e.g. LeftForRecovery)."""
        d = batch.delivery
        if (isinstance(interrupted, Fence) and interrupted.lost) or isinstance(exc, LeaseLost):
            self.abandon(d, f"lease lost during {phase}")
            batch.end("abandoned")
            return
        if interrupted.is_set() or self.stop.is_set():
            batch.hand_back(f"worker shutting down during {phase}")
            return
        problem = self.health.problem() if self.health is not None else None
        if problem is not None:
            # Not this batch's fault: hand it back unharmed and wait for the worker to heal.
            batch.hand_back(f"worker cannot work ({problem}); {phase} abandoned")
            assert self.health is not None
            self.health.pause(problem, self.stop)
            return
        outcome = self._retry_or_dead(d, exc, phase)
        batch.end(outcome, keep=outcome == "dead" and self.config.keep_failed)

    def _retry_or_dead(self, d: Delivery, exc: BaseException, phase: Phase) -> Outcome:
        """The batch's own failure: requeued at the tail or dead, logged and recorded."""
        if expected(exc):
            reason = f"{phase} failed: {brief(exc)}"
        else:
            # A bug met this batch's data: end the batch, keep the worker, keep the trace.
            reason = f"{phase} failed unexpectedly: {brief(exc)}"
            log.error("batch %s: %s", d.batch_id, reason, exc_info=exc, extra=ctx(d))
        permanent = not is_transient(exc)
        self._clear_trail(d)  # before the transition, as in requeue()
        outcome = cast(
            "Outcome",
            self._redis(
                lambda: self.queue.retry_or_dead(d, reason, permanent=permanent), "queue retry"
            ),
        )
        level = log.error if outcome == "dead" else log.warning
        level("batch %s %s: %s", d.batch_id, outcome, reason, extra=ctx(d))
        self._record(d.batch_id, reason, outcome, d, phase)
        self.observe("dead" if outcome == "dead" else "failed")
        return outcome

    def observe(self, outcome: Outcome, archive_bytes: int = 0, **phase_seconds: float) -> None:
        """Count the batch in the Prometheus textfile (best effort: never fails a batch)."""
        if self.metrics is None:
            return
        self.metrics.batches.labels(outcome).inc()
        self.metrics.bytes.labels("in").inc(archive_bytes)
        for phase, seconds in phase_seconds.items():
            self.metrics.phase_seconds.labels(phase).observe(seconds)
        try:
            self.metrics.write()
        except OSError as exc:
            log.warning("cannot write metrics to %s: %s", self.metrics.path, exc)

    def _record(
        self,
        batch_id: str | None,
        reason: str,
        outcome: Outcome,
        d: Delivery,
        phase: str,
        attempt: int | None = None,
    ) -> None:
        # The queue transition already happened; a ledger outage (or a row PostgreSQL
        # refuses) must not undo it nor end the worker.
        try:
            self.ledger.record_failure(
                batch_id,
                reason,
                outcome=outcome,
                attempt=d.attempt if attempt is None else attempt,
                worker=self.config.worker_id,
                phase=phase,
                lease=d.lease or None,
            )
        except Exception as exc:
            log.error(
                "could not record the failure of %s: %s",
                batch_id,
                brief(exc),
                exc_info=not isinstance(exc, StagerdError),
                extra=ctx(d),
            )


def ctx(d: Delivery) -> dict[str, Any]:
    """The log context of a batch's lines."""
    return {"batch_id": d.batch_id, "attempt": d.attempt}
