"""The scratch reservation manager in one process: admission, disk, waiting, the locked dir."""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stagerd.config.settings import Settings
from stagerd.errors import (
    InvalidBatchId,
    ScratchBudgetExceeded,
    ScratchUnavailable,
)
from stagerd.scratch.locks import is_locked
from stagerd.scratch.space import ScratchManager, admission_shortfall

MiB = 1024**2
GiB = 1024**3


@dataclass
class FakeVfs:
    """The statvfs seam: a volume whose free space the test decides."""

    free: int = 100 * GiB
    total: int = 100 * GiB
    f_frsize: int = 4096

    @property
    def f_bavail(self) -> int:
        return self.free // self.f_frsize

    @property
    def f_blocks(self) -> int:
        return self.total // self.f_frsize

    def __call__(self, path: str) -> FakeVfs:
        return self


def manager(root: Path, budget: int = 10 * MiB, headroom: int = 0, **kw: object) -> ScratchManager:
    kw.setdefault("statvfs", FakeVfs())
    kw.setdefault("poll_interval", 0.01)
    return ScratchManager(root, budget, headroom, **kw)  # type: ignore[arg-type]


def flock_nb(path: Path) -> bool:
    """Could another open file description lock *path* right now?"""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


# -- the pure admission rule ----------------------------------------------------------


def test_admission_budget_and_disk_rules() -> None:
    assert admission_shortfall(4, 10, 0, 100, [(6, 0)]) is None
    assert "budget" in (admission_shortfall(5, 10, 0, 100, [(6, 0)]) or "")
    # disk: 20 free, 6 promised and 2 written -> 4 unwritten, headroom 10 -> 6 usable
    assert admission_shortfall(6, 100, 10, 20, [(6, 2)]) is None
    assert "disk" in (admission_shortfall(7, 100, 10, 20, [(6, 2)]) or "")
    # a reservation that wrote more than it reserved promises nothing more
    assert admission_shortfall(10, 100, 0, 10, [(5, 9)]) is None


@given(
    budget=st.integers(1, 1000),
    headroom=st.integers(0, 100),
    free=st.integers(0, 2000),
    live=st.lists(st.tuples(st.integers(0, 300), st.integers(0, 400)), max_size=6),
    request=st.integers(0, 1000),
)
def test_admitted_requests_keep_both_invariants(
    budget: int, headroom: int, free: int, live: list[tuple[int, int]], request: int
) -> None:
    if admission_shortfall(request, budget, headroom, free, live) is None:
        assert sum(n for n, _ in live) + request <= budget
        assert free - sum(max(0, n - w) for n, w in live) - headroom >= request


# -- reserve / release -----------------------------------------------------------------


def test_reserve_creates_a_locked_dir_and_release_removes_it(scratch_dir: Path) -> None:
    mgr = manager(scratch_dir)
    with mgr.reserve("batch-1", MiB) as res:
        assert res.path == scratch_dir / "batch-1" and res.path.is_dir()
        assert mgr.is_locked(res.path) and not flock_nb(res.path)
        (res.path / "input").mkdir()
        (res.path / "input" / "a.wav").write_bytes(b"x" * 10_000)
        status = mgr.status()
        assert status.reserved == MiB and status.used >= 10_000
        assert [(r.batch_id, r.nbytes) for r in status.reservations] == [("batch-1", MiB)]
        assert status.reservations[0].written >= 10_000
    assert not res.path.exists()
    assert mgr.status().reserved == 0 and mgr.status().reservations == []
    res.release()  # idempotent


def test_release_keep_leaves_the_dir_unlocked(scratch_dir: Path) -> None:
    mgr = manager(scratch_dir)
    res = mgr.reserve("b1", 100)
    (res.path / "keep.txt").write_text("x")
    res.release(remove=False)
    assert (res.path / "keep.txt").read_text() == "x"
    assert not mgr.is_locked(res.path) and flock_nb(res.path)
    assert mgr.status().reservations == []


def test_budget_is_shared_and_freed_on_release(scratch_dir: Path) -> None:
    mgr = manager(scratch_dir, budget=10 * MiB)
    a = mgr.reserve("a", 6 * MiB)
    with pytest.raises(ScratchUnavailable, match="budget"):
        mgr.reserve("b", 5 * MiB)
    b = mgr.reserve("b", 4 * MiB)
    a.release()
    c = mgr.reserve("c", 6 * MiB)
    assert mgr.status().reserved == 10 * MiB
    b.release()
    c.release()


def test_over_budget_fails_at_once_even_with_a_timeout(scratch_dir: Path) -> None:
    mgr = manager(scratch_dir, budget=10 * MiB)
    started = time.monotonic()
    with pytest.raises(ScratchBudgetExceeded, match="STAGERD_SCRATCH_BUDGET"):
        mgr.reserve("huge", 11 * MiB, timeout=30)
    assert time.monotonic() - started < 5
    assert not (scratch_dir / "huge").exists()


def test_request_larger_than_the_volume_fails_at_once(scratch_dir: Path) -> None:
    vfs = FakeVfs(free=50 * MiB, total=50 * MiB)
    mgr = manager(scratch_dir, budget=GiB, headroom=10 * MiB, statvfs=vfs)
    with pytest.raises(ScratchBudgetExceeded, match="volume"):
        mgr.reserve("big", 45 * MiB, timeout=30)


def test_full_disk_refuses_admission_and_keeps_headroom(scratch_dir: Path) -> None:
    vfs = FakeVfs(free=20 * MiB)
    mgr = manager(scratch_dir, budget=GiB, headroom=8 * MiB, statvfs=vfs)
    with pytest.raises(ScratchUnavailable, match="disk"):
        mgr.reserve("b1", 13 * MiB)
    res = mgr.reserve("b1", 12 * MiB)  # 20 free - 8 headroom
    # the unwritten part of b1 is promised: nothing else fits although statvfs shows 20 MiB
    with pytest.raises(ScratchUnavailable, match="promised"):
        mgr.reserve("b2", MiB)
    # once the disk really has room again (models deleted, say) admission follows
    vfs.free = 40 * MiB
    mgr.reserve("b2", MiB).release()
    res.release()


def test_extend_grows_within_budget_and_fails_cleanly(scratch_dir: Path) -> None:
    mgr = manager(scratch_dir, budget=10 * MiB)
    res = mgr.reserve("b1", 4 * MiB)
    other = mgr.reserve("b2", 3 * MiB)
    res.extend(3 * MiB)
    assert res.nbytes == 7 * MiB and mgr.status().reserved == 10 * MiB
    with pytest.raises(ScratchUnavailable):
        res.extend(MiB)
    with pytest.raises(ScratchBudgetExceeded):
        res.extend(4 * MiB, timeout=10)
    assert res.nbytes == 7 * MiB
    other.release()
    res.extend(MiB)
    assert [r.nbytes for r in mgr.status().reservations] == [8 * MiB]
    res.release()
    with pytest.raises(ScratchUnavailable, match="released"):
        res.extend(1)


def test_waiting_request_logs_and_gets_in_when_space_frees(
    scratch_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    mgr = manager(scratch_dir, budget=10 * MiB)
    holder = mgr.reserve("holder", 8 * MiB)
    threading.Timer(0.3, holder.release).start()
    with caplog.at_level(logging.INFO, logger="stagerd"):
        res = mgr.reserve("waiter", 5 * MiB, timeout=10)
    assert res.active
    waits = [r.getMessage() for r in caplog.records if "waiting to reserve" in r.getMessage()]
    assert len(waits) == 1 and "waiter" in waits[0] and "budget" in waits[0]
    res.release()


def test_waiting_request_honours_timeout_and_stop(scratch_dir: Path) -> None:
    mgr = manager(scratch_dir, budget=10 * MiB)
    holder = mgr.reserve("holder", 8 * MiB)
    started = time.monotonic()
    with pytest.raises(ScratchUnavailable, match="waited"):
        mgr.reserve("late", 5 * MiB, timeout=0.3)
    assert 0.3 <= time.monotonic() - started < 10
    stop = threading.Event()
    threading.Timer(0.2, stop.set).start()
    with pytest.raises(ScratchUnavailable, match="stopped"):
        mgr.reserve("late", 5 * MiB, timeout=60, stop=stop)
    assert not (scratch_dir / "late").exists()
    holder.release()


def test_threads_never_exceed_the_budget(scratch_dir: Path) -> None:
    budget = 10 * MiB
    mgr = manager(scratch_dir, budget=budget)
    held: list[int] = []
    peak: list[int] = []
    guard = threading.Lock()
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(15):
                size = (n + i) % 4 * MiB + MiB
                with mgr.reserve(f"t{n}-{i}", size, timeout=20):
                    with guard:
                        held.append(size)
                        peak.append(sum(held))
                    time.sleep(0.002)
                    with guard:
                        held.remove(size)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert peak and max(peak) <= budget
    assert mgr.status().reservations == []


# -- the batch dir --------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["../etc", "..", "a/b", "/abs", ".stagerd", "", "-rf", "a\x00b"])
def test_batch_ids_cannot_escape_the_root(scratch_dir: Path, bad: str) -> None:
    mgr = manager(scratch_dir)
    with pytest.raises(InvalidBatchId):
        mgr.batch_dir(bad)
    with pytest.raises(InvalidBatchId):
        mgr.reserve(bad, 1)


def test_a_live_owners_dir_is_refused_a_dead_ones_is_replaced(scratch_dir: Path) -> None:
    mgr = manager(scratch_dir)
    live = mgr.reserve("b1", 100)
    with pytest.raises(ScratchUnavailable, match="in use"):
        mgr.reserve("b1", 100)
    assert live.path.is_dir() and not flock_nb(live.path)
    live.release(remove=False)
    (live.path / "old.part").write_bytes(b"stale")
    again = mgr.reserve("b1", 100)
    assert again.path.is_dir() and list(again.path.iterdir()) == []
    again.release()


def test_a_symlink_at_the_batch_path_is_replaced_not_followed(
    scratch_dir: Path, tmp_path: Path
) -> None:
    models = tmp_path / "models"
    models.mkdir()
    (models / "weights.bin").write_bytes(b"w" * 100)
    (scratch_dir / "b1").symlink_to(models)
    mgr = manager(scratch_dir)
    with mgr.reserve("b1", 100) as res:
        assert not res.path.is_symlink() and res.path.is_dir()
    assert (models / "weights.bin").read_bytes() == b"w" * 100


def test_dead_records_are_reclaimed_and_unreadable_ones_dropped(scratch_dir: Path) -> None:
    mgr = manager(scratch_dir, budget=10 * MiB)
    res = mgr.reserve("b1", 9 * MiB)
    # Simulate an owner that died: drop the lock but keep the record and the dir.
    os.close(res._fd)  # type: ignore[arg-type]
    res._fd = None
    assert mgr.status().reservations == []
    assert mgr.reclaim_dead(dry_run=True) == ["b1"]
    assert (mgr.records.path / "b1.json").exists()
    assert mgr.reclaim_dead() == ["b1"]
    assert not (mgr.records.path / "b1.json").exists()
    (mgr.records.path / "junk.json").write_text("{not json")
    assert mgr.status().reserved == 0
    assert not (mgr.records.path / "junk.json").exists()
    mgr.reserve("b2", 9 * MiB).release()


def test_is_locked_never_follows_symlinks(scratch_dir: Path, tmp_path: Path) -> None:
    mgr = manager(scratch_dir)
    with mgr.reserve("b1", 1) as res:
        link = scratch_dir / "link"
        link.symlink_to(res.path)
        assert is_locked(res.path) and not is_locked(link)
        assert not is_locked(scratch_dir / "missing")


def test_from_settings_uses_the_configured_root(scratch_dir: Path) -> None:
    settings_ = Settings(scratch_dir=scratch_dir, scratch_budget=5 * MiB, scratch_headroom=0)
    mgr = ScratchManager.from_settings(settings_)
    assert (mgr.root, mgr.budget, mgr.headroom) == (scratch_dir, 5 * MiB, 0)


def test_missing_root_is_a_config_error(tmp_path: Path) -> None:
    from stagerd.errors import ConfigError

    with pytest.raises(ConfigError, match="not a directory"):
        manager(tmp_path / "nope").reserve("b1", 1)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=st.lists(st.tuples(st.integers(0, 4), st.integers(0, 12)), min_size=1, max_size=25))
def test_sequences_of_reserve_extend_release_match_a_model(
    tmp_path_factory: pytest.TempPathFactory, ops: list[tuple[int, int]]
) -> None:
    """Whatever the order, the manager admits exactly what the budget rule allows."""
    root = tmp_path_factory.mktemp("scratch")
    mgr = manager(root, budget=20)
    held: dict[int, object] = {}
    model: dict[int, int] = {}
    for slot, size in ops:
        if slot in held:
            res = held[slot]
            if size % 2:
                res.release()  # type: ignore[attr-defined]
                del held[slot], model[slot]
            elif model[slot] + size > 20:
                with pytest.raises(ScratchBudgetExceeded):
                    res.extend(size)  # type: ignore[attr-defined]
            elif sum(model.values()) + size <= 20:
                res.extend(size)  # type: ignore[attr-defined]
                model[slot] += size
            else:
                with pytest.raises(ScratchUnavailable):
                    res.extend(size)  # type: ignore[attr-defined]
        elif sum(model.values()) + size <= 20:
            held[slot], model[slot] = mgr.reserve(f"s{slot}", size), size
        else:
            with pytest.raises(ScratchUnavailable):
                mgr.reserve(f"s{slot}", size)
        assert mgr.status().reserved == sum(model.values()) <= 20
    for res in held.values():
        res.release()  # type: ignore[attr-defined]


def test_reserve_waits_while_someone_holds_a_leftover_dir(scratch_dir: Path) -> None:
    """A janitor removing a dead owner's dir holds its lock: reserve waits, then gets in."""
    leftover = scratch_dir / "b1"
    leftover.mkdir()
    (leftover / "old.wav").write_bytes(b"o")
    fd = os.open(leftover, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    with pytest.raises(ScratchUnavailable, match="in use"):
        manager(scratch_dir).reserve("b1", 1)
    threading.Timer(0.2, os.close, args=(fd,)).start()
    with manager(scratch_dir).reserve("b1", 1, timeout=10) as res:
        assert list(res.path.iterdir()) == []


def test_wait_released_waits_for_the_holder_and_changes_nothing(scratch_dir: Path) -> None:
    """A batch's next owner waits for a live holder (its paused predecessor) to let go, and
    finds the dir as the holder left it: the finished results are there to adopt."""
    mgr = manager(scratch_dir)
    assert mgr.wait_released("b1", timeout=0) is False  # no dir: nobody to wait for
    held = scratch_dir / "b1"
    held.mkdir()
    (held / "results.jsonl").write_text("{}\n")
    assert mgr.wait_released("b1", timeout=0) is False  # a dir nobody holds
    fd = os.open(held, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    with pytest.raises(ScratchUnavailable, match="another live process"):
        mgr.wait_released("b1", timeout=0.2)
    stop = threading.Event()
    stop.set()
    with pytest.raises(ScratchUnavailable, match="stopped"):
        mgr.wait_released("b1", timeout=60, stop=stop)
    threading.Timer(0.2, os.close, args=(fd,)).start()
    assert mgr.wait_released("b1", timeout=30) is True
    assert (held / "results.jsonl").read_text() == "{}\n"
