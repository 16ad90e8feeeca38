"""What the processor writes counts against its batch: the guard the processor polls.

While the processor runs, the worker measures the batch dir (links not followed, one file
system) and the volume's free space. The processor is stopped, and the batch fails
permanently, as soon as the batch dir holds more than its reservation plus
``STAGERD_PROCESS_SCRATCH_ALLOWANCE``, or the volume's free space falls inside
``STAGERD_SCRATCH_HEADROOM`` (the model weights beside scratch must never starve).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from stagerd.units import format_size

if TYPE_CHECKING:
    from stagerd.scratch.space import Reservation, ScratchManager

# Walking a batch dir with many files costs CPU: check at most this often, and never spend
# more than ~10% of the time walking.
MIN_INTERVAL = 0.2
WALK_SHARE = 10.0


class DiskGuard:
    """Called by the processor's wait loop: a reason to stop it now, or None."""

    def __init__(self, scratch: ScratchManager, reservation: Reservation, allowance: int) -> None:
        self._scratch = scratch
        self._reservation = reservation
        self._allowance = allowance
        self._next = 0.0

    def __call__(self) -> str | None:
        now = time.monotonic()
        if now < self._next:
            return None
        free = self._scratch.free()
        if free < self._scratch.headroom:
            self._next = now  # stay on it: the next poll checks again
            return (
                f"the scratch volume has {format_size(free)} free, inside the "
                f"{format_size(self._scratch.headroom)} headroom (STAGERD_SCRATCH_HEADROOM)"
            )
        written = self._scratch.dirs.written(self._reservation.batch_id)
        spent = time.monotonic() - now
        self._next = now + max(MIN_INTERVAL, spent * WALK_SHARE)
        limit = self._reservation.nbytes + self._allowance
        if written > limit:
            return (
                f"the batch dir holds {format_size(written)}, more than its reservation of "
                f"{format_size(self._reservation.nbytes)} plus the allowance of "
                f"{format_size(self._allowance)} (STAGERD_PROCESS_SCRATCH_ALLOWANCE)"
            )
        return None
