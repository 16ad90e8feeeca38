"""Admission arithmetic and waiting: whether a request fits now, and how a request waits.

Pure of IO except the clock and the stop event; :class:`~stagerd.scratch.space.ScratchManager`
calls these under its admission lock.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from stagerd.errors import ScratchUnavailable
from stagerd.log import get_logger
from stagerd.units import format_size

# The waiting lines were always the space module's: keep the logger name operators filter on.
log = get_logger("stagerd.scratch.space")

# How often a waiting request re-checks, and how often it repeats its log line.
POLL_INTERVAL = 0.25
LOG_INTERVAL = 30.0


class StatvfsResult(Protocol):
    """The part of ``os.statvfs_result`` admission reads (the seam tests fill in)."""

    @property
    def f_bavail(self) -> int: ...
    @property
    def f_frsize(self) -> int: ...
    @property
    def f_blocks(self) -> int: ...


Statvfs = Callable[[str], StatvfsResult]


def admission_shortfall(
    request: int,
    budget: int,
    headroom: int,
    free: int,
    live: Sequence[tuple[int, int]],
) -> str | None:
    """Why *request* bytes cannot be admitted now, or None if they can.

    *live* holds (reserved, written) per live reservation; *free* is what statvfs reports.
    """
    reserved = sum(n for n, _ in live)
    unwritten = sum(max(0, n - w) for n, w in live)
    if reserved + request > budget:
        return (
            f"budget: {format_size(budget - reserved)} of {format_size(budget)} unreserved "
            f"({len(live)} live reservations)"
        )
    room = free - unwritten - headroom
    if room < request:
        return (
            f"disk: {format_size(max(0, room))} usable ({format_size(free)} free, "
            f"{format_size(unwritten)} promised to live reservations, "
            f"{format_size(headroom)} headroom)"
        )
    return None


class Waiter:
    """Deadline, stop event and "what are we waiting for" logging of one waiting request."""

    def __init__(self, what: str, timeout: float, stop: threading.Event | None) -> None:
        self.what = what
        self.timeout = timeout
        self.stop = stop
        self.started = time.monotonic()
        self.logged_at: float | None = None

    def wait(self, why: str, interval: float) -> None:
        """Sleep one poll interval; raises ScratchUnavailable on timeout or stop."""
        now = time.monotonic()
        waited = now - self.started
        if waited >= self.timeout:
            raise ScratchUnavailable(f"cannot {self.what} (waited {waited:.1f}s): {why}")
        if self.logged_at is None or now - self.logged_at >= LOG_INTERVAL:
            log.info(f"waiting to {self.what}: {why}", extra={"waited": round(waited, 1)})
            self.logged_at = now
        pause = min(interval, self.timeout - waited)
        if self.stop is not None:
            if self.stop.wait(pause):
                raise ScratchUnavailable(f"stopped while waiting to {self.what}: {why}")
        else:
            time.sleep(pause)
