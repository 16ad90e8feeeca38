"""The scratch reservation manager: a byte budget on the scratch volume that no worker,
crash or race can overrun.

Coordination is through the file system, no server:

- ``root/.stagerd/admission.lock`` serialises every admission decision, the creation of
  batch directories and the reclaiming of dead records (the janitor takes it too).
- ``root/.stagerd/reservations/{batch_id}.json`` records a reservation's size and start.
- ``root/{batch_id}/`` is the batch's directory. Its owner holds an exclusive ``flock`` on
  it for the directory's whole life, and *that lock is the liveness of the reservation*:
  when the owner dies the kernel drops it, the record stops counting and the janitor (which
  honours the same lock, as ``systemd-tmpfiles`` does) may remove the directory.

A directory is created under ``root/.stagerd/tmp/``, locked, then renamed into place, so
nobody ever sees ``root/{batch_id}`` unlocked while its owner is alive.

Admission needs both (a) live reservations + request <= budget and (b) free space on disk
minus the not-yet-written part of every live reservation minus the headroom >= request,
so the model weights on the same volume are never starved.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from stagerd.errors import ConfigError, ScratchBudgetExceeded, ScratchUnavailable
from stagerd.ids import validate_batch_id
from stagerd.log import get_logger
from stagerd.scratch.admission import (
    POLL_INTERVAL,
    Statvfs,
    StatvfsResult,
    Waiter,
    admission_shortfall,
)
from stagerd.scratch.dirs import STATE_DIR, BatchDirs, DirBusy
from stagerd.scratch.locks import FileLock
from stagerd.scratch.locks import is_locked as _is_locked
from stagerd.scratch.records import Record, RecordStore
from stagerd.units import format_size

if TYPE_CHECKING:
    from types import TracebackType

    from stagerd.config.settings import Settings

log = get_logger(__name__)

__all__ = [
    "POLL_INTERVAL",
    "Reservation",
    "ReservationInfo",
    "ScratchManager",
    "ScratchStatus",
    "Statvfs",
    "StatvfsResult",
    "admission_shortfall",
]

# The admission lock is held for milliseconds; a wait this long means its holder hangs
# (a stopped janitor): give up with an error rather than hang the slot.
ADMISSION_TIMEOUT = 300.0


@dataclass(frozen=True)
class ReservationInfo:
    """A live reservation as ``status()`` reports it."""

    batch_id: str
    nbytes: int
    age: float
    written: int


@dataclass(frozen=True)
class ScratchStatus:
    """Budget, disk and live reservations of one scratch root."""

    root: Path
    budget: int
    headroom: int
    reserved: int
    used: int
    free: int
    reservations: list[ReservationInfo] = field(default_factory=list)


class Reservation:
    """Scratch space and a locked ``root/{batch_id}/`` held by this process until released.

    A context manager: leaving the block releases it (and removes the directory).
    """

    def __init__(self, manager: ScratchManager, record: Record, fd: int) -> None:
        self.batch_id = record.batch_id
        self.path = manager.batch_dir(record.batch_id)
        self.nbytes = record.nbytes
        self.created = record.created
        self._manager = manager
        self._fd: int | None = fd
        self._guard = threading.Lock()

    @property
    def active(self) -> bool:
        return self._fd is not None

    def extend(self, extra: int, *, timeout: float = 0.0) -> None:
        """Grow the reservation by *extra* bytes (extraction needs more than estimated).

        Raises ScratchBudgetExceeded if the total can never fit, ScratchUnavailable if it
        does not fit within *timeout*.
        """
        if not self.active:
            raise ScratchUnavailable(f"reservation for {self.batch_id} was released")
        self._manager._extend(self, extra, timeout)

    def release(self, *, remove: bool = True) -> None:
        """Give the space back; idempotent. Removes the directory unless *remove* is False,
        in which case it stays on disk, unlocked (the janitor may collect it later)."""
        with self._guard:
            fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if remove:
                self._manager.dirs.remove(self.batch_id)
        finally:
            # Drop the lock only once the record is gone, so the record never looks dead
            # to others while it still counts here. If the record cannot be deleted (the
            # admission lock timed out) the dir lock is dropped anyway: a record whose
            # owner holds no lock is dead, and the next admission reclaims it.
            try:
                self._manager._forget(self.batch_id)
            finally:
                os.close(fd)

    def __enter__(self) -> Reservation:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def __repr__(self) -> str:
        state = "active" if self.active else "released"
        return f"Reservation({self.batch_id!r}, {self.nbytes}, {state})"


class ScratchManager:
    """Admits, creates and accounts for batch directories under one scratch root."""

    def __init__(
        self,
        root: Path,
        budget: int,
        headroom: int,
        *,
        statvfs: Statvfs = os.statvfs,
        poll_interval: float = POLL_INTERVAL,
    ) -> None:
        if budget <= 0 or headroom < 0:
            raise ConfigError(f"scratch budget must be > 0 and headroom >= 0 ({root})")
        self.root = Path(os.path.abspath(root))
        self.budget = budget
        self.headroom = headroom
        self._statvfs = statvfs
        self._poll = poll_interval
        self.state_dir = self.root / STATE_DIR
        self.records = RecordStore(self.state_dir / "reservations")
        self.dirs = BatchDirs(self.root)

    @classmethod
    def from_settings(cls, settings: Settings) -> ScratchManager:
        return cls(settings.scratch_dir, settings.scratch_budget, settings.scratch_headroom)

    # -- public API -------------------------------------------------------------------

    def batch_dir(self, batch_id: str) -> Path:
        """``root/{batch_id}``; raises InvalidBatchId for anything that could escape root."""
        path = self.root / validate_batch_id(batch_id)
        if path.parent != self.root or path.name in (STATE_DIR, "", ".", ".."):
            raise ScratchUnavailable(f"batch id {batch_id!r} does not name a scratch dir")
        return path

    def is_locked(self, path: Path) -> bool:
        """The janitor's rule: would a non-blocking exclusive flock on *path* fail now?"""
        return _is_locked(path)

    def wait_released(
        self, batch_id: str, *, timeout: float, stop: threading.Event | None = None
    ) -> bool:
        """Wait until no live process holds ``root/{batch_id}/`` (a predecessor on this host
        still ending the batch); True if one did. Raises ScratchUnavailable on *timeout* or
        *stop*. Changes nothing: the caller then adopts or reserves the dir."""
        path = self.batch_dir(batch_id)
        if not _is_locked(path):
            return False
        waiter = Waiter(f"take over the scratch dir of {batch_id}", timeout, stop)
        while _is_locked(path):
            waiter.wait("another live process on this host holds it", self._poll)
        return True

    def reserve(
        self,
        batch_id: str,
        nbytes: int,
        *,
        timeout: float = 0.0,
        stop: threading.Event | None = None,
    ) -> Reservation:
        """Reserve *nbytes* and create + lock ``root/{batch_id}/`` for this process.

        Raises ScratchBudgetExceeded at once if *nbytes* can never fit (over the budget or
        the volume), ScratchUnavailable if it does not fit within *timeout* seconds, if
        *stop* is set while waiting, or if another live process holds this batch's dir.
        """
        self.batch_dir(batch_id)
        self._check_possible(nbytes, 0, batch_id)
        waiter = Waiter(f"reserve {format_size(nbytes)} for {batch_id}", timeout, stop)
        while True:
            outcome = self._try_reserve(batch_id, nbytes)
            if isinstance(outcome, Reservation):
                return outcome
            waiter.wait(outcome, self._poll)

    def adopt(self, batch_id: str) -> Reservation | None:
        """Take over ``root/{batch_id}/`` as it is (a dead predecessor's processed results),
        locked and counted as a reservation of the bytes it holds; None if it is gone or a
        live process holds it. Admission does not apply: the bytes are already on disk."""
        from stagerd.scratch.locks import try_lock_entry

        path = self.batch_dir(batch_id)
        with self.admission_lock():
            try:
                fd = try_lock_entry(path)
            except OSError:
                return None
            if fd is None:
                return None
            record = Record.new(batch_id, self.dirs.written(batch_id))
            self.records.write(record)
        log.info("scratch dir adopted", extra={"batch_id": batch_id, "nbytes": record.nbytes})
        return Reservation(self, record, fd)

    def _try_reserve(self, batch_id: str, nbytes: int) -> Reservation | str:
        """One admission attempt: the reservation, or why it must wait."""
        with self.admission_lock():
            why = self._shortfall(nbytes, self._alive_records(reclaim=True))
            if why is not None:
                return why
            try:
                fd = self.dirs.create_locked(batch_id)
            except DirBusy as exc:
                # Another process (or a janitor removing a dead owner's leftovers) holds
                # this batch's dir: worth waiting for, like space.
                return str(exc)
            record = Record.new(batch_id, nbytes)
            self.records.write(record)
        log.info(
            "scratch reserved",
            extra={"batch_id": batch_id, "nbytes": nbytes, "budget": self.budget},
        )
        return Reservation(self, record, fd)

    def status(self) -> ScratchStatus:
        """Budget, reserved, used and free bytes and the live reservations (changes nothing)."""
        with self.admission_lock():
            live = [(r, self.dirs.written(r.batch_id)) for r in self._alive_records(reclaim=False)]
            free = self._free()
        now = time.time()
        return ScratchStatus(
            root=self.root,
            budget=self.budget,
            headroom=self.headroom,
            reserved=sum(r.nbytes for r, _ in live),
            used=self.dirs.used(),
            free=free,
            reservations=[
                ReservationInfo(r.batch_id, r.nbytes, max(0.0, now - r.created), w) for r, w in live
            ],
        )

    def free(self) -> int:
        """Bytes available on the scratch volume now (statvfs ``f_bavail``)."""
        return self._free()

    def reclaim_dead(self, *, dry_run: bool = False) -> list[str]:
        """Drop the records (and half-created temp dirs) of owners that died; their ids."""
        with self.admission_lock():
            dead = [r.batch_id for r in self.records.load() if not self.dirs.alive(r.batch_id)]
            if not dry_run:
                for batch_id in dead:
                    self.records.delete(batch_id)
                self.records.clear_temps()
                self.dirs.clear_tmp()
        return dead

    @contextmanager
    def admission_lock(self) -> Iterator[None]:
        """Hold the lock every admission decision and record change is made under."""
        self._ensure_state()
        lock = FileLock(self.state_dir / "admission.lock")
        lock.acquire(timeout=ADMISSION_TIMEOUT)
        try:
            yield
        finally:
            lock.release()

    # -- internals ----------------------------------------------------------------------

    def _ensure_state(self) -> None:
        if not self.root.is_dir():
            raise ConfigError(f"STAGERD_SCRATCH_DIR {self.root}: not a directory")
        for sub in (self.state_dir, self.records.path, self.state_dir / "tmp"):
            sub.mkdir(mode=0o755, exist_ok=True)

    def _check_possible(self, nbytes: int, current: int, batch_id: str) -> None:
        if nbytes < 0:
            raise ValueError(f"cannot reserve a negative size ({nbytes})")
        total = current + nbytes
        if total > self.budget:
            raise ScratchBudgetExceeded(
                f"batch {batch_id} needs {format_size(total)} of scratch, more than the whole "
                f"budget of {format_size(self.budget)} (STAGERD_SCRATCH_BUDGET)"
            )
        vfs = self._statvfs(str(self.root))
        capacity = vfs.f_blocks * vfs.f_frsize - self.headroom
        if total > capacity:
            raise ScratchBudgetExceeded(
                f"batch {batch_id} needs {format_size(total)} of scratch, more than the "
                f"volume can ever hold ({format_size(max(0, capacity))} after headroom)"
            )

    def _free(self) -> int:
        vfs = self._statvfs(str(self.root))
        return int(vfs.f_bavail * vfs.f_frsize)

    def _shortfall(self, request: int, live: list[Record]) -> str | None:
        """Why *request* cannot be admitted now (see admission_shortfall), or None."""
        free = self._free()
        # First as if nothing had been written yet: the pessimistic answer is exact for
        # the budget and, when it admits, right for the disk too. Only a tight disk is
        # worth walking the live directories to measure what they already hold.
        why = admission_shortfall(
            request, self.budget, self.headroom, free, [(r.nbytes, 0) for r in live]
        )
        if why is None or sum(r.nbytes for r in live) + request > self.budget:
            return why
        measured = [(r.nbytes, self.dirs.written(r.batch_id)) for r in live]
        return admission_shortfall(request, self.budget, self.headroom, free, measured)

    def _alive_records(self, *, reclaim: bool) -> list[Record]:
        """Records whose owner holds the dir lock; caller holds admission_lock."""
        live: list[Record] = []
        for record in self.records.load():
            if self.dirs.alive(record.batch_id):
                live.append(record)
            elif reclaim:
                log.info("reclaimed dead reservation", extra={"batch_id": record.batch_id})
                self.records.delete(record.batch_id)
        return live

    def _extend(self, reservation: Reservation, extra: int, timeout: float) -> None:
        batch_id = reservation.batch_id
        self._check_possible(extra, reservation.nbytes, batch_id)
        waiter = Waiter(f"extend {batch_id} by {format_size(extra)}", timeout, None)
        while True:
            with self.admission_lock():
                why = self._shortfall(extra, self._alive_records(reclaim=True))
                if why is None:
                    total = reservation.nbytes + extra
                    self.records.write(Record.new(batch_id, total, reservation.created))
                    reservation.nbytes = total
                    return
            waiter.wait(why, self._poll)

    def _forget(self, batch_id: str) -> None:
        with self.admission_lock():
            self.records.delete(batch_id)
