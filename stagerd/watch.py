"""``stagerd transfer watch DIR``: transfer every archive renamed into a directory.

Contract:

- A file is ready when it is a regular ``*.tar`` directly in DIR, not a dotfile: senders
  write ``NAME.tar.part`` (or a dotfile) and rename it, which is atomic, so a half-written
  archive is never picked up. The batch id is the file stem. Oldest first.
- Success: the file moves to ``DIR/done/`` (or is deleted with ``delete_after``).
- Failures inherent to the file (not tar, truncated, invalid batch id) move it to
  ``DIR/failed/`` next to ``NAME.tar.error`` saying why. Failures of the infrastructure
  (S3 or Redis unreachable, 403, a file still changing) leave it in place to be retried
  after a back-off: the archive is fine and moving every file aside during an outage
  would only make work for the operator.
- The loop takes a stop event (set by the command's SIGTERM handler): an upload in
  progress stops at the next part boundary and stays resumable; the next start resumes it.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from stagerd.config import Settings
from stagerd.errors import ArchiveRejected, InvalidBatchId, StagerdError
from stagerd.log import get_logger
from stagerd.multipart import UploadInterrupted
from stagerd.transfer import Connections, TransferReport, TransferRequest, transfer

log = get_logger(__name__)
DONE_DIR = "done"
FAILED_DIR = "failed"

# (request, stop) -> report; the command passes the real transfer, tests may wrap it.
TransferFn = Callable[[TransferRequest, threading.Event], TransferReport]


@dataclass(frozen=True)
class WatchOptions:
    directory: Path
    interval: float = 1.0
    delete_after: bool = False
    enqueue: bool = True
    part_size: int | None = None
    concurrency: int | None = None
    progress_mode: str = "json"
    retry_delays: tuple[float, ...] = field(default=(5.0, 15.0, 60.0, 300.0))


def run_watch(settings: Settings, options: WatchOptions, stop: threading.Event) -> None:
    """Watch with the real transfer pipeline until *stop* is set."""

    cached: list[Connections] = []
    if options.concurrency is not None:
        settings = settings.replace(concurrency=options.concurrency)

    def run(request: TransferRequest, stop_event: threading.Event) -> TransferReport:
        if not cached:
            cached.append(Connections.open(settings, enqueue=options.enqueue))
        try:
            return transfer(
                settings,
                request,
                stop=stop_event,
                progress_mode=options.progress_mode,
                connections=cached[0],
            )
        except StagerdError:
            # The endpoint, bucket, credentials or Redis may be what failed: connect and
            # probe afresh before the next archive.
            cached.clear()
            raise

    Watcher(options, run).loop(stop)


def ready_archives(directory: Path) -> list[Path]:
    """Complete archives in *directory*, oldest first."""
    found: list[tuple[float, Path]] = []
    with os.scandir(directory) as entries:
        for entry in entries:
            if entry.name.startswith(".") or not entry.name.endswith(".tar"):
                continue
            try:
                if entry.is_file(follow_symlinks=False):
                    found.append((entry.stat(follow_symlinks=False).st_mtime, Path(entry.path)))
            except FileNotFoundError:
                continue  # renamed away between listing and stat
    return [path for _, path in sorted(found)]


class Watcher:
    """The scan-transfer-move loop; *run* does one transfer."""

    def __init__(
        self, options: WatchOptions, run: TransferFn, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.options = options
        self.run = run
        self.clock = clock
        # Per file: consecutive infrastructure failures and when to try again.
        self.backoff: dict[Path, tuple[int, float]] = {}

    def loop(self, stop: threading.Event) -> None:
        directory = self.options.directory
        if not directory.is_dir():
            raise StagerdError(f"{directory}: not a directory")
        log.info("watching %s", directory, extra={"interval": self.options.interval})
        while not stop.is_set():
            self.scan_once(stop)
            stop.wait(self.options.interval)
        log.info("watcher stopped")

    def scan_once(self, stop: threading.Event) -> list[TransferReport]:
        """Transfer every ready archive once; return the successful reports."""
        reports = []
        for path in ready_archives(self.options.directory):
            if stop.is_set():
                break
            if self.clock() < self.backoff.get(path, (0, 0.0))[1]:
                continue
            report = self.handle(path, stop)
            if report is not None:
                reports.append(report)
        return reports

    def handle(self, path: Path, stop: threading.Event) -> TransferReport | None:
        request = TransferRequest(
            path=path,
            batch_id=path.name[: -len(".tar")],
            enqueue=self.options.enqueue,
            part_size=self.options.part_size,
            concurrency=self.options.concurrency,
        )
        try:
            report = self.run(request, stop)
        except UploadInterrupted:
            log.info("stopped during %s; it resumes on the next start", path.name)
            return None
        except (ArchiveRejected, InvalidBatchId) as exc:
            self._fail(path, exc)
            return None
        except StagerdError as exc:
            self._defer(path, exc)
            return None
        self.backoff.pop(path, None)
        self._done(path)
        return report

    def _done(self, path: Path) -> None:
        if self.options.delete_after:
            path.unlink(missing_ok=True)
            return
        done = self.options.directory / DONE_DIR
        done.mkdir(exist_ok=True)
        os.replace(path, done / path.name)

    def _fail(self, path: Path, exc: StagerdError) -> None:
        failed = self.options.directory / FAILED_DIR
        failed.mkdir(exist_ok=True)
        stamp = datetime.now(timezone.utc).isoformat()
        # The .error file first: a crash in between leaves an explained file, not a
        # silently vanished one.
        (failed / f"{path.name}.error").write_text(f"{exc}\nfailed_at: {stamp}\n")
        os.replace(path, failed / path.name)
        log.error("%s failed, moved to %s/: %s", path.name, FAILED_DIR, exc)

    def _defer(self, path: Path, exc: StagerdError) -> None:
        count = self.backoff.get(path, (0, 0.0))[0] + 1
        delays = self.options.retry_delays
        delay = delays[min(count, len(delays)) - 1] if delays else 0.0
        self.backoff[path] = (count, self.clock() + delay)
        log.warning(
            "%s not transferred (will retry in %.0fs): %s",
            path.name,
            delay,
            exc,
            extra={"failures": count},
        )
