"""The transfer pipeline: check the archive, upload it, verify it, enqueue it exactly once.

:func:`transfer` is what ``stagerd transfer upload`` and the watcher run; the seed's
:func:`upload_archive` and :func:`get_s3_client` keep their names and signatures for the
existing transfer worker code. Order matters: everything that can be refused cheaply (batch
id, file, tar structure, configuration, Redis and bucket reachability) is checked before a
byte is sent, and the job is pushed only after the object is complete and verified, so
nothing half-done is ever enqueued.
"""

from __future__ import annotations

import json
import os
import stat
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stagerd.archive.tarcheck import check_tar
from stagerd.config.settings import S3Settings, Settings, redact_url
from stagerd.errors import (
    BatchIdReused,
    PermanentError,
    ServiceUnavailable,
    StagerdError,
    TransientError,
)
from stagerd.ids import archive_key, validate_batch_id
from stagerd.job import Job
from stagerd.log import get_logger
from stagerd.progress import make_progress
from stagerd.queue.keys import QueueKeys
from stagerd.retry import RetryPolicy
from stagerd.s3.client import get_s3_client

if TYPE_CHECKING:
    from stagerd.db.ledger import Ledger
    from stagerd.progress import Progress
    from stagerd.queue.redis_queue import RedisClient
    from stagerd.s3.multipart import UploadOptions, UploadResult, UploadTarget
    from stagerd.s3.store import ObjectStore

__all__ = ["TransferReport", "TransferRequest", "get_s3_client", "transfer", "upload_archive"]

log = get_logger(__name__)
# Before any upload, an unreachable endpoint should be reported in seconds, not after the
# full per-part retry budget.
PROBE_POLICY = RetryPolicy(attempts=3, base=0.5, max_delay=2.0, total=30.0)


@dataclass(frozen=True)
class TransferRequest:
    """One archive to transfer. ``None`` part size/concurrency mean "from settings"."""

    path: Path
    batch_id: str
    file_count: int | None = None
    enqueue: bool = True
    force: bool = False
    part_size: int | None = None
    concurrency: int | None = None


@dataclass(frozen=True)
class TransferReport:
    """The command's JSON result."""

    batch_id: str
    s3_key: str
    bytes: int
    sha256: str
    parts: int
    part_size: int
    uploaded_bytes: int
    resumed_bytes: int
    enqueued: bool
    seconds: float
    file_count: int
    bucket: str
    already_uploaded: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Connections:
    """The object store and Redis client, checked once and reused for many transfers.

    A one-shot upload builds its own; the watcher keeps one set for its whole life, so a
    stream of small archives pays for neither a new S3 client, a new Redis connection,
    a new PostgreSQL connection (the ledger check) nor a bucket probe per file.
    """

    s3: S3Settings
    store: ObjectStore
    redis: RedisClient | None
    ledger: Ledger | None = None

    @classmethod
    def open(cls, settings: Settings, *, enqueue: bool = True) -> Connections:
        """Connect and probe. Raises ConfigError, ServiceUnavailable or PermanentError."""
        from stagerd.s3.boto import BotoStore

        s3 = settings.require_s3()
        redis_client = _connect_redis(settings) if enqueue else None
        store = BotoStore.from_settings(s3)
        _probe_bucket(store, s3)
        return cls(s3, store, redis_client, _open_ledger(settings))

    def close(self) -> None:
        """Drop the ledger's connection (the others hold nothing a process exit leaks)."""
        if self.ledger is not None:
            self.ledger.close()


def transfer(
    settings: Settings,
    request: TransferRequest,
    *,
    policy: RetryPolicy | None = None,
    stop: threading.Event | None = None,
    progress_mode: str = "auto",
    connections: Connections | None = None,
) -> TransferReport:
    """Check, upload, verify and (unless ``enqueue=False``) enqueue one archive.

    Raises InvalidBatchId (exit 2), ConfigError (exit 2), PermanentError/ArchiveRejected
    (bad file, 403, missing bucket), ServiceUnavailable/TransientError (S3 or Redis
    unreachable), UploadInterrupted (stop was set; rerun resumes).
    """
    from stagerd.s3.multipart import UploadTarget

    started = time.monotonic()
    batch_id = validate_batch_id(request.batch_id)
    key = archive_key(batch_id)
    path = Path(request.path)
    _check_readable(path)
    file_count = _file_count(path, request.file_count)
    if request.concurrency is not None:
        settings = settings.replace(concurrency=request.concurrency)
    kept = connections is not None and not (request.enqueue and connections.redis is None)
    if connections is None or not kept:
        connections = Connections.open(settings, enqueue=request.enqueue)
    s3, store = connections.s3, connections.store
    redis_client = connections.redis if request.enqueue else None
    size = path.stat().st_size
    if not request.force:
        # A kept ledger (the watcher's) is reused; a one-shot run's is closed after the check.
        _check_ledger_archive(settings, batch_id, path, size, connections.ledger if kept else None)
    target = UploadTarget(store, s3.bucket, key)
    options = _upload_options(settings, request, batch_id, policy)
    progress = make_progress(f"upload {batch_id}", size, mode=progress_mode)
    result = _upload(target, path, options, stop, progress)
    enqueued = False
    if redis_client is not None:
        enqueued = _enqueue_and_record(
            redis_client, store, settings, request, result, file_count, policy or RetryPolicy()
        )
    report = TransferReport(
        batch_id=batch_id,
        s3_key=key,
        bytes=result.size,
        sha256=result.sha256,
        parts=result.parts,
        part_size=result.part_size,
        uploaded_bytes=result.uploaded_bytes,
        resumed_bytes=result.resumed_bytes,
        enqueued=enqueued,
        seconds=round(time.monotonic() - started, 3),
        file_count=file_count,
        bucket=s3.bucket,
        already_uploaded=result.already_complete,
    )
    log.info("transferred %s", key, extra=report.to_dict())
    return report


def _upload(
    target: UploadTarget,
    path: Path,
    options: UploadOptions,
    stop: threading.Event | None,
    progress: Progress,
) -> UploadResult:
    """The multipart upload with its progress display, closed whatever happens."""
    from stagerd.s3.multipart import upload_file

    try:
        return upload_file(target, path, options, stop=stop, progress=progress)
    finally:
        progress.close()


def _upload_options(
    settings: Settings, request: TransferRequest, batch_id: str, policy: RetryPolicy | None
) -> UploadOptions:
    from stagerd.s3.multipart import UploadOptions

    return UploadOptions(
        part_size=request.part_size or settings.part_size,
        concurrency=settings.concurrency,
        max_parts=settings.max_parts,
        policy=policy or RetryPolicy(),
        metadata={"stagerd-batch-id": batch_id},
        force=request.force,
        keep_existing=not request.force,
    )


def _enqueue_and_record(
    redis_client: RedisClient,
    store: ObjectStore,
    settings: Settings,
    request: TransferRequest,
    result: UploadResult,
    file_count: int,
    policy: RetryPolicy,
) -> bool:
    """Enqueue the job once, then write the digest record; whether the job was pushed."""
    batch_id = validate_batch_id(request.batch_id)
    job = Job.new(batch_id, file_count=file_count, size=result.size, sha256=result.sha256)
    if request.force:
        # The worker replaces a done batch only for a job that says so (and only when
        # the digest differs, so a redelivered job never reprocesses twice).
        job = replace(job, extra={**job.extra, "replace": True})
    enqueued = _enqueue(redis_client, settings, job, force=request.force)
    # After the enqueue, and only for jobs stagerd enqueued (the seed's upload_archive
    # creates nothing but the archive): "enqueued" tells reconcile the job was handed to
    # Redis, so its absence from every list after a Redis loss means it was lost.
    digest = {"size": result.size, "sha256": result.sha256, "etag": result.etag}
    fields = {**digest, "file_count": file_count, "enqueued": True}
    s3 = settings.require_s3()
    _record_digest(store, s3.bucket, batch_id, fields, policy)
    return enqueued


def _record_digest(
    store: ObjectStore, bucket: str, batch_id: str, fields: dict[str, Any], policy: RetryPolicy
) -> None:
    """Keep size and digest next to the archive in S3, where a Redis loss cannot take them
    (``stagerd reconcile`` re-enqueues with them). Best effort: the archive is uploaded
    and enqueued already, and reconcile works without the record (size only)."""
    from stagerd.ids import digest_key

    body = json.dumps({"batch_id": batch_id, **fields}, sort_keys=True).encode()
    try:
        policy.call(
            lambda: store.put(bucket, digest_key(batch_id), body, content_type="application/json"),
            what="S3 PutObject (digest record)",
        )
    except (StagerdError, OSError) as exc:
        log.warning("could not write the digest record of %s: %s", batch_id, exc)


def _open_ledger(settings: Settings) -> Ledger | None:
    """The ledger that guards batch ids, or None without DATABASE_URL. It connects on first
    use and again after a failure, so opening it costs nothing and needs no server."""
    if not settings.database_url:
        return None
    from stagerd.db.ledger import CLI_POLICY, Ledger

    return Ledger(settings.database_url, policy=CLI_POLICY)


def _check_ledger_archive(
    settings: Settings, batch_id: str, path: Path, size: int, ledger: Ledger | None = None
) -> None:
    """Refuse a file that differs from what the ledger says *batch_id* holds (the S3 object
    may be gone). Skipped without DATABASE_URL; an unreachable ledger is only a warning
    (the S3 check still refuses an overwrite). *ledger*: a kept one (the watcher's), else
    one is opened and closed here."""
    own = ledger is None
    ledger = _open_ledger(settings) if own else ledger
    if ledger is None:
        return
    try:
        row = ledger.batch(batch_id) if ledger.schema_ready() else None
    except ServiceUnavailable as exc:
        log.warning("cannot check the ledger for batch %s: %s", batch_id, exc)
        return
    finally:
        if own:
            ledger.close()
    if row is None:
        return
    known = row.archive_size if row.archive_size is not None else row.archive_bytes
    why = None
    if known is not None and known != size:
        why = f"the ledger's batch is {known} bytes, {path} is {size}"
    elif row.sha256 and _file_sha256(path) != row.sha256:
        why = f"the ledger's batch has SHA-256 {row.sha256[:12]}..., {path} differs"
    if why:
        raise BatchIdReused(
            f"batch id {batch_id} already holds a different archive ({why}); nothing was "
            "changed (--force replaces it and the batch is processed again)"
        )


def _file_sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def upload_archive(local_path: Path, batch_id: str) -> str:
    """Upload archive to S3, return S3 key (the seed's interface; resumable and verified).

    Settings come from the environment as in the seed. Does not enqueue: the seed's caller
    pushes the job itself.
    """
    request = TransferRequest(Path(local_path), batch_id, enqueue=False)
    return transfer(Settings.from_env(), request, progress_mode="none").s3_key


def _check_readable(path: Path) -> None:
    """Refuse anything but a readable regular file, without blocking on it."""
    try:
        # O_NONBLOCK: a FIFO would otherwise hang the open until some writer appears.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise PermanentError(f"{path}: no such file") from None
    except OSError as exc:
        raise PermanentError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise PermanentError(f"{path}: not a regular file")
    finally:
        os.close(fd)


def _file_count(path: Path, given: int | None) -> int:
    summary = check_tar(path)
    if given is not None and given != summary.file_count:
        log.warning(
            "--file-count %d differs from the %d regular files in %s; using %d",
            given,
            summary.file_count,
            path,
            given,
        )
    return summary.file_count if given is None else given


def _connect_redis(settings: Settings) -> RedisClient:
    from stagerd.queue.errors import queue_errors
    from stagerd.queue.redis_queue import connect

    client = connect(settings.redis_url)
    try:
        client.ping()
    except queue_errors() as exc:
        raise ServiceUnavailable(
            f"Redis at {redact_url(settings.redis_url)} unreachable: {exc}"
        ) from None
    return client


def _probe_bucket(store: ObjectStore, s3: S3Settings) -> None:
    """Fail before uploading when the endpoint, the bucket or the credentials are wrong."""
    try:
        PROBE_POLICY.call(lambda: store.head_bucket(s3.bucket), what="S3 HeadBucket")
    except TransientError as exc:
        raise ServiceUnavailable(str(exc)) from None


def _enqueue(client: RedisClient, settings: Settings, job: Job, *, force: bool) -> bool:
    from stagerd.queue.errors import queue_errors
    from stagerd.queue.redis_queue import enqueue_once

    try:
        pushed = enqueue_once(client, QueueKeys(settings.queue), job, force=force)
    except queue_errors() as exc:
        raise ServiceUnavailable(
            f"Redis at {redact_url(settings.redis_url)} unreachable while enqueuing "
            f"{job.batch_id} (the archive is uploaded; rerun to enqueue): {exc}"
        ) from None
    if not pushed:
        log.info("%s already enqueued with this digest; not enqueued again", job.batch_id)
    return pushed
