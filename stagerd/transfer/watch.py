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
- No single file stops the watcher: any failure of one file (a name too long for its
  ``.error`` file, unreadable, vanished mid-transfer, a bug met on its bytes) is logged and
  that file is moved aside or skipped; symlinks and other non-regular ``*.tar`` entries
  are skipped with one log line each. The ``.error`` file's name is shortened (with a
  digest of the full name) when ``NAME.tar.error`` would not fit the file system.
- The loop takes a stop event (set by the command's SIGTERM handler): an upload in
  progress stops at the next part boundary and stays resumable; the next start resumes it.
"""

from __future__ import annotations

import errno
import hashlib
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from stagerd.config.settings import Settings
from stagerd.errors import ArchiveRejected, InvalidBatchId, StagerdError
from stagerd.log import get_logger
from stagerd.retry import brief
from stagerd.s3.multipart import UploadInterrupted
from stagerd.transfer.upload import Connections, TransferReport, TransferRequest, transfer

log = get_logger(__name__)
DONE_DIR = "done"
FAILED_DIR = "failed"
NAME_MAX = 255  # bytes per path component on ext4, xfs, btrfs

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
            cached.pop().close()
            raise

    Watcher(options, run).loop(stop)


def ready_archives(directory: Path) -> list[Path]:
    """Complete archives in *directory*, oldest first."""
    return scan_inbox(directory)[0]


def scan_inbox(directory: Path) -> tuple[list[Path], list[Path]]:
    """(complete archives oldest first, ``*.tar`` entries skipped: symlinks and others)."""
    found: list[tuple[float, Path]] = []
    skipped: list[Path] = []
    with os.scandir(directory) as entries:
        for entry in entries:
            if entry.name.startswith(".") or not entry.name.endswith(".tar"):
                continue
            try:
                if entry.is_file(follow_symlinks=False):
                    found.append((entry.stat(follow_symlinks=False).st_mtime, Path(entry.path)))
                else:
                    skipped.append(Path(entry.path))
            except OSError:
                continue  # renamed away between listing and stat
    return [path for _, path in sorted(found)], skipped


def error_file_name(name: str) -> str:
    """``NAME.error``, or, when that would not fit one path component, a shortened name
    with a digest of the full one (so two long names never share an error file)."""
    wanted = f"{name}.error"
    if len(os.fsencode(wanted)) <= NAME_MAX:
        return wanted
    digest = hashlib.sha256(os.fsencode(name)).hexdigest()[:16]
    head = os.fsencode(name)[:180].decode("utf-8", "ignore")
    return f"{head}...{digest}.tar.error"


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
        self._skipped: set[Path] = set()  # logged once each

    def loop(self, stop: threading.Event) -> None:
        directory = self.options.directory
        if not directory.is_dir():
            raise StagerdError(f"{directory}: not a directory")
        log.info("watching %s", directory, extra={"interval": self.options.interval})
        while not stop.is_set():
            try:
                self.scan_once(stop)
            except OSError as exc:
                # The inbox itself (a remount, a permission change): say so, keep watching.
                log.error("cannot scan %s: %s", directory, brief(exc))
            stop.wait(self.options.interval)
        log.info("watcher stopped")

    def scan_once(self, stop: threading.Event) -> list[TransferReport]:
        """Transfer every ready archive once; return the successful reports."""
        reports = []
        ready, skipped = scan_inbox(self.options.directory)
        self._log_skipped(skipped)
        for path in ready:
            if stop.is_set():
                break
            if self.clock() < self.backoff.get(path, (0, 0.0))[1]:
                continue
            report = self._handle_safely(path, stop)
            if report is not None:
                reports.append(report)
        return reports

    def _log_skipped(self, skipped: list[Path]) -> None:
        for path in skipped:
            if path not in self._skipped:
                kind = "a symlink" if path.is_symlink() else "not a regular file"
                log.warning("skipping %s: %s (move the archive itself in)", path.name, kind)
        self._skipped = set(skipped)

    def _handle_safely(self, path: Path, stop: threading.Event) -> TransferReport | None:
        """:meth:`handle`, with whatever one file raises kept to that file."""
        try:
            return self.handle(path, stop)
        except FileNotFoundError:
            log.warning("%s vanished while it was being transferred; skipped", path.name)
            self.backoff.pop(path, None)
        except Exception as exc:  # one file's bug or OS error must not stop the watcher
            log.error("%s: unexpected failure, will retry: %s", path.name, brief(exc),
                      exc_info=True)  # fmt: skip
            self._defer(path, exc)
        return None

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
        error_file = failed / error_file_name(path.name)
        # The .error file first: a crash in between leaves an explained file, not a
        # silently vanished one.
        text = f"{exc}\nfile: {path.name!r}\nfailed_at: {stamp}\n"
        error_file.write_text(text, errors="backslashreplace")  # names may not be UTF-8
        try:
            os.replace(path, failed / path.name)
        except OSError as move:
            if move.errno != errno.ENOENT:
                raise
        log.error("%s failed, moved to %s/ (%s): %s", path.name, FAILED_DIR, error_file.name, exc)

    def _defer(self, path: Path, exc: Exception) -> None:
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
