"""The per-processor subreaper: ``python -I -S reaper.py WORKER_PID PID_FD GRACE -- CMD...``.

The worker starts every processor through this small program (stdlib only, so it runs
from the shiv artifact with ``-I -S``). It marks itself a child subreaper
(``PR_SET_CHILD_SUBREAPER``), so every process the processor starts, even one that
double-forks into its own session, stays its descendant; then it forks and execs CMD, writes
that child's pid to PID_FD, and reaps. It dies with the worker (``PR_SET_PDEATHSIG``).

- When CMD exits, every remaining descendant gets SIGKILL, all are reaped, and the reaper
  exits with CMD's status (re-raising its signal), so the batch ends with its whole tree.
- SIGTERM (the worker stopping the batch) is forwarded to every descendant; whatever is
  left after GRACE seconds gets SIGKILL.

The worker walks the same tree (:mod:`stagerd.proctree`) to end the helpers of a
persistent processor after each batch while the processor itself lives on.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import time

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
_POLL = 0.05


def _prctl(option: int, value: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, value, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl failed")


def children(pid: int) -> list[int]:
    found: list[int] = []
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/children") as f:
                found.extend(int(word) for word in f.read().split())
    return found


def descendants(root: int) -> list[int]:
    seen: list[int] = []
    todo = children(root)
    while todo:
        pid = todo.pop()
        if pid not in seen:
            seen.append(pid)
            todo.extend(children(pid))
    return seen


def _signal_all(sig: int) -> None:
    for pid in descendants(os.getpid()):
        with contextlib.suppress(OSError):
            os.kill(pid, sig)


def _start(argv: list[str], pid_fd: int) -> int:
    pid = os.fork()
    if pid == 0:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.close(pid_fd)
        try:
            os.execvp(argv[0], argv)
        except OSError as exc:
            print(f"cannot start processor {argv[0]!r}: {exc.strerror}", file=sys.stderr)
        os._exit(127)
    os.write(pid_fd, f"{pid}\n".encode())
    os.close(pid_fd)
    return pid


def _reap_until_empty(main: int, grace: float, terminating: list[float]) -> int:
    """Reap every descendant; the main child's wait status."""
    status: int | None = None
    while True:
        try:
            pid, st = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return status if status is not None else 0
        if pid == main:
            status = st
        if pid:
            continue
        overdue = bool(terminating) and time.monotonic() >= terminating[0] + grace
        if status is not None or overdue:
            _signal_all(signal.SIGKILL)
        time.sleep(_POLL)


def main(args: list[str]) -> int:
    worker, pid_fd, grace, argv = int(args[0]), int(args[1]), float(args[2]), args[4:]
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != worker:  # the worker died before PDEATHSIG was armed
        return 1
    terminating: list[float] = []

    def on_term(signum: int, frame: object) -> None:
        if not terminating:
            terminating.append(time.monotonic())
        _signal_all(signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_term)
    status = _reap_until_empty(_start(argv, pid_fd), grace, terminating)
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
    return os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
