"""A job slot: one stager thread and one processor thread joined by a FIFO hand-off.

With ``prefetch = N`` a slot holds at most N + 1 batches (one processing, N staged or
staging), enforced by a semaphore the stager takes before it pops. ``prefetch = 0`` is
the plain loop: pop, stage, process, then pop the next. The stager is a single thread, so
batches reach the processor in the order they were popped (FIFO).

Every batch a slot holds is an in-flight job of this worker (in its Redis processing list)
with its own scratch reservation, so a SIGKILL at any moment loses nothing. What it holds
here (in-flight count, the slot's token, lease, reservation) is its
:class:`~stagerd.gpu.batch.Batch`'s, released when the last ``with batch:`` block ends. On ``stop``
the stager stops popping, requeues the batch it is staging and every staged-and-waiting
batch at once (their staging is cheap to redo), while the processor thread drains the
batch in processing (the worker sets ``kill`` after ``--drain-timeout``).
"""

from __future__ import annotations

import threading
from collections import deque
from typing import TYPE_CHECKING

from stagerd.gpu.batch import Batch, InFlight
from stagerd.liveness import Progress, touch, track
from stagerd.log import get_logger
from stagerd.shutdown import LeftForRecovery

if TYPE_CHECKING:
    from collections.abc import Callable

    from stagerd.gpu.batch import Staged
    from stagerd.gpu.pipeline import BatchSteps
    from stagerd.processor.runner import Processor

__all__ = ["InFlight", "Slot"]

log = get_logger(__name__)


class Slot:
    """One job slot (``--concurrency N`` runs N of them over one scratch budget)."""

    def __init__(
        self,
        index: int,
        steps: BatchSteps,
        make_processor: Callable[[], Processor],
        *,
        prefetch: int,
        burst: bool,
        stop: threading.Event,
        kill: threading.Event,
        in_flight: InFlight,
    ) -> None:
        self.index = index
        self._steps = steps
        self._make_processor = make_processor
        self._burst = burst
        self._stop = stop
        self._kill = kill
        self._in_flight = in_flight
        self._tokens = threading.BoundedSemaphore(prefetch + 1)
        self._ready: deque[Staged] = deque()
        self._cond = threading.Condition()
        self._stager_done = False
        self.errors: list[BaseException] = []
        # When each thread last showed progress (the worker feeds the watchdog from these).
        self.progress = {"stage": Progress(), "proc": Progress()}
        self._threads = [
            threading.Thread(
                target=self._guard(self._stage_loop, self.progress["stage"]),
                name=f"slot{index}-stage",
            ),
            threading.Thread(
                target=self._guard(self._process_loop, self.progress["proc"]),
                name=f"slot{index}-proc",
            ),
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def alive(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def join(self, timeout: float | None = None) -> None:
        for thread in self._threads:
            thread.join(timeout)

    def stalled(self, limit: float) -> list[str]:
        """The threads of this slot alive but without progress for more than *limit* s."""
        return [
            f"slot{self.index}-{name} ({progress.idle():.0f}s)"
            for (name, progress), thread in zip(self.progress.items(), self._threads, strict=True)
            if thread.is_alive() and progress.idle() > limit
        ]

    def _guard(self, loop: Callable[[], None], progress: Progress) -> Callable[[], None]:
        def run() -> None:
            track(progress)
            progress.touch()
            try:
                loop()
            except LeftForRecovery as exc:
                # Stopping with a service unreachable: the job stays in this worker's
                # processing list, which its next start (or another worker) recovers.
                log.warning(
                    "slot %d: %s; its job stays in the processing list for recovery",
                    self.index,
                    exc,
                )
                self._stop.set()
                with self._cond:
                    self._stager_done = True
                    self._cond.notify_all()
            except BaseException as exc:
                # A bug or an unreachable service: stop the whole worker, keep the job in
                # the processing list (the restarted worker takes it back), re-raise in run().
                log.exception("slot %d crashed", self.index)
                self.errors.append(exc)
                self._stop.set()
                with self._cond:
                    self._stager_done = True
                    self._cond.notify_all()

        return run

    # --- stager ---------------------------------------------------------------

    def _stage_loop(self) -> None:
        try:
            while not self._stop.is_set():
                touch()
                if not self._tokens.acquire(timeout=0.5):
                    continue
                outcome = self._stage_one()
                if outcome == "empty":
                    self._tokens.release()  # no batch took it
                if outcome == "empty" and self._burst and self._in_flight.count == 0:
                    break
        finally:
            self._requeue_waiting()
            with self._cond:
                self._stager_done = True
                self._cond.notify_all()

    def _stage_one(self) -> str:
        """Pop and stage one batch: "staged" (handed off with the token), "ended" (the job
        ended in staging: skipped, failed, requeued) or "empty" (nothing to pop, the token
        still the caller's)."""
        delivery = self._steps.pop(self._stop)
        if delivery is None:
            return "empty"
        steps = self._steps
        batch = Batch(
            delivery,
            in_flight=self._in_flight,
            leases=steps.leases,
            requeue=steps.requeue,
            token=self._tokens,
        )
        with batch:
            # Waiting for budget is safe while another batch of ours will free some.
            staged = steps.stage(batch, self._stop, lambda: self._in_flight.count > 1)
            if staged is None:
                return "ended"
            # Before the hand-off, so the processor's "processing" is never overwritten.
            steps.set_phase(delivery, "staged")
            batch.pass_on()  # the processor thread's block (or _requeue_waiting) closes it
        with self._cond:
            self._ready.append(staged)
            self._cond.notify_all()
        return "staged"

    def _requeue_waiting(self) -> None:
        """On stop: staged batches nobody started go back to the head, order kept."""
        with self._cond:
            waiting = list(self._ready)
            self._ready.clear()
        for staged in reversed(waiting):
            with staged.batch as batch:
                try:
                    batch.hand_back("worker shutting down (prefetched)")
                except LeftForRecovery as exc:
                    log.warning(
                        "prefetched batch %s not handed back (%s); it stays in the processing "
                        "list for recovery",
                        staged.job.batch_id,
                        exc,
                    )

    # --- processor ------------------------------------------------------------

    def _next(self) -> Staged | None:
        with self._cond:
            while True:
                touch()
                if self._stop.is_set():
                    return None
                if self._ready:
                    return self._ready.popleft()
                if self._stager_done:
                    return None
                self._cond.wait(0.5)

    def _process_loop(self) -> None:
        """Process batches in order. The release of a processed batch (its scratch dir
        removed, its token given back to the stager) waits for the next batch's processor
        to start when that batch is already staged: released first, the stager began
        staging at once, and its threads, holding the GIL and both cores, slowed the next
        start-up several-fold (issue 19's prefetch gap). The release never waits on a batch
        that is still staging: that one may be waiting for this one's scratch space."""
        processor = self._make_processor()
        held: Batch | None = None  # processed, its release deferred to the next start
        try:
            while (staged := self._take_next(held)) is not None:
                release, held = _Release(held), None
                try:
                    with staged.batch:
                        self._steps.process(staged, processor, self._kill, release)
                        if self._has_ready() and staged.batch.outcome == "done":
                            staged.batch.drop_lease()  # acked: it left our list
                            staged.batch.pass_on()
                            held = staged.batch
                finally:
                    release.finish()
        finally:
            try:
                if held is not None:
                    held.close()
            finally:
                processor.close()

    def _has_ready(self) -> bool:
        with self._cond:  # an RLock: _take_next calls this holding it
            return bool(self._ready) and not self._stop.is_set()

    def _take_next(self, held: Batch | None) -> Staged | None:
        """The next staged batch; *held* is released first unless one is ready now."""
        if held is not None:
            with self._cond:
                if self._has_ready():
                    return self._ready.popleft()
            held.close()
        return self._next()


class _Release:
    """Closes a held batch once: called by the runner as the next processor starts (where
    it must not raise: an error is kept), or by :meth:`finish` after that batch's
    processing at the latest (which re-raises a kept error: a failed release still ends
    the slot, as it would have in the batch's own ``with`` block)."""

    def __init__(self, batch: Batch | None) -> None:
        self._batch = batch
        self._error: BaseException | None = None

    def __call__(self) -> None:
        batch, self._batch = self._batch, None
        if batch is None:
            return
        try:
            batch.close()
        except BaseException as exc:  # noqa: BLE001  # re-raised by finish(), on this thread
            self._error = exc

    def finish(self) -> None:
        self()
        if self._error is not None:
            raise self._error
