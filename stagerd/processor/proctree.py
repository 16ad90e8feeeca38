"""Keeping the processor's process tree, and stagerd's secrets, under the worker's control.

Every processor runs below its own subreaper (:mod:`stagerd.processor.reaper`), so its whole tree
is that reaper's descendants and ends with it. This module is the worker's side:

- :func:`reaper_argv` wraps a processor command in the reaper, :func:`standby_argv` starts
  one ahead of its batch;
- :func:`end_helpers` kills every descendant of a reaper but the processor itself (a
  persistent processor's helpers at the end of each batch) and waits until they are gone;
- :func:`harden_worker` (called by ``stagerd gpu``) makes the worker non-dumpable, so a
  processor running as the same user cannot read ``/proc/<worker>/environ`` or ``mem``,
  and a child subreaper, so even a processor that killed its own reaper leaves its tree to
  the worker, which then kills every child it did not start (:func:`sweep_orphans`).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from stagerd.log import get_logger
from stagerd.processor import reaper

log = get_logger(__name__)

PR_SET_DUMPABLE = 4
PR_SET_CHILD_SUBREAPER = 36
REAPER = Path(reaper.__file__)
_spawning = threading.Lock()
_started: set[int] = set()  # reapers this worker started and has not waited for yet
_hardened: dict[str, bool] = {"subreaper": False}  # process-wide, like the prctl it mirrors


def reaper_argv(
    argv: list[str], pid_fd: int, grace: float, done: tuple[str, str] | None = None
) -> list[str]:
    """*argv* run below a fresh reaper that reports the processor's pid on *pid_fd* (and,
    given *done*, renames ``done[0]`` to ``done[1]`` in its cwd when *argv* exits 0)."""
    return [*_reaper_head(pid_fd, grace), *([":".join(done)] if done else []), "--", *argv]


def standby_argv(pid_fd: int, req_fd: int, grace: float) -> list[str]:
    """A reaper started ahead of its batch, waiting on *req_fd* for what to run."""
    return [*_reaper_head(pid_fd, grace), "--standby", str(req_fd)]


def _reaper_head(pid_fd: int, grace: float) -> list[str]:
    # -I -S: the reaper needs the stdlib only and must not pick up the processor's paths.
    return [sys.executable, "-I", "-S", str(REAPER), str(os.getpid()), str(pid_fd), f"{grace:g}"]


@contextlib.contextmanager
def spawning() -> Iterator[set[int]]:
    """Hold while starting a reaper; add its pid to the yielded set (so a concurrent
    orphan sweep never mistakes a reaper being born for an orphan)."""
    with _spawning:
        yield _started


def forget(pid: int) -> None:
    """The reaper *pid* was waited for."""
    with _spawning:
        _started.discard(pid)


def descendants(root: int) -> list[int]:
    """Every live descendant of *root* (children first found, then theirs)."""
    return reaper.descendants(root)


def end_helpers(root: int, keep: int | None, timeout: float = 5.0) -> int:
    """SIGKILL every descendant of *root* except *keep*; wait (bounded) until they are
    gone (the reaper reaps them). Returns how many were killed."""
    killed: set[int] = set()
    deadline = time.monotonic() + timeout
    while True:
        left = [pid for pid in descendants(root) if pid != keep and _alive(pid)]
        if not left or time.monotonic() >= deadline:
            return len(killed)
        for pid in left:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
            killed.add(pid)
        time.sleep(0.02)


def harden_worker() -> None:
    """Non-dumpable (secrets unreadable through /proc) and a child subreaper."""
    if _prctl(PR_SET_DUMPABLE, 0):
        log.debug("worker is non-dumpable: /proc/<pid>/environ and mem are root-only")
    else:
        log.warning("cannot make the worker non-dumpable: processors may read its memory")
    _hardened["subreaper"] = _prctl(PR_SET_CHILD_SUBREAPER, 1)


def sweep_orphans() -> int:
    """Kill and reap the worker's children it did not start itself (the tree of a
    processor that killed its own reaper). A no-op unless :func:`harden_worker` ran."""
    if not _hardened["subreaper"]:
        return 0
    killed: list[int] = []
    with _spawning:
        for pid in reaper.children(os.getpid()):
            if pid not in _started:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
    for pid in killed:  # only those: waiting on a reaper would steal its status from Popen
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
    swept = len(killed)
    if swept:
        log.warning("killed %d orphaned processor process(es)", swept)
    return swept


def _alive(pid: int) -> bool:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return False
    return fields[0] not in ("Z", "X")


def _prctl(option: int, value: int) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(option, value, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False
