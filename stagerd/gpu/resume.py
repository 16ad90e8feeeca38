"""Processed-but-uncommitted batches: results that outlive a PostgreSQL outage.

The moment the processor succeeds, ``root/{batch_id}/processed.json`` appears next to the
results file, before the worker commits: the worker writes it as ``.processed.json.pending``
before the processor starts, and the processor's reaper renames it when the processor exits
0 (in persistent mode the worker's stdout reader does, as it reads the answer). So a worker
killed at any moment after the processor finished leaves the marker: no completed GPU run
is repeated for a crash. The worker then rewrites it with the measured seconds.

If the commit cannot reach PostgreSQL the worker retries (``STAGERD_COMMIT_RETRY``) with
the directory locked and the reservation held; if it exits first (retry budget spent,
shutdown, crash) the directory stays on scratch and its job stays in the worker's
processing list. Whichever worker on this host next takes the
job (the restarted worker with the same identity, or another one after recovery moved the
dead worker's job back to the queue) finds the marker and commits the results without
running the processor again, provided the marker is for this very archive (see
:meth:`ProcessedMarker.matches`) and no live process holds the directory (its lock).
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from stagerd.errors import ServiceUnavailable, StagerdError
from stagerd.log import get_logger
from stagerd.scratch.dirs import PROCESSED_MARKER
from stagerd.shutdown import LeftForRecovery

if TYPE_CHECKING:
    import threading

    from stagerd.db.ledger import Ledger
    from stagerd.gpu.stage import StageResult
    from stagerd.job import Job
    from stagerd.processor.runner import ProcessOutcome
    from stagerd.results import ResultLimits
    from stagerd.scratch.space import Reservation, ScratchManager

log = get_logger(__name__)
MARKER = PROCESSED_MARKER
PENDING = f".{MARKER}.pending"  # renamed to MARKER when the processor succeeds
RESULTS = "results.jsonl"  # the processor's output file, beside the marker


@dataclass(frozen=True)
class ProcessedMarker:
    """What the processing step left for a commit that may happen in a later process."""

    batch_id: str
    worker: str
    sha256: str
    process_seconds: float | None  # None: written before the run (see seconds())
    archive_bytes: int
    extracted_bytes: int
    file_count: int
    stage_seconds: float
    started_at: float | None = None  # wall clock when the processor started

    def write(self, batch_dir: Path, name: str = MARKER) -> None:
        """Atomically (rename), so a crash never leaves half a marker."""
        _owner_rwx(batch_dir)
        temp = batch_dir / f".{MARKER}.tmp"
        temp.write_text(json.dumps(asdict(self), sort_keys=True), encoding="utf-8")
        os.replace(temp, batch_dir / name)

    def seconds(self, batch_dir: Path) -> float:
        """How long the processor ran. A marker the reaper renamed into place has no
        measured seconds: its rename (the marker's ctime) is when the processor exited."""
        if self.process_seconds is not None:
            return self.process_seconds
        try:
            ended = (batch_dir / MARKER).lstat().st_ctime
        except OSError:
            return 0.0
        return max(0.0, ended - (self.started_at or ended))

    @classmethod
    def read(cls, batch_dir: Path) -> ProcessedMarker | None:
        """The marker, or None if absent or unreadable (then the batch is staged afresh)."""
        path = batch_dir / MARKER
        try:
            if path.is_symlink():
                return None
            data = json.loads(path.read_text(encoding="utf-8"))
            data.setdefault("started_at", None)  # a marker from before 0.2's reaper rename
            return cls(**{name: data[name] for name in cls.__dataclass_fields__})
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def matches(self, batch_id: str, worker: str, sha256: str | None) -> bool:
        """Ours to commit: the same batch and the archive the job names.

        Our own marker (same identity: a restart) is trusted when the job carries no digest
        (the seed's minimal payload), as it always was. Another worker's marker (it died,
        recovery gave us its job) is adopted only when the job's digest proves it is the
        same archive: with no digest an id replaced meanwhile (``--force``) could not be
        told apart, and re-running the processor is the safe side."""
        if self.batch_id != batch_id:
            return False
        if sha256 is not None:
            return sha256 == self.sha256
        return self.worker == worker


def _owner_rwx(batch_dir: Path) -> None:
    """The processor runs as our user and may have chmod-ed its batch dir (0555): give the
    owner back rwx, without following a link, so the marker can be written."""
    from stagerd.scratch.fstree import restore_owner_rwx

    parent_fd = os.open(batch_dir.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        seen = os.stat(batch_dir.name, dir_fd=parent_fd, follow_symlinks=False)
        if stat.S_ISDIR(seen.st_mode) and stat.S_IMODE(seen.st_mode) & 0o700 != 0o700:
            restore_owner_rwx(batch_dir.name, parent_fd, seen)
    finally:
        os.close(parent_fd)


def _marker(path: Path, worker: str, result: StageResult, seconds: float | None) -> ProcessedMarker:
    return ProcessedMarker(
        batch_id=path.name,
        worker=worker,
        sha256=result.sha256,
        process_seconds=seconds,
        archive_bytes=result.archive_bytes,
        extracted_bytes=result.extracted_bytes,
        file_count=result.file_count,
        stage_seconds=result.seconds,
        started_at=time.time(),
    )


def mark_pending(path: Path, worker: str, result: StageResult) -> tuple[str, str] | None:
    """Before the processor starts: the marker under its pending name, and the renaming
    the processor's success makes (for :attr:`ProcessRequest.done_marker`). None if it
    could not be written (then only the worker's own write after the run marks it)."""
    try:
        _marker(path, worker, result, None).write(path, PENDING)
    except OSError as exc:
        log.warning("batch %s: cannot write the pending resume marker: %s", path.name, exc)
        return None
    return PENDING, MARKER


def mark_processed(path: Path, worker: str, result: StageResult, outcome: ProcessOutcome) -> None:
    """Leave the marker in the batch dir *path*: the results beside it are complete."""
    _marker(path, worker, result, outcome.seconds).write(path)


def keep_results_only(batch_dir: Path) -> int:
    """Remove everything in *batch_dir* but the results and the marker; bytes freed.

    For a batch kept after its lease was lost: its next owner (on this host, if any) adopts
    only those two files, and the input (up to the whole archive again) would otherwise sit
    outside every reservation until the janitor removes the dir. Best effort: a failure
    leaves more on disk, never less than the results."""
    from stagerd.scratch.fstree import remove_tree

    freed = 0
    try:
        _owner_rwx(batch_dir)
        fd = os.open(batch_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        return 0
    try:
        device = os.fstat(fd).st_dev
        for name in os.listdir(fd):
            if name not in (MARKER, RESULTS):
                with contextlib.suppress(OSError):
                    freed += remove_tree(name, fd, device)
    finally:
        os.close(fd)
    return freed


def find_processed(
    scratch: ScratchManager, job: Job, worker: str, limits: ResultLimits
) -> tuple[Reservation, StageResult, ProcessOutcome] | None:
    """The batch's dir adopted (locked, counted) with its stage result and results, when a
    previous run on this host (of *worker*, or of a dead worker whose job recovery gave us)
    processed this very archive and did not commit; else None."""
    from stagerd.gpu.stage import StageResult
    from stagerd.processor.runner import ProcessOutcome
    from stagerd.results import scan_results

    path = scratch.batch_dir(job.batch_id)
    marker = ProcessedMarker.read(path)
    if marker is None or not marker.matches(job.batch_id, worker, job.sha256):
        return None
    reservation = scratch.adopt(job.batch_id)
    if reservation is None:
        return None
    # Fresh again for the janitor's age rule, however long the outage lasts.
    with contextlib.suppress(OSError):
        os.utime(path)
    try:
        # Scanned again (the file is streamed into the commit); the zero-results rule was
        # checked when the processor finished, so an empty input is not asked about here.
        results = scan_results(path / RESULTS, limits, input_empty=True)
    except StagerdError:
        reservation.release()  # damaged: stage and process afresh
        return None
    result = StageResult(
        marker.archive_bytes,
        marker.extracted_bytes,
        marker.file_count,
        marker.sha256,
        marker.stage_seconds,
    )
    return reservation, result, ProcessOutcome(seconds=marker.seconds(path), results=results)


def commit_with_retry(
    ledger: Ledger,
    batch_id: str,
    outcome: ProcessOutcome,
    *,
    worker: str,
    lease: int | None,
    retry_for: float,
    fence: threading.Event,
) -> bool:
    """Commit results + done, retrying while PostgreSQL is unreachable for up to
    *retry_for* seconds (STAGERD_COMMIT_RETRY; the caller keeps the results on scratch).
    Raises LeaseLost, or ServiceUnavailable once the budget is spent or *fence* is set."""
    deadline = time.monotonic() + retry_for
    logged_at: float | None = None
    while True:
        try:
            return ledger.commit_results(
                batch_id,
                outcome.results,
                process_seconds=outcome.seconds,
                worker=worker,
                lease=lease,
                unique=True,
            )
        except ServiceUnavailable as exc:
            left = deadline - time.monotonic()
            ctx = {"batch_id": batch_id, "lease": lease}
            # LeftForRecovery: the worker is stopping and PostgreSQL did not answer.
            if left <= 0 or fence.is_set() or isinstance(exc, LeftForRecovery):
                log.error(
                    "giving up the commit of batch %s for now: %s; results kept on scratch"
                    " for this worker's restart",
                    batch_id,
                    exc,
                    extra={**ctx, "event": "commit_deferred"},
                )
                raise
            if logged_at is None or time.monotonic() - logged_at >= 60:
                logged_at = time.monotonic()
                log.warning(
                    "cannot commit batch %s (%s): results kept on scratch, retrying for"
                    " up to %.0fs more (STAGERD_COMMIT_RETRY)",
                    batch_id,
                    exc,
                    left,
                    extra={**ctx, "event": "commit_retry"},
                )
            fence.wait(min(5.0, max(0.1, left)))
