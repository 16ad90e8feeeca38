"""Staging one batch: HEAD, stream or download, verify, extract into the reservation.

``stage_batch`` is the GPU worker's staging step. Default (stream) mode feeds ranged GETs
straight into the tar extractor, so scratch holds ~1x the archive; ``keep_archive`` mode
is the seed's flow (``archive.tar`` in the batch dir, then extract) made resumable and
verified *before* extraction. Either way the size is always checked against HEAD (and
the payload's ``size``) and the SHA-256 against the payload's ``sha256`` when present; a
mismatch deletes ``input/`` and raises :class:`ArchiveRejected`, so nothing unverified
ever reaches the processor.

The seed's ``download_archive(s3_key, batch_id)`` and ``cleanup_scratch(batch_id)`` keep
their names and signatures for existing callers.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from stagerd.archive.extract import DEFAULT_MAX_MEMBERS, ExtractLimits, ExtractStats, extract_tar
from stagerd.errors import (
    ArchiveRejected,
    ScratchBudgetExceeded,
    ScratchUnavailable,
    StagerdError,
)
from stagerd.ids import validate_batch_id
from stagerd.job import Job
from stagerd.log import get_logger
from stagerd.retry import RetryPolicy
from stagerd.s3.fetch import (
    DEFAULT_RANGE_SIZE,
    ArchiveHead,
    FileSource,
    RangedStream,
    RangeOpener,
    StageInterrupted,
    download_to_file,
    head_object,
    map_s3_error,
    s3_range_opener,
)
from stagerd.streams import CHUNK

if TYPE_CHECKING:
    from stagerd.s3.store import ObjectStore

__all__ = [
    "ArchiveHead",
    "StageInterrupted",
    "StageResult",
    "cleanup_scratch",
    "download_archive",
    "head_archive",
    "stage_batch",
]

log = get_logger(__name__)
INPUT_DIR = "input"
ARCHIVE_NAME = "archive.tar"
_EXTEND_STEP = 64 * 1024**2
DEFAULT_POLICY = RetryPolicy()  # frozen, so one shared default is safe


class ReservationLike(Protocol):
    """What staging needs of :class:`stagerd.scratch.space.Reservation`."""

    @property
    def path(self) -> Path: ...

    @property
    def nbytes(self) -> int: ...

    def extend(self, extra: int, *, timeout: float = 0.0) -> None: ...


@dataclass(frozen=True)
class StageResult:
    """One staged batch: sizes, file count, the archive's SHA-256 and the elapsed time."""

    archive_bytes: int
    extracted_bytes: int
    file_count: int
    sha256: str
    seconds: float


def head_archive(store: ObjectStore, bucket: str, s3_key: str) -> ArchiveHead:
    """Size and ETag of the archive. Missing key -> ArchiveRejected; network -> TransientError."""
    try:
        return head_object(store, bucket, s3_key)
    except (StagerdError, OSError) as exc:
        raise map_s3_error(exc, bucket, s3_key) from None


def stage_batch(
    store: ObjectStore,
    bucket: str,
    job: Job,
    reservation: ReservationLike,
    *,
    keep_archive: bool = False,
    policy: RetryPolicy = DEFAULT_POLICY,
    stop: threading.Event | None = None,
    on_progress: Callable[[int], None] | None = None,
    max_members: int = DEFAULT_MAX_MEMBERS,
    range_size: int = DEFAULT_RANGE_SIZE,
    head: ArchiveHead | None = None,
) -> StageResult:
    """Fetch, verify and extract *job*'s archive into ``reservation.path / "input"``.

    *head* is the caller's HEAD of the object when it already made one (to size the
    reservation): the reads are pinned to its ETag either way, so a replaced object is
    still caught, and the request is not repeated.
    *on_progress(n)* gets the archive bytes read so far. Raises ArchiveRejected
    (missing/corrupt/hostile/mismatch: permanent), TransientError (network, ENOSPC, an
    object replaced mid-staging), StageInterrupted (*stop* set), ScratchBudgetExceeded /
    ScratchUnavailable (the extraction outgrew what the budget can give).
    """
    started = time.monotonic()
    if head is None:
        head = policy.call(
            lambda: head_archive(store, bucket, job.s3_key), what=f"HEAD {job.s3_key}", stop=stop
        )
    if job.size is not None and job.size != head.size:
        raise ArchiveRejected(f"archive {job.s3_key} is {head.size} bytes, the job says {job.size}")
    input_dir = reservation.path / INPUT_DIR
    _remove(input_dir)  # leftovers of an earlier attempt in a reused batch dir
    fetch = _Fetch(
        opener=s3_range_opener(store, bucket, job.s3_key, head.etag),
        describe=partial(map_s3_error, bucket=bucket, key=job.s3_key),
        policy=policy, stop=stop, range_size=range_size, on_progress=on_progress,
    )  # fmt: skip
    budget = _Budget(reservation)
    limits = ExtractLimits(max_members=max_members)
    try:
        if keep_archive:
            archive = reservation.path / ARCHIVE_NAME
            stats, digest = _stage_kept(fetch, head, job, archive, input_dir, budget, limits)
        else:
            stats, digest = _stage_streamed(fetch, head, job, input_dir, budget, limits)
    except BaseException:
        _remove(input_dir)
        raise
    _check_file_count(job, stats)
    return StageResult(
        archive_bytes=head.size,
        extracted_bytes=stats.bytes,
        file_count=stats.files,
        sha256=digest,
        seconds=time.monotonic() - started,
    )


@dataclass(frozen=True)
class _Fetch:
    """How to read the archive: one pinned opener plus the knobs every read shares."""

    opener: RangeOpener
    describe: Callable[[BaseException], StagerdError]
    policy: RetryPolicy
    stop: threading.Event | None
    range_size: int
    on_progress: Callable[[int], None] | None


def _stage_streamed(
    fetch: _Fetch, head: ArchiveHead, job: Job, input_dir: Path, budget: _Budget,
    limits: ExtractLimits,
) -> tuple[ExtractStats, str]:  # fmt: skip
    """Ranged GETs straight into the extractor; the digest can only be checked at the end."""
    stream = RangedStream(
        fetch.opener, head.size, describe=fetch.describe, range_size=fetch.range_size,
        policy=fetch.policy, stop=fetch.stop,
    )  # fmt: skip
    with stream:
        source = _Progress(stream, fetch.on_progress)
        stats = extract_tar(source, input_dir, charge=budget.charge, limits=limits)
        _drain(stream, fetch.on_progress)
    digest = stream.sha256()
    _verify(job, digest)  # on mismatch the caller deletes input/ before anyone sees it
    return stats, digest


def _stage_kept(
    fetch: _Fetch, head: ArchiveHead, job: Job, archive: Path, input_dir: Path,
    budget: _Budget, limits: ExtractLimits,
) -> tuple[ExtractStats, str]:  # fmt: skip
    """The seed's flow: archive.tar (resumable), verified *before* anything is extracted."""
    digest = download_to_file(
        fetch.opener, head, archive, describe=fetch.describe, charge=budget.charge,
        policy=fetch.policy, stop=fetch.stop, range_size=fetch.range_size,
        on_progress=fetch.on_progress,
    )  # fmt: skip
    try:
        _verify(job, digest)
    except ArchiveRejected:
        # Not resumable: a later forced retry must download afresh.
        archive.unlink(missing_ok=True)
        archive.with_name(archive.name + ".etag").unlink(missing_ok=True)
        raise
    return _extract_file(archive, input_dir, budget, limits, fetch.stop), digest


def _check_file_count(job: Job, stats: ExtractStats) -> None:
    """A file count that differs from the job's is worth a warning, not a failure."""
    if job.file_count is not None and job.file_count != stats.files:
        log.warning(
            "batch %s: archive has %d files, the job says %d",
            job.batch_id, stats.files, job.file_count,
            extra={"batch_id": job.batch_id},
        )  # fmt: skip


def _verify(job: Job, digest: str) -> None:
    if job.sha256 is not None and digest != job.sha256:
        raise ArchiveRejected(
            f"archive {job.s3_key} SHA-256 mismatch: got {digest}, the job says {job.sha256}"
        )


def _extract_file(
    archive: Path, input_dir: Path, budget: _Budget, limits: ExtractLimits,
    stop: threading.Event | None,
) -> ExtractStats:  # fmt: skip
    fd = os.open(archive, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        return extract_tar(FileSource(fd, stop), input_dir, charge=budget.charge, limits=limits)
    finally:
        os.close(fd)


def _drain(stream: RangedStream, on_progress: Callable[[int], None] | None) -> None:
    """Read past the end-of-archive marker: the digest covers every byte of the object."""
    while stream.next_view(CHUNK):
        if on_progress is not None:
            on_progress(stream.consumed)


class _Progress:
    """A ChunkSource reporting the bytes read to *on_progress*."""

    def __init__(self, stream: RangedStream, on_progress: Callable[[int], None] | None) -> None:
        self._stream = stream
        self._on_progress = on_progress

    def next_view(self, limit: int) -> memoryview:
        view = self._stream.next_view(limit)
        if self._on_progress is not None and len(view) >= 4096:
            self._on_progress(self._stream.consumed)
        return view


class _Budget:
    """Counts bytes written against the reservation, extending it when they outgrow it."""

    def __init__(self, reservation: ReservationLike) -> None:
        self._reservation = reservation
        self._allowed = reservation.nbytes
        self.used = 0

    def charge(self, nbytes: int) -> None:
        self.used += nbytes
        if self.used <= self._allowed:
            return
        shortfall = self.used - self._allowed
        # Extend in steps so a large overrun is not one budget round-trip per MiB; near the
        # budget's edge fall back to exactly what is missing.
        step = max(shortfall, min(_EXTEND_STEP, max(self._allowed // 8, 1)))
        try:
            self._reservation.extend(step)
        except (ScratchBudgetExceeded, ScratchUnavailable):
            if step == shortfall:
                raise
            step = shortfall
            self._reservation.extend(step)
        self._allowed += step


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)  # rmtree refuses these; never follow a planted link
    else:
        shutil.rmtree(path, ignore_errors=True)


# --- the seed's API -------------------------------------------------------------------


def download_archive(s3_key: str, batch_id: str) -> Path:
    """Download archive from S3 to local scratch (``{scratch}/{batch_id}/archive.tar``).

    The seed's call, now resumable (ranged GETs pinned to the ETag) and retried. Settings
    come from the environment. Raises ConfigError, InvalidBatchId, ArchiveRejected (no such
    key), TransientError (network after retries).
    """
    from stagerd.config.settings import Settings
    from stagerd.s3.boto import BotoStore

    settings = Settings.from_env()
    s3 = settings.require_s3()
    scratch_dir = settings.scratch_dir / validate_batch_id(batch_id)
    scratch_dir.mkdir(parents=True, exist_ok=True)
    store = BotoStore.from_settings(s3)
    policy = RetryPolicy()
    head = policy.call(lambda: head_archive(store, s3.bucket, s3_key), what=f"HEAD {s3_key}")
    local_path = scratch_dir / ARCHIVE_NAME
    download_to_file(
        s3_range_opener(store, s3.bucket, s3_key, head.etag),
        head,
        local_path,
        describe=partial(map_s3_error, bucket=s3.bucket, key=s3_key),
        charge=lambda _n: None,
        policy=policy,
        range_size=settings.range_size,
    )
    return local_path


def cleanup_scratch(batch_id: str) -> None:
    """Remove batch scratch directory after processing (the seed's call; id validated)."""
    from stagerd.config.settings import Settings

    _remove(Settings.from_env().scratch_dir / validate_batch_id(batch_id))
