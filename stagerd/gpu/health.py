"""Worker-scoped health: is *this worker* able to work at all?

A batch that fails is either its own fault (payload, archive, results, the server's answer
about that one object) or the worker's (scratch root gone, Redis, PostgreSQL or S3 not
answering). The two must never be confused: blaming a batch for an outage burns its
attempts and dead-letters good work, blaming the worker for a batch's data stalls the
queue behind it. So after a failure the pipeline asks :class:`WorkerHealth` whether the
worker itself is fine; only if it is not is the job handed back (attempt refunded) and
the worker paused until every check passes again.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from stagerd.errors import StagerdError
from stagerd.log import get_logger
from stagerd.retry import brief

log = get_logger(__name__)
Probe = Callable[[], object]


class ScratchRootMissing(StagerdError):
    """STAGERD_SCRATCH_DIR is not a directory (a failed ``nofail`` mount leaves this)."""


def check_scratch_root(root: Path) -> None:
    """Raise ScratchRootMissing unless *root* is a directory."""
    if not root.is_dir():
        raise ScratchRootMissing(
            f"STAGERD_SCRATCH_DIR {root}: not a directory (is the scratch volume mounted?)"
        )


@dataclass(frozen=True)
class WorkerHealth:
    """Named probes, each raising when its part of the worker cannot work."""

    probes: tuple[tuple[str, Probe], ...]
    max_pause: float = 30.0

    def problem(self) -> str | None:
        """The first failing probe as ``name: reason``, or None when all pass."""
        for name, probe in self.probes:
            try:
                probe()
            except Exception as exc:  # any failure of a probe means "not healthy"
                log.debug("health probe %s failed", name, exc_info=True)
                return f"{name}: {brief(exc)}"
        return None

    def pause(self, problem: str, stop: threading.Event) -> None:
        """Wait (backing off) until every probe passes or *stop* is set."""
        log.error("worker paused: %s; resuming when it recovers", problem)
        delay = 1.0
        while not stop.wait(delay):
            now = self.problem()
            if now is None:
                log.info("worker resumed: %s recovered", problem.split(":", 1)[0])
                return
            if now != problem:
                log.error("worker still paused: %s", now)
                problem = now
            delay = min(self.max_pause, delay * 2)
