"""flock(2) primitives shared by the scratch manager and the janitor.

Why ``flock`` and not a server or PID files: the kernel drops a BSD lock the moment its
owner dies (SIGKILL, OOM, reboot), so "is this directory still worked on?" has an answer
that needs no PID guessing, and it is the same signal ``systemd-tmpfiles`` honours.
Locks belong to open file descriptions, so two threads of one process that each open the
file conflict exactly like two processes do.

Every open here refuses to follow a symlink (``O_NOFOLLOW``) and never blocks on a FIFO
(``O_NONBLOCK``): the scratch root is a place where hostile or stray entries may appear.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import time
from pathlib import Path
from types import TracebackType

from stagerd.errors import ScratchUnavailable
from stagerd.log import get_logger
from stagerd.scratch.fstree import restore_owner_rwx

log = get_logger(__name__)

# A lock wait longer than this is logged (then every LOG_EVERY seconds), with the holder.
LOG_AFTER = 5.0
LOG_EVERY = 30.0
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_BUSY = (errno.EWOULDBLOCK, errno.EAGAIN)


def open_nofollow(name: str | Path, dir_fd: int | None = None) -> int:
    """Open *name* (a directory or a file) read-only without following a final symlink.

    Raises OSError: ELOOP for a symlink, ENOENT if gone.
    """
    return os.open(name, _OPEN_FLAGS, dir_fd=dir_fd)


def try_flock(fd: int) -> bool:
    """Take an exclusive lock on *fd* without waiting; False if another holder has it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in _BUSY:
            return False
        raise
    return True


def try_lock_entry(name: str | Path, dir_fd: int | None = None) -> int | None:
    """Open and exclusively lock *name*; the locked fd, or None if someone holds the lock.

    The caller owns the returned fd (closing it drops the lock). Raises OSError when the
    entry cannot be opened (ELOOP for a symlink, ENOENT if it vanished).
    """
    try:
        fd = open_nofollow(name, dir_fd)
    except PermissionError:
        # A dir a processor made unreadable (0000/0333): ours, so give the owner back its
        # rights (never through a link), then open it like any other.
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
            raise
        parent = (
            dir_fd
            if dir_fd is not None
            else os.open(os.path.dirname(os.path.abspath(name)), os.O_RDONLY | os.O_DIRECTORY)
        )
        try:
            restore_owner_rwx(os.path.basename(name), parent, st)
        finally:
            if dir_fd is None:
                os.close(parent)
        fd = open_nofollow(name, dir_fd)
    try:
        if try_flock(fd):
            return fd
    except BaseException:
        os.close(fd)
        raise
    os.close(fd)
    return None


def is_locked(path: Path) -> bool:
    """Whether a non-blocking exclusive flock on *path* would fail right now.

    A symlink or a missing entry is never locked (a symlink cannot carry our lock).
    """
    try:
        fd = try_lock_entry(path)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOENT, errno.ENOTDIR):
            return False
        raise
    if fd is None:
        return True
    os.close(fd)
    return False


def _write_pid(fd: int) -> None:
    """Leave our pid in the lock file so a waiter can say who holds it (best effort)."""
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError:
        pass


class FileLock:
    """An exclusive flock on a small lock file, as a context manager.

    ``acquire(blocking=False)`` returns False instead of waiting; a blocking acquire with
    *timeout* raises ScratchUnavailable when it expires.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self, *, blocking: bool = True, timeout: float | None = None) -> bool:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            if not blocking:
                if not try_flock(fd):
                    os.close(fd)
                    return False
            elif timeout is None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            else:
                self._wait(fd, timeout)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        _write_pid(fd)
        return True

    def holder(self) -> int | None:
        """The pid the current holder wrote into the lock file (None if unknown)."""
        try:
            text = self.path.read_text(encoding="ascii", errors="replace").strip()
        except OSError:
            return None
        return int(text) if text.isdigit() else None

    def _wait(self, fd: int, timeout: float) -> None:
        """Poll for the lock; a long wait is logged with the holder's pid (a stopped
        janitor, a hung worker), and again every LOG_EVERY seconds."""
        started = time.monotonic()
        logged_at: float | None = None
        while not try_flock(fd):
            now = time.monotonic()
            if now - started >= timeout:
                raise ScratchUnavailable(
                    f"lock {self.path} still held after {timeout:g}s{self._by()}"
                )
            if now - started >= LOG_AFTER and (logged_at is None or now - logged_at >= LOG_EVERY):
                logged_at = now
                log.warning(
                    "waiting %.0fs for lock %s%s",
                    now - started,
                    self.path,
                    self._by(),
                    extra={"event": "lock_wait", "lock": str(self.path), "pid": self.holder()},
                )
            time.sleep(0.01)
        if logged_at is not None:
            log.info("got lock %s after %.1fs", self.path, time.monotonic() - started)

    def _by(self) -> str:
        pid = self.holder()
        return f" (held by pid {pid})" if pid else ""

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
