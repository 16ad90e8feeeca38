"""The scratch manager across real processes: competition, SIGKILL, and the janitor's lock."""

from __future__ import annotations

import fcntl
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from stagerd.errors import ScratchUnavailable
from stagerd.scratch.space import ScratchManager
from tests.conftest import base_env

MiB = 1024**2

# A worker-like child. Modes:
#   hold ROOT BUDGET ID NBYTES        reserve, write files, print READY, wait for stdin EOF
#   compete ROOT BUDGET SEED ROUNDS AUDIT   reserve/release random sizes, auditing the sum
#   many ROOT BUDGET COUNT            reserve COUNT dirs one by one, then wait for stdin EOF
CHILD = r"""
import fcntl, json, os, random, sys, time
from pathlib import Path
from stagerd.scratch.space import ScratchManager

mode, root, budget = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
mgr = ScratchManager(root, budget, 0, poll_interval=0.005)

def audit(path, delta):
    # An independent tally of what every child holds, kept under its own lock.
    with open(path, "r+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        total = int(f.read() or 0) + delta
        if total > budget:
            print("OVER", total, flush=True)
            os._exit(3)
        f.seek(0); f.truncate(); f.write(str(total))

if mode == "hold":
    res = mgr.reserve(sys.argv[4], int(sys.argv[5]))
    (res.path / "input").mkdir()
    for i in range(5):
        (res.path / "input" / f"{i}.wav").write_bytes(b"\0" * 4096)
    print("READY", flush=True)
    sys.stdin.read()
elif mode == "compete":
    rng = random.Random(int(sys.argv[4]))
    for i in range(int(sys.argv[5])):
        size = rng.randint(1, budget // 2)
        with mgr.reserve(f"c{sys.argv[4]}-{i}", size, timeout=60) as res:
            audit(sys.argv[6], size)
            assert mgr.status().reserved <= budget
            (res.path / "part").write_bytes(b"\0" * 1024)
            time.sleep(rng.random() * 0.01)
            audit(sys.argv[6], -size)
    print("DONE", flush=True)
elif mode == "many":
    held = [mgr.reserve(f"m{i}", 1) for i in range(int(sys.argv[4]))]
    print("READY", flush=True)
    sys.stdin.read()
"""


def spawn(*args: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, *map(str, args)],
        env=base_env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_ready(proc: subprocess.Popen[str]) -> None:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.strip() == "READY", (line, proc.stderr.read() if proc.stderr else "")


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def lockable(path: Path) -> bool:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def test_many_processes_never_exceed_a_small_budget(scratch_dir: Path, procs: list) -> None:
    budget = 64 * 1024
    audit = scratch_dir.parent / "audit"
    audit.write_text("0")
    seeds = random.Random(os.getpid()).sample(range(10**6), 5)
    procs.extend(spawn("compete", scratch_dir, budget, seed, 25, audit) for seed in seeds)
    for proc in procs:
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, (out, err)
        assert out.strip() == "DONE"
    assert audit.read_text() == "0"
    mgr = ScratchManager(scratch_dir, budget, 0)
    assert mgr.status().reservations == []
    assert sorted(os.listdir(scratch_dir)) == [".stagerd"]


def test_sigkilled_owner_is_reclaimed_by_itself(scratch_dir: Path, procs: list) -> None:
    budget = 10 * MiB
    procs.append(child := spawn("hold", scratch_dir, budget, "victim", 8 * MiB))
    wait_ready(child)
    mgr = ScratchManager(scratch_dir, budget, 0, poll_interval=0.01)
    status = mgr.status()
    assert [(r.batch_id, r.nbytes) for r in status.reservations] == [("victim", 8 * MiB)]
    assert status.reservations[0].written >= 5 * 4096
    with pytest.raises(ScratchUnavailable, match="budget"):
        mgr.reserve("next", 5 * MiB)
    child.send_signal(signal.SIGKILL)
    child.wait(10)
    # No janitor, no PID check: the kernel dropped the lock, so the record stops counting.
    with mgr.reserve("next", 5 * MiB, timeout=5) as res:
        assert res.active
    assert (scratch_dir / "victim" / "input" / "0.wav").exists()  # the janitor's job
    assert not mgr.is_locked(scratch_dir / "victim")
    assert mgr.reclaim_dead() == []  # reserve already dropped the dead record


def test_the_lock_is_held_for_the_dirs_whole_life(scratch_dir: Path, procs: list) -> None:
    procs.append(child := spawn("hold", scratch_dir, MiB, "b1", 1000))
    wait_ready(child)
    path = scratch_dir / "b1"
    for _ in range(3):
        assert not lockable(path)
        time.sleep(0.05)
    assert child.stdin is not None
    child.stdin.close()  # the child exits normally: Reservation is not released explicitly
    child.wait(10)
    assert lockable(path)


def test_no_window_where_a_fresh_dir_is_unlocked(scratch_dir: Path, procs: list) -> None:
    """A janitor-like observer probing every new entry never finds one it could lock."""
    count = 60
    procs.append(child := spawn("many", scratch_dir, MiB, count))
    seen: set[str] = set()
    unlocked: list[str] = []
    assert child.stdout is not None
    os.set_blocking(child.stdout.fileno(), False)
    deadline = time.monotonic() + 60
    while len(seen) < count and time.monotonic() < deadline:
        for name in os.listdir(scratch_dir):
            if name == ".stagerd" or name in seen:
                continue
            seen.add(name)
            try:
                if lockable(scratch_dir / name):
                    unlocked.append(name)
            except FileNotFoundError:
                unlocked.append(name)
    assert len(seen) == count, json.dumps(sorted(seen))
    assert unlocked == []
