"""One batch through the worker: validate -> ledger -> reserve -> stage -> process -> commit
-> ack. What the batch holds (in-flight count, slot token, lease, scratch) is its
:class:`~stagerd.gpu.batch.Batch`'s, released when the caller's ``with batch:`` ends.

The two halves are separate calls so a slot can stage the next batch while the current
one is processed (prefetch, :mod:`stagerd.gpu.prefetch`). Every failure ends in exactly one
queue transition (:mod:`stagerd.gpu.outcomes`); only the queue edge itself (Redis gone for
longer than the process's ``Policies.redis`` rides out) still ends the process. The commit
and the resume of processed results are :mod:`stagerd.gpu.commit`.

A worker killed outright (SIGKILL, OOM) leaves its phase in the trail
(:mod:`stagerd.queue.trail`); the next pickup of that job reports the attempt that died and its
phase, and dead-letters with that reason once STAGERD_MAX_ATTEMPTS is reached.

A lease lost (:mod:`stagerd.queue.lease`) abandons the batch at once: processor stopped, scratch
released, nothing committed, no queue or ledger transition (it is another worker's now). A
processor that had already finished keeps its results (and their marker) on scratch: the
batch's next owner on this host waits for the dir and adopts them (:mod:`stagerd.gpu.commit`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

from stagerd.errors import LeaseLost, ScratchUnavailable
from stagerd.gpu.batch import Batch, Staged
from stagerd.gpu.commit import adopt_processed, commit_and_ack
from stagerd.gpu.outcomes import BatchEndings, StepConfig, ctx
from stagerd.liveness import current_progress
from stagerd.log import get_logger
from stagerd.queue import trail
from stagerd.queue.lease import Fence
from stagerd.recovery import decide

if TYPE_CHECKING:
    from stagerd.db.ledger import BatchRow
    from stagerd.gpu.stage import ArchiveHead, StageResult
    from stagerd.job import Job
    from stagerd.processor.runner import Processor, ProcessOutcome
    from stagerd.queue.redis_queue import Delivery
    from stagerd.scratch.space import Reservation

__all__ = ["BatchSteps", "Staged", "StepConfig"]

log = get_logger(__name__)


class BatchSteps(BatchEndings):
    """The per-batch steps of one worker process; shared by its slots (thread-safe)."""

    # --- staging half -------------------------------------------------------------

    def stage(
        self, batch: Batch, stop: threading.Event, may_wait: Callable[[], bool]
    ) -> Staged | None:
        """Validate, record and stage *batch*. None when the job ended here (skipped, failed,
        requeued on shutdown, lease lost). *may_wait*: whether waiting for budget can end
        by itself (another batch of this worker will release its reservation). Raises what
        the queue edge raised while ending the job (the caller's block still releases)."""
        d = batch.delivery
        job = self._validate(d)
        if job is None:
            batch.end("dead")
            return None
        self.set_phase(d, "staging")
        try:
            return self._stage_steps(batch, job, stop, may_wait)
        except Exception as exc:
            log.debug("batch %s: staging raised", d.batch_id, exc_info=True)
            # Before the ending takes the job out of our processing list: the heartbeat
            # must not read that as a lost lease.
            batch.drop_lease()
            self.fail(batch, exc, "staging", batch.fence or stop)
            return None

    def _stage_steps(
        self, batch: Batch, job: Job, stop: threading.Event, may_wait: Callable[[], bool]
    ) -> Staged | None:
        """Claim, then resume processed results or reserve and stage, then record it."""
        claimed = self._claim(batch.delivery, job)
        if claimed is None:
            return None
        batch.delivery = claimed
        fence = batch.hold(Fence(stop))
        resumed = adopt_processed(self, batch, job)
        if resumed is None:
            # Asked again whether or not a holder is seen now: one that let go since the
            # first attempt (found locked, or not yet marked) wrote its marker before that.
            self._wait_for_holder(job, fence)
            resumed = adopt_processed(self, batch, job)
        if resumed is not None:
            return resumed
        head = self._head(job, fence)
        reservation = batch.own(self._reserve(job, head.size, fence, may_wait))
        result = self._stage_into(job, reservation, head, fence)
        # Inside the batch's lifetime: a PostgreSQL outage here still releases the scratch.
        self.ledger.mark_processing(
            job.batch_id,
            archive_bytes=result.archive_bytes,
            extracted_bytes=result.extracted_bytes,
            file_count=result.file_count,
            sha256=result.sha256,
            stage_seconds=result.seconds,
            lease=claimed.lease or None,
        )
        return Staged(batch, job, result)

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
                    self.abandon(d, str(exc))
                    return None
                renewed = True
                renew = partial(self.queue.new_lease, d, self.ledger.max_lease())
                d = self._redis(renew, "queue lease")

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
            extra={**ctx(d), "event": "batch_replaced"},
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
            log.error("dead-lettering %s: %s", job.batch_id, reason, extra=ctx(d))
            self._clear_trail(d)
            self.dead_letter(d, reason, "validate")
            return
        log.info("batch %s is already done; acknowledging", job.batch_id, extra=ctx(d))
        self.ack(d)

    def _validate(self, d: Delivery) -> Job | None:
        if d.job is None:
            reason = f"invalid payload: {d.error}"
            log.error("dead-lettering a poison payload: %s", reason, extra=ctx(d))
            self.dead_letter(d, reason, "validate")
            return None
        died = self._previous_died(d)
        max_attempts = self.settings.max_attempts
        # The attempts before this pickup all died with their worker (a failed attempt
        # settles itself): the recovery rule, asked as orphan recovery would have asked it.
        used = decide(max(d.attempt - 1, 0), max_attempts, permanent=False, owner_alive=False)
        if used.action == "dead_letter":
            # Stop the loop, saying where the previous attempts died when the trail knows.
            cause = died.describe() if died else "the previous attempt never finished"
            reason = f"{cause}; STAGERD_MAX_ATTEMPTS={max_attempts} attempts used up"
            log.error("batch %s dead: %s", d.batch_id, reason, extra=ctx(d))
            self.dead_letter(d, reason, died.phase if died else "validate")
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
            log.warning("batch %s: %s", batch_id, reason, extra=ctx(d))
            self._record(batch_id, reason, "died", d, died.phase, attempt=died.attempt)
        return died

    def _wait_for_holder(self, job: Job, stop: threading.Event) -> None:
        """A live process on this host still holds the batch's dir: typically its previous
        owner, paused past its lease, whose processor may have finished meanwhile. Wait for
        it to let go (it abandons at once when it resumes) so its finished results can be
        adopted rather than deleted by a fresh reservation (returns at once without one).
        Raises ScratchUnavailable when it does not let go within the reserve timeout or
        *stop* is set."""
        if not self.scratch.is_locked(self.scratch.batch_dir(job.batch_id)):
            return
        log.warning(
            "batch %s: its scratch dir is held by another live process on this host (a"
            " previous owner paused past its lease?); waiting up to %.0fs for it to let go,"
            " to adopt any finished results",
            job.batch_id,
            self.config.reserve_timeout,
            extra={"batch_id": job.batch_id, "event": "scratch_dir_held"},
        )
        self.scratch.wait_released(job.batch_id, timeout=self.config.reserve_timeout, stop=stop)

    def _head(self, job: Job, stop: threading.Event) -> ArchiveHead:
        """Size and ETag of the archive: the reservation's size and the staging's pin."""
        from stagerd.gpu.stage import head_archive

        return self.config.policies.s3.call(
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
                policy=self.config.policies.s3,
                stop=stop,
                on_progress=on_progress,
                max_members=self.settings.max_members,
                head=head,
                range_size=self.settings.range_size,
            )
        finally:
            progress.close()

    # --- processing half ----------------------------------------------------------

    def process(
        self,
        staged: Staged,
        processor: Processor,
        kill: threading.Event,
        started: Callable[[], None] | None = None,
    ) -> None:
        """Process, commit results + done, ack: the job ends here, or (commit deferred)
        stays ours with its results kept on scratch. The caller's ``with batch:`` releases.
        *started* is called (if at all) once the processor is running; it must not raise."""
        d, fence = staged.delivery, staged.fence
        # From here on the worker's *kill* (drain timeout), not its stop, ends the work,
        # and its polls are the processor thread's progress.
        fence.parent = kill
        fence.progress = current_progress()
        self.set_phase(d, "processing")
        outcome = staged.processed
        if outcome is None:
            try:
                outcome = self._run_processor(staged, processor, started)
            except Exception as exc:
                log.debug("batch %s: processing raised", d.batch_id, exc_info=True)
                self.fail(staged.batch, exc, "processing", fence)
                return
            if outcome is None:  # the lease was lost while processing: abandoned
                return
        commit_and_ack(self, staged, outcome, kill)

    def _run_processor(
        self, staged: Staged, processor: Processor, started: Callable[[], None] | None
    ) -> ProcessOutcome | None:
        """Run the processor and leave the resume marker; None when the lease was lost
        meanwhile (the batch is abandoned). Raises what the processor raised."""
        from stagerd.gpu.resume import RESULTS, mark_pending, mark_processed
        from stagerd.processor.runner import ProcessRequest
        from stagerd.scratch.diskguard import DiskGuard

        path, fence = staged.reservation.path, staged.fence
        request = ProcessRequest(
            batch_id=staged.job.batch_id,
            batch_dir=path,
            input_dir=path / "input",
            results_path=path / RESULTS,
            guard=DiskGuard(
                self.scratch, staged.reservation, self.settings.process_scratch_allowance
            ),
            done_marker=mark_pending(path, self.config.worker_id, staged.result),
            on_started=started,
        )
        outcome = processor.run(request, timeout=self.config.process_timeout, stop=fence)
        # The processor finished: its results are good whoever commits them.
        mark_processed(path, self.config.worker_id, staged.result, outcome)
        if fence.lost:
            # Paused past the lease, we may not commit; the results stay on scratch, where
            # the batch's next owner on this host adopts them instead of a second GPU run
            # (it waits for our lock; elsewhere the janitor removes them once it is done).
            self.abandon_keeping_results(staged.batch, "lease lost while processing")
            return None
        return outcome


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
