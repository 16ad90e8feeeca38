"""One batch through the worker: validate -> ledger -> reserve -> stage -> process -> commit
-> ack, with cleanup in ``finally``.

The two halves are separate calls so a slot can stage the next batch while the current
one is processed (prefetch, :mod:`stagerd.prefetch`). Every failure ends in exactly one
queue transition, decided here:

- shutdown (``stop`` / ``kill`` set): back to the HEAD of pending, the attempt refunded;
- the worker itself cannot work (scratch root gone, a service not answering: asked of
  :class:`~stagerd.health.WorkerHealth` after the failure): back to the head, the attempt
  refunded, and the worker pauses until it recovers;
- permanent error (poison payload, corrupt archive, over budget): dead-letter at once;
- transient error: :meth:`ReliableQueue.retry_or_dead` (dead after STAGERD_MAX_ATTEMPTS);
- any other exception inside a batch's steps is that batch's: it is dead-lettered with the
  exception's type and first line, and the worker goes on. Only the queue edge itself
  (Redis gone for longer than SERVICE_POLICY rides out) still ends the process.

A worker killed outright (SIGKILL, OOM) leaves its phase in the trail
(:mod:`stagerd.trail`); the next pickup of that job reports the attempt that died and its
phase, and dead-letters with that reason once STAGERD_MAX_ATTEMPTS is reached.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from stagerd import trail
from stagerd.errors import ScratchUnavailable, StagerdError
from stagerd.health import WorkerHealth, brief
from stagerd.log import get_logger
from stagerd.retry import RetryPolicy, is_transient
from stagerd.shutdown import ShutdownGuard

if TYPE_CHECKING:
    from stagerd.config import Settings
    from stagerd.db import Ledger
    from stagerd.job import Job
    from stagerd.metrics import Metrics
    from stagerd.processor import Processor
    from stagerd.queue import Delivery, ReliableQueue
    from stagerd.scratch import Reservation, ScratchManager
    from stagerd.stage import ArchiveHead, StageResult

T = TypeVar("T")
log = get_logger(__name__)


def is_service_transient(exc: BaseException) -> bool:
    """Transient for calls to Redis/PostgreSQL: also redis-py's own connection errors."""
    if is_transient(exc):
        return True
    import redis

    return isinstance(exc, (redis.ConnectionError, redis.TimeoutError))


# Rides out a Redis restart; bounded, so a dead Redis ends the process (systemd restarts it).
SERVICE_POLICY = RetryPolicy(
    attempts=40, base=0.2, max_delay=5.0, total=180.0, classify=is_service_transient
)


@dataclass(frozen=True)
class StepConfig:
    """What the steps need besides the IO edges."""

    worker_id: str
    bucket: str
    keep_archive: bool = False
    keep_failed: bool = False
    process_timeout: float = 4 * 3600.0
    reserve_timeout: float = 600.0
    pop_timeout: float = 1.0
    stage_policy: RetryPolicy = field(default_factory=RetryPolicy)
    service_policy: RetryPolicy = SERVICE_POLICY


@dataclass
class Staged:
    """A batch whose input is on scratch, waiting for (or under) processing."""

    delivery: Delivery
    job: Job
    reservation: Reservation
    result: StageResult


def _expected(exc: BaseException) -> bool:
    """Errors stagerd raises on purpose; anything else is unexpected but still the batch's."""
    return isinstance(exc, StagerdError) or is_transient(exc)


class BatchSteps:
    """The per-batch steps of one worker process; shared by its slots (thread-safe)."""

    def __init__(
        self,
        settings: Settings,
        config: StepConfig,
        *,
        queue: ReliableQueue,
        ledger: Ledger,
        scratch: ScratchManager,
        s3: Any,
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

    # --- queue edge ---------------------------------------------------------------

    def _redis(self, fn: Callable[[], T], what: str, stop: threading.Event | None = None) -> T:
        return self.guard.call(
            self.config.service_policy, fn, what=what, service="Redis", stop=stop
        )

    def pop(self, stop: threading.Event) -> Delivery | None:
        """The next job, or None when the queue stayed empty for ``pop_timeout``."""
        return self._redis(lambda: self.queue.pop(self.config.pop_timeout), "queue pop", stop)

    def set_phase(self, d: Delivery, phase: str) -> None:
        self._redis(lambda: self.queue.set_phase(d, phase), "queue set_phase")
        if d.batch_id is not None:
            batch_id = d.batch_id
            self._redis(
                lambda: trail.mark(
                    self.queue.client, self.queue.keys, batch_id, phase, d.attempt,
                    self.config.worker_id,
                ),
                "queue trail",
            )  # fmt: skip

    def _clear_trail(self, d: Delivery) -> None:
        if d.batch_id is not None:
            batch_id = d.batch_id
            self._redis(
                lambda: trail.clear(self.queue.client, self.queue.keys, batch_id), "queue trail"
            )

    def ack(self, d: Delivery) -> None:
        self._clear_trail(d)
        self._redis(lambda: self.queue.ack(d), "queue ack")

    # --- staging half -------------------------------------------------------------

    def stage(
        self, d: Delivery, stop: threading.Event, may_wait: Callable[[], bool]
    ) -> Staged | None:
        """Validate, record and stage *d*. None when the job ended here (skipped, failed,
        requeued on shutdown). *may_wait*: whether waiting for budget can end by itself
        (another batch of this worker will release its reservation)."""
        job = self._validate(d)
        if job is None:
            return None
        self.set_phase(d, "staging")
        reservation: Reservation | None = None
        try:
            if not self.ledger.begin(
                job.batch_id, job.s3_key, worker=self.config.worker_id, sha256=job.sha256
            ):
                log.info("batch %s is already done; acknowledging", job.batch_id, extra=_ctx(d))
                self.ack(d)
                return None
            head = self._head(job, stop)
            reservation = self._reserve(job, head.size, stop, may_wait)
            result = self._stage_into(job, reservation, head, stop)
            self.ledger.mark_processing(
                job.batch_id,
                archive_bytes=result.archive_bytes,
                extracted_bytes=result.extracted_bytes,
                file_count=result.file_count,
                sha256=result.sha256,
                stage_seconds=result.seconds,
            )
        except Exception as exc:
            log.debug("batch %s: staging raised", d.batch_id, exc_info=True)
            keep = False
            try:
                keep = self._end_failed(d, exc, "staging", stop)
            finally:
                # Also when ending the job failed (a stopping worker left it for recovery).
                if reservation is not None:
                    reservation.release(remove=not keep)
            return None
        return Staged(d, job, reservation, result)

    def _validate(self, d: Delivery) -> Job | None:
        if d.job is None:
            reason = f"invalid payload: {d.error}"
            log.error("dead-lettering a poison payload: %s", reason, extra=_ctx(d))
            self._redis(lambda: self.queue.dead_letter(d, reason), "queue dead_letter")
            self._record(None, reason, "dead", d, "validate")
            return None
        died = self._previous_died(d)
        max_attempts = self.settings.max_attempts
        if d.attempt > max_attempts:
            # Only a worker that died mid-job leaves an attempt unfinished: stop the loop,
            # saying where the previous attempts died when the trail knows.
            cause = died.describe() if died else "the previous attempt never finished"
            reason = f"{cause}; STAGERD_MAX_ATTEMPTS={max_attempts} attempts used up"
            log.error("batch %s dead: %s", d.batch_id, reason, extra=_ctx(d))
            self._redis(lambda: self.queue.dead_letter(d, reason), "queue dead_letter")
            self._record(d.job.batch_id, reason, "dead", d, died.phase if died else "validate")
            return None
        return d.job

    def _previous_died(self, d: Delivery) -> trail.Died | None:
        """Report (log + stagerd_failures) an earlier attempt of *d* that never ended."""
        batch_id = d.batch_id
        if batch_id is None:
            return None
        died = self._redis(
            lambda: trail.take_died(self.queue.client, self.queue.keys, batch_id, d.attempt),
            "queue trail",
        )
        if died is not None:
            reason = f"{died.describe()} (the process was killed or crashed)"
            log.warning("batch %s: %s", batch_id, reason, extra=_ctx(d))
            self._record(batch_id, reason, "died", d, died.phase, attempt=died.attempt)
        return died

    def _head(self, job: Job, stop: threading.Event) -> ArchiveHead:
        """Size and ETag of the archive: the reservation's size and the staging's pin."""
        from stagerd.stage import head_archive

        return self.config.stage_policy.call(
            lambda: head_archive(self.s3, self.config.bucket, job.s3_key),
            what=f"HEAD {job.s3_key}",
            stop=stop,
        )

    def _reserve(
        self, job: Job, size: int, stop: threading.Event, may_wait: Callable[[], bool]
    ) -> Reservation:
        # Streaming needs ~1x the archive on scratch; --keep-archive holds tar + members.
        nbytes = size * (2 if self.config.keep_archive else 1)
        deadline = time.monotonic() + self.config.reserve_timeout
        while True:
            try:
                return self.scratch.reserve(job.batch_id, nbytes, timeout=1.0, stop=stop)
            except ScratchUnavailable:
                # Prefetch waits for our own batches to finish rather than evicting or failing.
                if stop.is_set() or (time.monotonic() >= deadline and not may_wait()):
                    raise

    def _stage_into(
        self, job: Job, reservation: Reservation, head: ArchiveHead, stop: threading.Event
    ) -> StageResult:
        from stagerd.progress import make_progress
        from stagerd.stage import stage_batch

        # A bar on a terminal; under systemd, a JSON progress line every few seconds.
        progress = make_progress(f"stage {job.batch_id}", head.size)
        reported = 0

        def on_progress(consumed: int) -> None:
            # stage_batch reports a running total; Progress counts increments.
            nonlocal reported
            progress.advance(consumed - reported)
            reported = consumed

        try:
            return stage_batch(
                self.s3,
                self.config.bucket,
                job,
                reservation,
                keep_archive=self.config.keep_archive,
                policy=self.config.stage_policy,
                stop=stop,
                on_progress=on_progress,
                max_members=self.settings.max_members,
                head=head,
            )
        finally:
            progress.close()

    # --- processing half ----------------------------------------------------------

    def process(self, staged: Staged, processor: Processor, kill: threading.Event) -> None:
        """Process, commit results + done, ack; the reservation is released in every path."""
        from stagerd.diskguard import DiskGuard
        from stagerd.processor import ProcessRequest

        d, path = staged.delivery, staged.reservation.path
        keep = False
        phase = "processing"
        try:
            self.set_phase(d, phase)
            request = ProcessRequest(
                batch_id=staged.job.batch_id,
                batch_dir=path,
                input_dir=path / "input",
                results_path=path / "results.jsonl",
                guard=DiskGuard(
                    self.scratch, staged.reservation, self.settings.process_scratch_allowance
                ),
            )
            try:
                outcome = processor.run(request, timeout=self.config.process_timeout, stop=kill)
                phase = "committing"
                self.set_phase(d, phase)
                committing = time.monotonic()
                # Invalid or over-limit results (ours or PostgreSQL's verdict) raise
                # ResultsRejected, a permanent error: the batch ends on this attempt.
                written = self.ledger.commit_results(
                    staged.job.batch_id,
                    outcome.results,
                    process_seconds=outcome.seconds,
                    worker=self.config.worker_id,
                    unique=True,
                )
            except Exception as exc:
                log.debug("batch %s: %s raised", d.batch_id, phase, exc_info=True)
                keep = self._end_failed(d, exc, phase, kill)
                return
            self.ack(d)
            self._observe(
                "done",
                archive_bytes=staged.result.archive_bytes,
                staging=staged.result.seconds,
                processing=outcome.seconds,
                committing=time.monotonic() - committing,
            )
            log.info(
                "batch %s done: %d results%s",
                staged.job.batch_id,
                len(outcome.results),
                "" if written else " (already committed before; nothing written)",
                extra={**_ctx(d), "process_seconds": round(outcome.seconds, 3)},
            )
        finally:
            staged.reservation.release(remove=not keep)

    # --- endings ------------------------------------------------------------------

    def requeue(self, d: Delivery, reason: str) -> None:
        """Shutdown/prefetch hand-back: to the head of pending, attempt not counted."""
        # Handing a job back is not a failed attempt; keep STAGERD_MAX_ATTEMPTS honest.
        # Trail first: once the job is back in pending another worker may pick it up, and
        # must not read our orderly hand-back as a death.
        self._clear_trail(d)
        self._redis(lambda: self.queue.requeue(d, front=True, refund=True), "queue requeue")
        if d.batch_id is not None:
            try:
                self.ledger.mark_requeued(d.batch_id, reason)
            except StagerdError as exc:  # the hand-back happened; the ledger may be down
                log.warning("could not mark %s requeued: %s", d.batch_id, brief(exc))
        log.info("requeued %s at the head: %s", d.batch_id, reason, extra=_ctx(d))

    def _end_failed(
        self, d: Delivery, exc: BaseException, phase: str, interrupted: threading.Event
    ) -> bool:
        """Carry out the ending of a failed job; True if its scratch dir should be kept."""
        if interrupted.is_set() or self.stop.is_set():
            self.requeue(d, f"worker shutting down during {phase}")
            return False
        problem = self.health.problem() if self.health is not None else None
        if problem is not None:
            # Not this batch's fault: hand it back unharmed and wait for the worker to heal.
            self.requeue(d, f"worker cannot work ({problem}); {phase} abandoned")
            assert self.health is not None
            self.health.pause(problem, self.stop)
            return False
        if _expected(exc):
            reason = f"{phase} failed: {brief(exc)}"
        else:
            # A bug met this batch's data: end the batch, keep the worker, keep the trace.
            reason = f"{phase} failed unexpectedly: {brief(exc)}"
            log.error("batch %s: %s", d.batch_id, reason, exc_info=exc, extra=_ctx(d))
        permanent = not is_transient(exc)
        self._clear_trail(d)  # before the transition, as in requeue()
        outcome = self._redis(
            lambda: self.queue.retry_or_dead(d, reason, permanent=permanent), "queue retry"
        )
        level = log.error if outcome == "dead" else log.warning
        level("batch %s %s: %s", d.batch_id, outcome, reason, extra=_ctx(d))
        self._record(d.batch_id, reason, outcome, d, phase)
        self._observe("dead" if outcome == "dead" else "failed")
        return outcome == "dead" and self.config.keep_failed

    def _observe(self, outcome: str, archive_bytes: int = 0, **phase_seconds: float) -> None:
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
        outcome: str,
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
            )
        except Exception as exc:
            log.error(
                "could not record the failure of %s: %s",
                batch_id,
                brief(exc),
                exc_info=not isinstance(exc, StagerdError),
                extra=_ctx(d),
            )


def _ctx(d: Delivery) -> dict[str, Any]:
    return {"batch_id": d.batch_id, "attempt": d.attempt}
