"""A real ``stagerd gpu --burst`` run as the unprivileged user, with a hostile processor.

:class:`HostileRun` sets up a user-owned home (scratch, env file, processor script; a
tmpfs of a given size as scratch when asked), runs the worker through ``setpriv`` and
measures what the tests assert on: the worker's peak RSS (``wait4``'s ``ru_maxrss``, which
also covers the processes it waited for: an upper bound; taken by a small launcher, see
:data:`LAUNCHER`), the scratch volume's lowest free
space while it ran, its log, and every process still carrying this run's marker in its
environment afterwards.
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import ROOT, base_env
from tests.unpriv import as_user, ensure_user, remove_user_dir, require_usable_venv, user_dir

MiB = 1024**2
# The processors are stdlib-only scripts; the system's python3 is one the user can always
# run (a venv interpreter under /root may look unexecutable to it: see tests/unpriv.py).
PROCESSOR_PYTHON = shutil.which("python3", path="/usr/bin:/bin") or sys.executable
# The worker too runs on that interpreter when it is the same minor version, with the venv's
# packages on its path: the venv's own python may be a link the user cannot exec.
SITE = Path(next(p for p in sys.path if p.endswith("site-packages")))
WORKER_PYTHON = (
    PROCESSOR_PYTHON
    if sys.executable != PROCESSOR_PYTHON
    and subprocess.run(
        [
            PROCESSOR_PYTHON,
            "-c",
            f"import sys; sys.exit(sys.version_info[:2] != {sys.version_info[:2]})",
        ],
        check=False,
    ).returncode
    == 0
    else sys.executable
)


@dataclass(frozen=True)
class WorkerRun:
    returncode: int
    log: str
    log_bytes: int
    peak_rss: int
    min_free: int


class HostileRun:
    """One test's user-owned home and its worker runs; :meth:`close` cleans up as root."""

    def __init__(self, stagerd_env: dict[str, str], marker: str, tmpfs: int = 0) -> None:
        self.uid, self.gid = ensure_user()
        require_usable_venv(WORKER_PYTHON, self.pythonpath())
        self.home = user_dir("stagerd-hostile-")
        self.scratch = self.home / "scratch"
        self.scratch.mkdir()
        self.mounted = False
        if tmpfs:
            subprocess.run(
                ["mount", "-t", "tmpfs", "-o", f"size={tmpfs},mode=0755", "tmpfs", self.scratch],
                check=True,
            )
            self.mounted = True
        os.chown(self.scratch, self.uid, self.gid)
        env_file = self.home / "stagerd.env"
        env_file.write_text("# empty: the secrets come from the environment, as systemd does\n")
        self.marker = marker
        self.env = {
            **base_env(),
            **stagerd_env,
            "HOME": str(self.home),
            "STAGERD_SCRATCH_DIR": str(self.scratch),
            "STAGERD_ENV_FILE": str(env_file),
            "STAGERD_TEST_MARK": marker,
            "PYTHONPATH": self.pythonpath(),
        }

    @staticmethod
    def pythonpath() -> str:
        return f"{ROOT}:{SITE}"

    def script(self, name: str, source: str) -> str:
        """Write a processor script readable by the user; the command that runs it."""
        path = self.home / name
        path.write_text(source)
        path.chmod(0o644)
        return f"{PROCESSOR_PYTHON} {path}"

    def user_path(self, name: str) -> Path:
        """A path in the home the processor may write (e.g. a pid file)."""
        return self.home / name

    def worker(self, processor: str, *args: str, timeout: float = 180, **env: str) -> WorkerRun:
        """``stagerd gpu --burst`` as the user until the queue is empty."""
        argv = [WORKER_PYTHON, "-m", "stagerd", "--log-json", "gpu", "--burst"]
        argv += ["--processor", processor, "--drain-timeout", "5s", *args]
        log_path = self.home / "worker.log"
        rss_path = self.home / "worker.maxrss"
        launcher = ["/usr/bin/python3", "-S", "-c", LAUNCHER, str(rss_path)]
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [*launcher, *as_user(argv)],
                env={**self.env, **env},
                cwd=ROOT,
                stdout=log,
                stderr=log,
                start_new_session=True,  # the timeout kills launcher and worker together
            )
            free = _FreeWatcher(self.scratch)
            killer = threading.Timer(timeout, lambda: _kill_group(proc.pid))
            killer.start()
            try:
                _, status, usage = os.wait4(proc.pid, 0)
            finally:
                killer.cancel()
                free.stop()
            proc.returncode = os.waitstatus_to_exitcode(status)
        data = log_path.read_bytes()
        return WorkerRun(
            proc.returncode, data.decode("utf-8", "replace"), len(data),
            _launcher_rss(rss_path, usage), free.lowest,
        )  # fmt: skip

    def survivors(self) -> list[int]:
        """Processes (other than zombies) whose environment carries this run's marker."""
        found = []
        needle = f"STAGERD_TEST_MARK={self.marker}".encode()
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            with contextlib.suppress(OSError):
                if needle in Path(f"/proc/{entry}/environ").read_bytes():
                    found.append(int(entry))
        return found

    def close(self) -> None:
        for pid in self.survivors():
            _kill(pid)
        if self.mounted:
            subprocess.run(["umount", "-l", self.scratch], check=False)
        remove_user_dir(self.home)


class _FreeWatcher:
    """The lowest free space seen on a volume, polled in a thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lowest = self._free()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _free(self) -> int:
        vfs = os.statvfs(self.path)
        return vfs.f_bavail * vfs.f_frsize

    def _loop(self) -> None:
        while not self._done.wait(0.01):
            self.lowest = min(self.lowest, self._free())

    def stop(self) -> None:
        self._done.set()
        self._thread.join(5)
        self.lowest = min(self.lowest, self._free())


# Linux carries a process's peak RSS across exec, and a child forked from the pytest worker
# starts with the parent's (hundreds of MB late in a full run): wait4 on such a child reports
# the test runner's memory, not the worker's. This launcher, small itself, forks the worker
# from its own small image and writes the worker tree's ru_maxrss (KiB) to argv[1].
LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as out:
    out.write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status) & 0xFF)
"""


def _launcher_rss(path: Path, usage: resource.struct_rusage) -> int:
    """The worker tree's peak RSS in bytes, as the launcher measured it; the launcher's own
    (an upper bound that includes it) if it was killed before writing."""
    try:
        return int(path.read_text()) * 1024
    except (OSError, ValueError):
        return int(usage.ru_maxrss) * 1024


def _kill_group(pid: int) -> None:
    with contextlib.suppress(OSError):
        os.killpg(pid, signal.SIGKILL)


def _kill(pid: int) -> None:
    with contextlib.suppress(OSError):
        os.kill(pid, signal.SIGKILL)


def wait_gone(pids: list[int], timeout: float = 10.0) -> list[int]:
    """The pids of *pids* still alive (not zombies) after *timeout*."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [pid for pid in pids if _alive(pid)]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")
