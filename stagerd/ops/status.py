"""Collect the pipeline's state for ``stagerd status``: queue, workers, scratch, ledger.

Each section is gathered independently; a service that is not configured or not reachable
yields ``None`` for its section and a line in ``errors``, so one dead service never hides
the others.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, cast

from stagerd.errors import first_line
from stagerd.queue.keys import QueueKeys

if TYPE_CHECKING:
    from stagerd.config.settings import Settings
    from stagerd.queue.snapshot import QueueSnapshot


def collect(settings: Settings, *, failures: int = 10) -> dict[str, Any]:
    """The whole status as one JSON-ready dict."""
    from stagerd.config.settings import redact_url
    from stagerd.db.errors import db_errors
    from stagerd.errors import StagerdError
    from stagerd.queue.errors import queue_errors
    from stagerd.queue.redis_queue import connect
    from stagerd.queue.snapshot import queue_snapshot

    errors: list[str] = []
    out: dict[str, Any] = {"queue": None, "workers": None, "scratch": None, "recent_failures": None}
    try:
        now = time.time()
        snapshot = queue_snapshot(connect(settings.redis_url, retries=1), QueueKeys(settings.queue))
        out["queue"] = queue_section(snapshot)
        out["workers"] = worker_section(snapshot, now)
    except queue_errors() as exc:
        errors.append(f"redis at {redact_url(settings.redis_url)}: {type(exc).__name__}: {exc}")
    try:
        out["scratch"] = scratch_section(settings)
    except (OSError, StagerdError) as exc:
        errors.append(f"scratch {settings.scratch_dir}: {exc}")
    if settings.database_url:
        try:
            out["recent_failures"] = failures_section(settings.database_url, failures)
        except db_errors(StagerdError) as exc:
            errors.append(f"postgres: {type(exc).__name__}: {first_line(exc)}")
    out["errors"] = errors
    return out


def queue_section(snapshot: QueueSnapshot) -> dict[str, Any]:
    return {"name": snapshot.name, "pending": snapshot.pending, "dead": snapshot.dead}


def worker_section(snapshot: QueueSnapshot, now: float) -> list[dict[str, Any]]:
    """Every known worker, whether its heartbeat is alive, and its in-flight jobs."""
    return [
        {
            "id": worker.id,
            "alive": worker.alive,
            "heartbeat_ttl_seconds": round(worker.heartbeat_ttl_ms / 1000, 1)
            if worker.heartbeat_ttl_ms and worker.alive
            else None,
            "in_flight": [
                {
                    "batch_id": job.batch_id,
                    "phase": job.phase,
                    "age_seconds": round(now - job.since, 1) if job.since else None,
                    "attempt": job.attempt,
                }
                for job in worker.in_flight
            ],
        }
        for worker in snapshot.workers
    ]


def scratch_section(settings: Settings) -> dict[str, Any] | None:
    """Budget, reserved, used and free bytes on this host, with live reservations."""
    if not settings.scratch_dir.is_dir():
        return None
    from stagerd.scratch.space import ScratchManager

    status = ScratchManager.from_settings(settings).status()
    # Round-trip through JSON so paths become strings, as in the --json output.
    return cast(dict[str, Any], json.loads(json.dumps(asdict(status), default=str)))


def failures_section(database_url: str, limit: int) -> list[dict[str, Any]]:
    from stagerd.db import ledger as db

    return db.recent_failures(database_url, limit)
