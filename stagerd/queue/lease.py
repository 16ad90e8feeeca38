"""Leases of the batches one worker process holds, and how it learns it lost one.

Every pickup carries a lease token (:meth:`stagerd.queue.redis_queue.ReliableQueue.pop`). A batch is
held from the moment it is claimed in the ledger until its scratch is released. The
worker loses a batch when recovery moved it away (the worker stalled longer than the
heartbeat TTL) or a newer token claimed it in the ledger. It learns it:

- from its heartbeat: the registration was gone, and the batch is no longer in its
  processing list (:meth:`LeaseBook.check`);
- from a fenced ledger write refused (:class:`stagerd.errors.LeaseLost`).

Either way the batch's :class:`Fence` is set: the processor and the staging stream poll it
like the stop event, so the work stops at once and the pipeline abandons the batch
(nothing committed, no queue transition; scratch released, or kept when the processor
had already finished, for the batch's next owner on this host to adopt).
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

from stagerd.liveness import Progress, current_progress
from stagerd.log import get_logger

if TYPE_CHECKING:
    from stagerd.queue.redis_queue import Delivery, ReliableQueue

log = get_logger(__name__)


class Fence(threading.Event):
    """A per-batch stop: set when the lease is lost, and also "set" while *parent* is
    (the worker's stop or kill), so one event passed to the processor covers both.

    Every poll counts as progress of the thread doing the work (:class:`Progress`)."""

    def __init__(self, parent: threading.Event, progress: Progress | None = None) -> None:
        super().__init__()
        self.parent = parent
        self.progress = progress or current_progress()

    @property
    def lost(self) -> bool:
        return super().is_set()

    def is_set(self) -> bool:
        if self.progress is not None:
            self.progress.touch()
        return super().is_set() or self.parent.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        # Wake on either event: poll the parent in short steps.
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.is_set():
            left = 0.1 if deadline is None else min(0.1, deadline - time.monotonic())
            if left <= 0:
                return False
            super().wait(left)
        return True


class LeaseBook:
    """The batches this process holds: delivery -> fence. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[int, tuple[Delivery, Fence]] = {}

    def hold(self, d: Delivery, fence: Fence) -> None:
        with self._lock:
            self._held[id(fence)] = (d, fence)

    def drop(self, fence: Fence) -> None:
        with self._lock:
            self._held.pop(id(fence), None)

    def held(self) -> list[tuple[Delivery, Fence]]:
        with self._lock:
            return list(self._held.values())

    def check(self, queue: ReliableQueue) -> list[str]:
        """After a lost registration: fence every held batch no longer in our processing
        list (recovery moved it; another worker may have it now). The ids fenced."""
        lost = []
        for d, fence in self.held():
            if fence.lost or queue.holds(d):
                continue
            fence.set()
            lost.append(d.batch_id or "(invalid)")
            log.error(
                "lost the lease of batch %s (recovered while this worker stalled): "
                "stopping its work, committing nothing",
                d.batch_id,
                extra={"batch_id": d.batch_id, "lease": d.lease, "event": "lease_lost"},
            )
        return lost
