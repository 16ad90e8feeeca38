"""Whether a worker thread is making progress: what the systemd watchdog is fed from.

A slot thread registers its :class:`Progress` with :func:`track`; anything that shows the
thread is busy rather than hung (a poll, a bounded retry, a chunk staged) calls :func:`touch`.
It lives below every edge because the retry layer and the edges touch it, and the worker
reads it.
"""

from __future__ import annotations

import threading
import time


class Progress:
    """When a worker thread last showed it was moving (the watchdog is fed from this)."""

    def __init__(self) -> None:
        self.stamp = time.monotonic()

    def touch(self) -> None:
        self.stamp = time.monotonic()

    def idle(self) -> float:
        return time.monotonic() - self.stamp


_local = threading.local()


def track(progress: Progress | None) -> None:
    """Make *progress* the calling thread's (a slot thread, at its start)."""
    _local.progress = progress


def current_progress() -> Progress | None:
    return getattr(_local, "progress", None)


def touch() -> None:
    """Count as progress of the calling thread (a poll, a retry: busy, not hung)."""
    progress = current_progress()
    if progress is not None:
        progress.touch()
