"""Long-running processes for the end-to-end scenarios: start, watch RSS, stop politely."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from bench.context import STAGERD_ROOT
from bench.measure import Poller, kill_session
from bench.model import RunFailed
from bench.peers import Command


@contextmanager
def daemons(
    cmds: list[Command], log_dir: Path
) -> Iterator[tuple[list[subprocess.Popen[bytes]], Poller]]:
    """Start *cmds* each in its own session (logs in *log_dir*); SIGTERM them on exit.

    The Poller tracks every session's peak RSS (``poller.peak_rss[pid]``).
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen[bytes]] = []
    poller = Poller()
    try:
        for i, cmd in enumerate(cmds):
            # The child keeps its own copy of the descriptor; ours can close at once.
            with open(log_dir / f"daemon-{i}.log", "wb") as log:
                proc = subprocess.Popen(
                    cmd.argv,
                    env=cmd.env,
                    cwd=STAGERD_ROOT,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            procs.append(proc)
            poller.add_session(proc.pid)
        with poller:
            yield procs, poller
    finally:
        for proc in procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                kill_session(proc)
                proc.wait()


def wait_for(
    what: str,
    predicate: Callable[[], bool],
    timeout: float,
    procs: Sequence[subprocess.Popen[bytes]] = (),
    interval: float = 0.05,
) -> None:
    """Poll *predicate* until true; RunFailed on timeout or when a daemon failed meanwhile."""
    deadline = time.monotonic() + timeout
    while not predicate():
        # Exiting 0 is finishing (the naive producer stops after N); anything else is failing.
        dead = [p for p in procs if p.poll() not in (None, 0)]
        if dead and not predicate():
            raise RunFailed(f"waiting for {what}: {dead[0].args[:4]} exited {dead[0].returncode}")
        if time.monotonic() > deadline:
            raise RunFailed(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def log_tail(log_dir: Path, nbytes: int = 1500) -> str:
    parts = []
    for path in sorted(log_dir.glob("daemon-*.log")):
        parts.append(f"[{path.name}] {path.read_bytes()[-nbytes:].decode(errors='replace')}")
    return "\n".join(parts)
