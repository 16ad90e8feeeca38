"""The commit half of a batch: results + done in one transaction, then the ack; and the
resume of results a previous run of this worker processed but could not commit.

A commit that cannot reach PostgreSQL is retried for ``Policies.commit_retry`` seconds
(STAGERD_COMMIT_RETRY, :func:`~stagerd.gpu.resume.commit_with_retry`); out of budget or
shutting down, the results stay on scratch and the job in our processing list, for this
worker's restart to commit (:func:`adopt_processed`) without running the processor again.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from stagerd.errors import LeaseLost, ServiceUnavailable
from stagerd.gpu.batch import Staged
from stagerd.gpu.outcomes import ctx
from stagerd.gpu.resume import commit_with_retry, find_processed
from stagerd.log import get_logger

if TYPE_CHECKING:
    import threading

    from stagerd.config.settings import Settings
    from stagerd.gpu.batch import Batch
    from stagerd.gpu.outcomes import BatchEndings
    from stagerd.job import Job
    from stagerd.processor.runner import ProcessOutcome
    from stagerd.results import ResultLimits

log = get_logger("stagerd.gpu.pipeline")  # the pipeline's log lines, wherever they live now


def result_limits(settings: Settings) -> ResultLimits:
    from stagerd.results import ResultLimits

    return ResultLimits(settings.max_results, settings.max_result_bytes)


def adopt_processed(steps: BatchEndings, batch: Batch, job: Job) -> Staged | None:
    """A previous run on this host processed the batch but did not commit (this worker's,
    or a dead or fenced worker's: see ProcessedMarker.matches): adopt its scratch dir into
    *batch* and go straight to the commit (the processor does not run again). None when
    there is nothing to resume."""
    worker = steps.config.worker_id
    found = find_processed(steps.scratch, job, worker, result_limits(steps.settings))
    if found is None:
        return None
    reservation, result, outcome = found
    batch.own(reservation)
    log.warning(
        "batch %s was processed by a previous run on this host but not committed: "
        "committing its results without running the processor again",
        job.batch_id,
        extra={**ctx(batch.delivery), "event": "commit_resumed"},
    )
    return Staged(batch, job, result, processed=outcome)


def commit_and_ack(
    steps: BatchEndings, staged: Staged, outcome: ProcessOutcome, kill: threading.Event
) -> None:
    """Results + done in one transaction, retried through a PostgreSQL outage, then ack.
    Invalid or over-limit results (ours or PostgreSQL's verdict) raise ResultsRejected, a
    permanent error: the batch ends on this attempt. Raises ServiceUnavailable when the
    commit is out of retry budget while the worker is not stopping (results kept)."""
    d, batch = staged.delivery, staged.batch
    try:
        steps.set_phase(d, "committing")
        committing = time.monotonic()
        written = commit_with_retry(
            steps.ledger,
            staged.job.batch_id,
            outcome,
            worker=steps.config.worker_id,
            lease=d.lease or None,
            retry_for=steps.config.policies.commit_retry,
            fence=staged.fence,
        )
    except LeaseLost as exc:
        # Fenced: not ours to commit, but the results (and their marker) are complete:
        # kept for the batch's next owner on this host to adopt (see _run_processor).
        steps.abandon_keeping_results(batch, str(exc))
        return
    except ServiceUnavailable:
        if staged.fence.lost:
            # Fenced while the commit waited out the outage: as for LeaseLost above, the
            # batch is another worker's (not this worker's failure to end on).
            steps.abandon_keeping_results(batch, "lease lost while the commit waited")
            return
        # Out of retry budget or shutting down: the results stay on scratch and the
        # job in our processing list, for this worker's restart to commit.
        batch.keep = True
        if kill.is_set() or steps.stop.is_set():
            return
        raise
    except Exception as exc:
        log.debug("batch %s: committing raised", d.batch_id, exc_info=True)
        steps.fail(batch, exc, "committing", staged.fence)
        return
    _done(steps, staged, outcome, written, committing)


def _done(
    steps: BatchEndings, staged: Staged, outcome: ProcessOutcome, written: bool, started: float
) -> None:
    """The batch is committed: ack, count (the commit phase timed from *started* to after
    the ack, as always), say so."""
    d = staged.delivery
    steps.ack(d)
    steps.observe(
        "done",
        archive_bytes=staged.result.archive_bytes,
        staging=staged.result.seconds,
        processing=outcome.seconds,
        committing=time.monotonic() - started,
    )
    staged.batch.end("done")
    log.info(
        "batch %s done: %d results%s",
        staged.job.batch_id,
        len(outcome.results),
        "" if written else " (already committed before; nothing written)",
        extra={**ctx(d), "process_seconds": round(outcome.seconds, 3)},
    )
