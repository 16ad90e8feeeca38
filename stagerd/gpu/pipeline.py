"""One batch through the worker: validate -> ledger -> reserve -> stage -> process -> commit
-> ack, with cleanup in ``finally``.

The two halves are separate calls so a slot can stage the next batch while the current
one is processed (prefetch, :mod:`stagerd.gpu.prefetch`). Every failure ends in exactly one
queue transition, decided here:

- shutdown (``stop`` / ``kill`` set): back to the HEAD of pending, the attempt refunded;
- the worker itself cannot work (scratch root gone, a service not answering: asked of
  :class:`~stagerd.gpu.health.WorkerHealth` after the failure): back to the head, the attempt
  refunded, and the worker pauses until it recovers;
- permanent error (poison payload, corrupt archive, over budget): dead-letter at once;
- transient error: :meth:`ReliableQueue.retry_or_dead` (dead after STAGERD_MAX_ATTEMPTS);
- any other exception inside a batch's steps is that batch's: it is dead-lettered with the
  exception's type and first line, and the worker goes on. Only the queue edge itself
  (Redis gone for longer than SERVICE_POLICY rides out) still ends the process.

A worker killed outright (SIGKILL, OOM) leaves its phase in the trail
(:mod:`stagerd.queue.trail`); the next pickup of that job reports the attempt that died and its
phase, and dead-letters with that reason once STAGERD_MAX_ATTEMPTS is reached.

A lease lost (:mod:`stagerd.queue.lease`) abandons the batch at once: processor stopped, scratch
released, nothing committed, no queue or ledger transition (it is another worker's now).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

from stagerd.errors import LeaseLost, ScratchUnavailable, ServiceUnavailable, StagerdError
from stagerd.gpu.health import WorkerHealth
from stagerd.gpu.resume import commit_with_retry
from stagerd.liveness import current_progress
from stagerd.log import get_logger
from stagerd.queue import trail
from stagerd.queue.lease import Fence, LeaseBook
from stagerd.retry import RetryPolicy, brief, is_transient
from stagerd.shutdown import ShutdownGuard

if TYPE_CHECKING:
    from stagerd.config.settings import Settings
    from stagerd.db.ledger import BatchRow, Ledger
    from stagerd.gpu.stage import ArchiveHead, StageResult
    from stagerd.job import Job
    from stagerd.metrics import Metrics
    from stagerd.processor.runner import Processor, ProcessOutcome
    from stagerd.queue.redis_queue import Delivery, ReliableQueue
    from stagerd.results import ResultLimits
    from stagerd.scratch.space import Reservation, ScratchManager

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
    fence: Fence
    # Results a previous run of this worker processed but could not commit (resume.py).
    processed: ProcessOutcome | None = None


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
        self.leases = LeaseBook()

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
        requeued on shutdown, lease lost). *may_wait*: whether waiting for budget can end
        by itself (another batch of this worker will release its reservation)."""
        job = self._validate(d)
        if job is None:
            return None
        self.set_phase(d, "staging")
        fence: Fence | None = None
        reservation: Reservation | None = None
        try:
            claimed = self._claim(d, job)
            if claimed is None:
                return None
            d = claimed
            fence = Fence(stop)
            self.leases.hold(d, fence)
            resumed = self._resume(d, job, fence)
            if resumed is not None:
                return resumed
            head = self._head(job, fence)
            reservation = self._reserve(job, head.size, fence, may_wait)
            result = self._stage_into(job, reservation, head, fence)
            self.ledger.mark_processing(
                job.batch_id,
                archive_bytes=result.archive_bytes,
                extracted_bytes=result.extracted_bytes,
                file_count=result.file_count,
                sha256=result.sha256,
                stage_seconds=result.seconds,
                lease=d.lease or None,
            )
        except Exception as exc:
            log.debug("batch %s: staging raised", d.batch_id, exc_info=True)
            if fence is not None:
                self.leases.drop(fence)
            keep = False
            try:
                keep = self._end_failed(d, exc, "staging", fence or stop)
            finally:
                # Also when ending the job failed (a stopping worker left it for recovery).
                if reservation is not None:
                    reservation.release(remove=not keep)
            return None
        return Staged(d, job, reservation, result, fence)

    def _claim(self, d: Delivery, job: Job) -> Delivery | None:
        """Claim the batch in the ledger with *d*'s lease token: the delivery to go on
        with (its token may be renewed), or None when the job ended here."""
        renewed = replaced = False
        while True:
            try:
                if self._begin(d, job):
                    return d
                if not replaced and self._replace(d, job):
                    replaced = True
                    continue
                self._already_done(d, job)
                return None
            except LeaseLost as exc:
                # Still in our processing list: nobody recovered it, so a refused token
                # means Redis lost its epoch counter (restart without persistence). Raise
                # the epoch past the ledger's and claim again, once.
                if renewed or not self._redis(partial(self.queue.holds, d), "queue holds"):
                    self._abandon(d, str(exc))
                    return None
                renewed = True
                renew = partial(self.queue.new_lease, d, self.ledger.max_lease())
                d = self._redis(renew, "queue lease")

    def _resume(self, d: Delivery, job: Job, fence: Fence) -> Staged | None:
        """This worker's previous run processed the batch but could not commit: adopt its
        scratch dir and go straight to the commit (the processor does not run again)."""
        from stagerd.gpu.resume import find_processed

        found = find_processed(self.scratch, job, self.config.worker_id, self._result_limits())
        if found is None:
            return None
        reservation, result, outcome = found
        log.warning(
            "batch %s was processed by this worker's previous run but not committed: "
            "committing its results without running the processor again",
            job.batch_id,
            extra={**_ctx(d), "event": "commit_resumed"},
        )
        return Staged(d, job, reservation, result, fence, processed=outcome)

    def _replace(self, d: Delivery, job: Job) -> bool:
        """A ``transfer upload --force`` job for a done batch whose archive changed: the
        old results are deleted and the batch reopened (True), to be processed again."""
        if job.extra.get("replace") is not True or not job.sha256:
            return False
        if not self.ledger.reopen(job.batch_id, sha256=job.sha256, size=job.size):
            return False
        log.warning(
            "batch %s was replaced by a new archive (--force): old results deleted, "
            "processing it again",
            job.batch_id,
            extra={**_ctx(d), "event": "batch_replaced"},
        )
        return True

    def _begin(self, d: Delivery, job: Job) -> bool:
        return self.ledger.begin(
            job.batch_id,
            job.s3_key,
            worker=self.config.worker_id,
            sha256=job.sha256,
            lease=d.lease or None,
            size=job.size,
        )

    def _already_done(self, d: Delivery, job: Job) -> None:
        """The batch is done: ack, unless this job names a different archive (the batch id
        was reused), which is dead-lettered with the reason instead."""
        row = self.ledger.batch(job.batch_id)
        differs = _differs(job, row.sha256 if row else None, _done_size(row))
        if differs:
            reason = f"batch id reused: {differs}; the done batch keeps its results"
            log.error("dead-lettering %s: %s", job.batch_id, reason, extra=_ctx(d))
            self._clear_trail(d)
            self._redis(lambda: self.queue.dead_letter(d, reason), "queue dead_letter")
            self._record(job.batch_id, reason, "dead", d, "validate")
            return
        log.info("batch %s is already done; acknowledging", job.batch_id, extra=_ctx(d))
        self.ack(d)

    def _abandon(self, d: Delivery, why: str) -> None:
        """Lease lost: the batch is another worker's now; do nothing more with it."""
        log.error(
            "abandoning batch %s: %s (nothing committed, no queue transition)",
            d.batch_id,
            why,
            extra={**_ctx(d), "lease": d.lease, "event": "lease_abandoned"},
        )

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
        from stagerd.gpu.stage import head_archive

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
        from stagerd.gpu.stage import stage_batch
        from stagerd.progress import make_progress

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
        d, fence = staged.delivery, staged.fence
        # From here on the worker's *kill* (drain timeout), not its stop, ends the work,
        # and its polls are the processor thread's progress.
        fence.parent = kill
        fence.progress = current_progress()
        keep = False
        phase = "processing"
        try:
            self.set_phase(d, phase)
            outcome = staged.processed
            if outcome is None:
                try:
                    outcome = self._run_processor(staged, processor)
                except Exception as exc:
                    log.debug("batch %s: processing raised", d.batch_id, exc_info=True)
                    keep = self._end_failed(d, exc, phase, fence)
                    return
                if outcome is None:  # the lease was lost while processing: abandoned
                    return
            phase = "committing"
            try:
                self.set_phase(d, phase)
                committing = time.monotonic()
                written = self._commit(staged, outcome)
            except LeaseLost as exc:
                self._abandon(d, str(exc))
                return
            except ServiceUnavailable:
                # Out of retry budget or shutting down: the results stay on scratch and the
                # job in our processing list, for this worker's restart to commit.
                keep = True
                if kill.is_set() or self.stop.is_set():
                    return
                raise
            except Exception as exc:
                log.debug("batch %s: committing raised", d.batch_id, exc_info=True)
                keep = self._end_failed(d, exc, phase, fence)
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
            self.leases.drop(fence)
            staged.reservation.release(remove=not keep)

    def _run_processor(self, staged: Staged, processor: Processor) -> ProcessOutcome | None:
        """Run the processor and leave the resume marker; None when the lease was lost
        meanwhile (the batch is abandoned). Raises what the processor raised."""
        from stagerd.gpu.resume import mark_processed
        from stagerd.processor.runner import ProcessRequest
        from stagerd.scratch.diskguard import DiskGuard

        d, path, fence = staged.delivery, staged.reservation.path, staged.fence
        request = ProcessRequest(
            batch_id=staged.job.batch_id,
            batch_dir=path,
            input_dir=path / "input",
            results_path=path / "results.jsonl",
            guard=DiskGuard(
                self.scratch, staged.reservation, self.settings.process_scratch_allowance
            ),
        )
        outcome = processor.run(request, timeout=self.config.process_timeout, stop=fence)
        if fence.lost:
            self._abandon(d, "lease lost while processing")
            return None
        mark_processed(path, self.config.worker_id, staged.result, outcome)
        return outcome

    def _commit(self, staged: Staged, outcome: ProcessOutcome) -> bool:
        """Results + done in one transaction, retried through a PostgreSQL outage
        (STAGERD_COMMIT_RETRY). Invalid or over-limit results (ours or PostgreSQL's
        verdict) raise ResultsRejected, a permanent error: the batch ends on this attempt."""
        return commit_with_retry(
            self.ledger,
            staged.job.batch_id,
            outcome,
            worker=self.config.worker_id,
            lease=staged.delivery.lease or None,
            retry_for=self.settings.commit_retry,
            fence=staged.fence,
        )

    def _result_limits(self) -> ResultLimits:
        from stagerd.results import ResultLimits

        return ResultLimits(self.settings.max_results, self.settings.max_result_bytes)

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
                self.ledger.mark_requeued(d.batch_id, reason, lease=d.lease or None)
            except StagerdError as exc:  # the hand-back happened; the ledger may be down
                log.warning("could not mark %s requeued: %s", d.batch_id, brief(exc))
        log.info("requeued %s at the head: %s", d.batch_id, reason, extra=_ctx(d))

    def _end_failed(
        self, d: Delivery, exc: BaseException, phase: str, interrupted: threading.Event
    ) -> bool:
        """Carry out the ending of a failed job; True if its scratch dir should be kept."""
        if (isinstance(interrupted, Fence) and interrupted.lost) or isinstance(exc, LeaseLost):
            self._abandon(d, f"lease lost during {phase}")
            return False
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
                lease=d.lease or None,
            )
        except Exception as exc:
            log.error(
                "could not record the failure of %s: %s",
                batch_id,
                brief(exc),
                exc_info=not isinstance(exc, StagerdError),
                extra=_ctx(d),
            )


def _done_size(row: BatchRow | None) -> int | None:
    if row is None:
        return None
    return row.archive_size if row.archive_size is not None else row.archive_bytes


def _differs(job: Job, sha256: str | None, size: int | None) -> str | None:
    """How *job*'s archive differs from the recorded one, or None (same, or unknown)."""
    if job.size is not None and size is not None and job.size != size:
        return f"the job's archive is {job.size} bytes, the batch's was {size}"
    if job.sha256 and sha256 and job.sha256 != sha256:
        return f"the job's SHA-256 {job.sha256[:12]}... differs from the batch's {sha256[:12]}..."
    return None


def _ctx(d: Delivery) -> dict[str, Any]:
    return {"batch_id": d.batch_id, "attempt": d.attempt}
