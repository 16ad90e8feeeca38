"""Measure one run: wall time, peak RSS of the child's process tree, peak scratch bytes.

Peak RSS is the larger of two views, because each misses something:
- /proc polling sums the RSS of every process in the child's session (a pipeline like
  ``s5cmd cat | tar -x`` is two processes that are resident at the same time), but a spike
  shorter than the polling interval can slip between two samples;
- ``ru_maxrss`` (from RUSAGE_CHILDREN in bench/launch.py, a tiny launcher, because Linux
  carries the high-water mark across fork+exec) is exact but per process (the largest single
  process of the tree that was waited for), never a sum.
Peak scratch is polled from the allocated blocks under the scratch dir (``st_blocks``, so a
sparse file counts what it really occupies), with the interval stretched when the walk is slow
so the sampler never takes a core away from the thing it measures.

CPU seconds are user + system of the contender's whole process tree, from the launcher's
RUSAGE_CHILDREN (every descendant that was reaped, pipelines included). The S3 server's CPU is
counted apart: user + system (+ reaped children) of the server's processes and their live
descendants, read from /proc/<pid>/stat right before the contender starts and right after it
exits (:func:`tree_cpu`). On a shared server the delta includes other tenants' requests; on a
quiet machine it is what serving the contender cost.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PAGE = os.sysconf("SC_PAGE_SIZE")
TICK = os.sysconf("SC_CLK_TCK")
LAUNCH = Path(__file__).resolve().parent / "launch.py"
POLL_SECONDS = 0.05


@dataclass(frozen=True)
class Sample:
    """One measured run of one contender."""

    seconds: float
    peak_rss: int
    peak_scratch: int = 0
    returncode: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    cpu_seconds: float | None = None  # user + sys of the contender's whole process tree
    server_cpu_seconds: float | None = None  # the S3 server's user + sys meanwhile


def _session_of(pid: str) -> tuple[int, int] | None:
    """(session id, rss bytes) of a process, or None when it is gone."""
    fields = _stat_fields(pid)
    if fields is None:
        return None
    return int(fields[3]), int(fields[21]) * PAGE


def _stat_fields(pid: int | str) -> list[bytes] | None:
    """The fields of /proc/<pid>/stat after the command name (index 0 = state), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return stat[stat.rfind(b")") + 2 :].split()


def tree_cpu(roots: Iterable[int]) -> float:
    """CPU seconds (user + sys + reaped children's) of *roots* and all their live descendants.

    A descendant that exits between two reads moves into its parent's cutime/cstime, so the
    total stays consistent; only CPU of a process reaped by something outside the tree is lost.
    """
    parents: dict[int, list[int]] = {}
    ticks: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(entry.name)
        if fields is None or len(fields) < 15:
            continue
        pid = int(entry.name)
        parents.setdefault(int(fields[1]), []).append(pid)
        # utime, stime, cutime, cstime: fields 14-17 of stat(5), here 11-14.
        ticks[pid] = sum(int(x) for x in fields[11:15])
    total, stack, seen = 0, [p for p in roots if p in ticks], set()
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.add(pid)
        total += ticks.get(pid, 0)
        stack.extend(parents.get(pid, []))
    return total / TICK


def session_rss(sessions: Iterable[int], exclude: Iterable[int] = ()) -> dict[int, int]:
    """Summed RSS per session id of every live process in those sessions (minus *exclude*)."""
    wanted, skip = set(sessions), {str(p) for p in exclude}
    totals = dict.fromkeys(wanted, 0)
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or entry.name in skip:
            continue
        info = _session_of(entry.name)
        if info and info[0] in wanted:
            totals[info[0]] += info[1]
    return totals


def tree_bytes(path: Path) -> int:
    """Allocated bytes of every file under *path* (0 when it does not exist)."""
    total = 0
    stack = [path]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except OSError:
            continue
        for e in entries:
            try:
                st = e.stat(follow_symlinks=False)
            except OSError:
                continue
            total += st.st_blocks * 512
            if e.is_dir(follow_symlinks=False):
                stack.append(Path(e.path))
    return total


class Poller:
    """Background thread tracking peak RSS per session and peak bytes under scratch dirs."""

    def __init__(
        self,
        sessions: Sequence[int] = (),
        scratch: Sequence[Path] = (),
        exclude: Sequence[int] = (),
    ) -> None:
        self.sessions = list(sessions)
        self.exclude = list(exclude)
        self.scratch = list(scratch)
        self.peak_rss: dict[int, int] = dict.fromkeys(self.sessions, 0)
        self.peak_total_rss = 0
        self.peak_scratch = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="bench-poller", daemon=True)

    def add_session(self, sid: int) -> None:
        self.sessions.append(sid)
        self.peak_rss.setdefault(sid, 0)

    def sample(self) -> None:
        """Take one sample now (also called once at stop so short runs get at least one)."""
        if self.sessions:
            rss = session_rss(self.sessions, self.exclude)
            for sid, value in rss.items():
                self.peak_rss[sid] = max(self.peak_rss.get(sid, 0), value)
            self.peak_total_rss = max(self.peak_total_rss, sum(rss.values()))
        if self.scratch:
            used = sum(tree_bytes(p) for p in self.scratch)
            self.peak_scratch = max(self.peak_scratch, used)

    def _loop(self) -> None:
        while not self._stop.is_set():
            started = time.perf_counter()
            self.sample()
            spent = time.perf_counter() - started
            # A slow walk (10,000 files) must not eat the core the contender needs.
            self._stop.wait(max(POLL_SECONDS, 4 * spent))

    def __enter__(self) -> Poller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def kill_session(proc: subprocess.Popen[Any], sig: int = 9) -> None:
    """Signal the whole session of *proc* (it was started with start_new_session)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


def launcher(cmd: Sequence[str], maxrss_file: Path) -> list[str]:
    """*cmd* wrapped in bench/launch.py, which writes the tree's ru_maxrss to *maxrss_file*."""
    return [sys.executable, "-S", "-I", str(LAUNCH), str(maxrss_file), *cmd]


def read_launch(path: Path) -> tuple[int, float | None, float | None]:
    """(ru_maxrss bytes, seconds, user + sys seconds) written by the launcher; (0, None, None)
    if it was killed."""
    try:
        rss, seconds, user, system = path.read_text().split()
        return int(rss), float(seconds), float(user) + float(system)
    except (OSError, ValueError):
        return 0, None, None


def run_measured(
    cmd: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    scratch: Sequence[Path] = (),
    timeout: float = 3600.0,
    server: Sequence[int] = (),
) -> tuple[Sample, str, str]:
    """Run *cmd* in a fresh session; return its Sample, stdout and stderr.

    *server*: the S3 server's pids, whose CPU over the run goes to ``server_cpu_seconds``.
    A non-zero exit is not an exception: the caller decides (a killed run is sometimes the
    point). stdout/stderr go to temporary files, not pipes, so a chatty child never blocks.
    """
    with tempfile.TemporaryDirectory(prefix="bench-run-") as tmp:
        paths = [Path(tmp) / n for n in ("out", "err", "maxrss")]
        with open(paths[0], "w+b") as out, open(paths[1], "w+b") as err:
            server_before = tree_cpu(server) if server else None
            started = time.perf_counter()
            proc = subprocess.Popen(
                launcher(cmd, paths[2]),
                env=dict(env) if env is not None else None,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )
            with Poller([proc.pid], scratch, exclude=[proc.pid]) as poller:
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    kill_session(proc)
                    proc.wait()
                    raise
            seconds = time.perf_counter() - started
            server_cpu = None if server_before is None else tree_cpu(server) - server_before
            poller.sample()
            out.seek(0)
            err.seek(0)
            stdout = out.read().decode(errors="replace")
            stderr = err.read().decode(errors="replace")
        maxrss, launched_seconds, cpu = read_launch(paths[2])
    sample = Sample(
        seconds=launched_seconds if launched_seconds is not None else seconds,
        peak_rss=max(maxrss, poller.peak_total_rss),
        peak_scratch=poller.peak_scratch,
        returncode=proc.returncode,
        cpu_seconds=cpu,
        server_cpu_seconds=None if server_cpu is None else max(0.0, server_cpu),
    )
    return sample, stdout, stderr
