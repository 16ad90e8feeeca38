"""The exception tree.

Every failure stagerd raises on purpose is a :class:`StagerdError`. The split that matters
to callers is *transient* (retrying can help: a reset connection, a 503, a full disk that
the janitor may free) versus *permanent* (retrying cannot help: a corrupt archive, a bad
batch id, a 403). The CLI maps them to exit codes: configuration/usage errors exit 2,
everything else exits 1.
"""

from __future__ import annotations


class StagerdError(Exception):
    """Base of every error stagerd raises deliberately."""

    exit_code = 1


class ConfigError(StagerdError):
    """A missing or malformed setting; names the variable, never its secret value."""

    exit_code = 2


class UsageError(StagerdError):
    """Bad command-line input (for instance an invalid batch id)."""

    exit_code = 2


class TransientError(StagerdError):
    """The operation may succeed if retried later."""


class PermanentError(StagerdError):
    """Retrying the same input cannot succeed."""


class InvalidBatchId(PermanentError):
    """A batch id that does not match the allowed pattern."""

    exit_code = 2


class InvalidJob(PermanentError):
    """A job payload that cannot be parsed or lacks required fields."""


class ArchiveRejected(PermanentError):
    """An archive that is truncated, corrupt, hostile or does not match its digest."""


class ScratchBudgetExceeded(PermanentError):
    """A request larger than the whole scratch budget: waiting can never satisfy it."""


class ScratchUnavailable(TransientError):
    """The budget or the disk cannot hold the request now (timed out waiting)."""


class ProcessorFailed(TransientError):
    """The processor exited non-zero or timed out."""


class ProcessorContained(PermanentError):
    """The processor broke a limit of its contract (disk allowance, volume headroom)."""


class ResultsRejected(PermanentError):
    """Results the ledger cannot hold: invalid, over a limit, or refused by PostgreSQL.

    Permanent because the same results file would be refused again on every attempt."""


class ServiceUnavailable(TransientError):
    """A backing service (S3, Redis, PostgreSQL) could not be reached."""


class LeaseLost(StagerdError):
    """This worker no longer holds the batch: recovery gave it to another worker (its
    heartbeat expired) or a newer lease token reached the ledger first. The batch must be
    abandoned at once: nothing committed, no queue transition, scratch released (kept
    when the processor had already finished: the batch's next owner on this host adopts
    the results)."""


class BatchIdReused(PermanentError):
    """An archive that differs (size or digest) from what its batch id already holds."""


class WorkerIdInUse(StagerdError):
    """Another live process on this host runs with the same worker id."""


class ObjectNotFound(PermanentError):
    """The object store has no such key (HTTP 404 on an object): retrying cannot make it."""


class BucketNotFound(PermanentError):
    """The object store has no such bucket (NoSuchBucket)."""


class NoSuchUpload(PermanentError):
    """The multipart upload id is unknown: it was completed or aborted (by this run or a
    concurrent one), so a caller must look at the object to know which."""


class ObjectChanged(PermanentError):
    """A read pinned to an ETag (If-Match) failed with 412: the object was replaced.

    Permanent for the request (the same pinned read fails again, so no retry policy repeats
    it); a caller that can start over from a fresh HEAD makes it transient for its job, as
    staging does (:func:`stagerd.s3.fetch.map_s3_error`)."""


def first_line(exc: BaseException) -> str:
    """The first line of *exc*'s message, or its type's name when the message is empty.

    psycopg's errors carry libpq's multi-line detail and botocore's the server's body: one
    line is what a report, a reason or a log line should hold. For ``Type: line``, redacted
    and bounded, use :func:`stagerd.retry.brief` (built on this)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
