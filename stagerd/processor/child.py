"""One processor child: started below its reaper, output pumped, waited for, killed.

Split from :mod:`stagerd.processor.runner`, which holds the two modes and the contract.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO

from stagerd.errors import ProcessorFailed
from stagerd.processor import proctree
from stagerd.processor.outputcap import OutputCap
from stagerd.streams import write_all

_MAX_LINE = 64 * 1024  # longest processor output line we log (the rest is cut)
_POLL = 0.1
# How long past its grace the reaper may take to end the tree before we kill it ourselves.
_REAPER_SLACK = 5.0
# How long a reaper may take to report its processor's pid (a stopped one never does).
_REAPER_START = 30.0

# Called while the processor runs: a reason to stop it now (disk over its allowance), or None.
Guard = Callable[[], str | None]


class Child:
    """A command below its own reaper (:mod:`stagerd.processor.reaper`), in its own process group,
    its output lines pumped to handlers (by default the batch's :class:`OutputCap`)."""

    def __init__(
        self,
        argv: list[str],
        *,
        env: Mapping[str, str],
        cwd: Path | None,
        output: OutputCap,
        grace: float,
        on_stdout: Callable[[str], None] | None = None,
        stdin: bool = False,
        done: tuple[str, str] | None = None,
        standby: Standby | None = None,
    ) -> None:
        self.output = output
        self.contained: str | None = None  # why a guard stopped it
        taken = _take(standby, argv, env=env, cwd=cwd, done=done)
        if taken is not None:
            self.proc, self.main_pid = taken
        else:
            self.main_pid = self._start(argv, env=env, cwd=cwd, grace=grace, stdin=stdin,
                                        done=done)  # fmt: skip
        self._pidfd = _pidfd(self.proc.pid)
        self.last_stderr = ""
        assert self.proc.stdout is not None and self.proc.stderr is not None
        out_handler = on_stdout or (lambda line: self.output.line("stdout", line))
        self._pumps = [
            threading.Thread(target=self._pump, args=(self.proc.stdout, out_handler), daemon=True),
            threading.Thread(target=self._pump, args=(self.proc.stderr, self._stderr), daemon=True),
        ]
        for pump in self._pumps:
            pump.start()

    def _start(
        self,
        argv: list[str],
        *,
        env: Mapping[str, str],
        cwd: Path | None,
        grace: float,
        stdin: bool,
        done: tuple[str, str] | None,
    ) -> int | None:
        """Start the reaper; the processor's own pid (None if the reaper gave up)."""
        read_end, write_end = os.pipe()
        try:
            with proctree.spawning() as started:
                self.proc = subprocess.Popen(
                    proctree.reaper_argv(argv, write_end, grace, done), cwd=cwd, env=dict(env),
                    start_new_session=True, pass_fds=(write_end,),
                    stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                )  # fmt: skip
                started.add(self.proc.pid)
        except OSError as exc:
            os.close(read_end)
            raise ProcessorFailed(
                f"cannot start the reaper for processor {argv[0]!r}: {exc.strerror}"
            ) from None
        finally:
            os.close(write_end)
        try:
            return _read_pid(read_end)
        except TimeoutError:
            _kill_reaper(self.proc)
            raise ProcessorFailed(
                f"the reaper for processor {argv[0]!r} did not start within {_REAPER_START:g}s"
            ) from None

    def _pump(self, stream: IO[bytes], handle: Callable[[str], None]) -> None:
        with stream:
            for raw in iter(lambda: stream.readline(_MAX_LINE), b""):
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                if line:
                    handle(line)

    def _stderr(self, line: str) -> None:
        self.last_stderr = line
        self.output.line("stderr", line)

    def wait(
        self, deadline: float, stop: threading.Event | None, guard: Guard | None = None
    ) -> int | None:
        """The exit status, or None if *deadline* passed, *stop* was set or *guard* gave a
        reason (kept in :attr:`contained`) first.

        A processor that already exited is asked first: its finished work counts even when
        *stop* was set meanwhile (a worker paused past its lease finds both at once, and the
        results it keeps spare the batch's next owner a second GPU run)."""
        while True:
            if guard is not None:
                self.contained = guard()
                if self.contained is not None:
                    return None
            status = self.proc.poll()
            if status is not None:
                return status
            remaining = deadline - time.monotonic()
            if remaining <= 0 or (stop is not None and stop.is_set()):
                return None
            status = self._wait_exit(min(remaining, _POLL))
            if status is not None:
                return status

    def _wait_exit(self, timeout: float) -> int | None:
        """The reaper's exit status if it exits within *timeout* seconds, else None.

        Its pidfd turns readable the moment it exits. ``Popen.wait(timeout=...)`` sleeps in
        a backoff loop instead (up to 50 ms a nap): every batch paid that between the
        processor's end and the commit, as idle GPU time (issue 19's prefetch gap)."""
        if self._pidfd is None:
            try:
                return self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                return None
        waiter = select.poll()  # not select(): a worker may hold fds past FD_SETSIZE
        waiter.register(self._pidfd, select.POLLIN)
        waiter.poll(max(0, int(timeout * 1000) + 1))
        return self.proc.poll()

    def kill(self, grace: float) -> None:
        """SIGTERM the tree (the reaper forwards it and SIGKILLs what is left after
        *grace*); if the reaper itself does not end, SIGKILL the tree from here; reap."""
        if self.proc.poll() is None:
            self._signal(signal.SIGTERM)
            deadline = time.monotonic() + grace + _REAPER_SLACK
            while self.proc.poll() is None and (left := deadline - time.monotonic()) > 0:
                self._wait_exit(left)  # the hard kill below if it does not end
        if self.proc.poll() is None:
            for pid in proctree.descendants(self.proc.pid):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            self._signal(signal.SIGKILL)
        self.reap()

    def reap(self) -> None:
        """Wait for the reaper (it ends with the processor's whole tree), end the pumps."""
        self.proc.wait()
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None
        proctree.forget(self.proc.pid)
        proctree.sweep_orphans()
        self.join_output(timeout=2.0)
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()

    def join_output(self, timeout: float) -> None:
        """Wait (bounded) until stdout and stderr reached EOF and were logged."""
        for pump in self._pumps:
            pump.join(timeout=timeout)

    def _signal(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):  # group already gone
            os.killpg(self.proc.pid, sig)


def _pidfd(pid: int) -> int | None:
    """A pidfd for our child *pid* (close-on-exec), or None where the kernel (< 5.3) or
    the platform has none; waits then fall back to ``Popen.wait``'s polling."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def _take(
    standby: Standby | None,
    argv: list[str],
    *,
    env: Mapping[str, str],
    cwd: Path | None,
    done: tuple[str, str] | None,
) -> tuple[subprocess.Popen[bytes], int | None] | None:
    """Run *argv* in *standby*: its reaper and the processor's pid (None if the reaper gave
    up); None when there is no standby or it died before taking the request (then the
    caller starts a fresh reaper)."""
    if standby is None:
        return None
    try:
        pid = standby.go(argv, env=env, cwd=cwd, done=done)
    except TimeoutError:  # stopped or stuck: killed with whatever it started
        _kill_reaper(standby.proc)
        return None
    except OSError:  # it died waiting (EPIPE): nothing of this batch ran
        standby.discard()
        return None
    return standby.proc, pid


class Standby:
    """A reaper started ahead of its batch (:mod:`stagerd.processor.reaper`, "Standby"), so
    the interpreter's start-up happens while the batch before it is processing, not in
    the idle gap between the two. :class:`Child` takes it with :meth:`go`; one never used
    is :meth:`discard`-ed. Oneshot mode only (a persistent processor starts once)."""

    def __init__(self, grace: float, env: Mapping[str, str]) -> None:
        pid_read, pid_write = os.pipe()
        req_read, req_write = os.pipe()
        try:
            with proctree.spawning() as started:
                self.proc = subprocess.Popen(
                    proctree.standby_argv(pid_write, req_read, grace), cwd="/", env=dict(env),
                    start_new_session=True, pass_fds=(pid_write, req_read),
                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                )  # fmt: skip
                started.add(self.proc.pid)
        except OSError:
            os.close(pid_read)
            os.close(req_write)
            raise
        finally:
            os.close(pid_write)
            os.close(req_read)
        self._pid_read: int | None = pid_read
        self._req_write: int | None = req_write

    def go(
        self,
        argv: list[str],
        *,
        env: Mapping[str, str],
        cwd: Path | None,
        done: tuple[str, str] | None,
    ) -> int | None:
        """Hand over the request; the processor's pid (None if the reaper gave up).
        Raises OSError when the standby is gone (then nothing ran), TimeoutError when it
        does not answer (it may have started the processor)."""
        if self._req_write is None or self._pid_read is None or self.proc.poll() is not None:
            raise OSError("the standby reaper is gone")
        request = {
            "argv": argv,
            "env": dict(env),
            "cwd": str(cwd) if cwd is not None else "/",
            "done": ":".join(done) if done else "",
        }
        fd, self._req_write = self._req_write, None
        try:
            write_all(fd, memoryview(json.dumps(request).encode()))
        finally:
            os.close(fd)
        pid_read, self._pid_read = self._pid_read, None
        return _read_pid(pid_read)

    def discard(self) -> None:
        """Close its request pipe unused (it exits 0) and reap it; idempotent."""
        for name in ("_req_write", "_pid_read"):
            fd = getattr(self, name)
            setattr(self, name, None)
            if fd is not None:
                os.close(fd)
        with contextlib.suppress(subprocess.TimeoutExpired):  # then killed below
            self.proc.wait(timeout=_REAPER_SLACK)
        _kill_reaper(self.proc)


def _kill_reaper(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL a reaper's group unless it already exited, reap it, close its pipes. Its
    tree, reparented to the worker (a subreaper), goes in the worker's next sweep."""
    if proc.poll() is None:
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    proctree.forget(proc.pid)
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


def _read_pid(fd: int) -> int | None:
    """The processor pid a reaper writes on its pid pipe (None if it gave up first).
    Raises TimeoutError after ``_REAPER_START`` seconds without a word: a reaper someone
    SIGSTOPped would otherwise hold the worker here for ever. Closes *fd*."""
    with os.fdopen(fd, "rb") as pid_pipe:
        waiter = select.poll()
        waiter.register(fd, select.POLLIN)
        if not waiter.poll(int(_REAPER_START * 1000)):
            raise TimeoutError("the reaper did not report its processor")
        reported = pid_pipe.read(32).strip()
    return int(reported) if reported.isdigit() else None
