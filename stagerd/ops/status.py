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

from stagerd.job import loads_untrusted
from stagerd.queue.keys import QueueKeys

if TYPE_CHECKING:
    import redis

    from stagerd.config.settings import Settings


def collect(settings: Settings, *, failures: int = 10) -> dict[str, Any]:
    """The whole status as one JSON-ready dict."""
    import psycopg
    import redis as redis_lib

    from stagerd.config.settings import redact_url
    from stagerd.errors import StagerdError
    from stagerd.queue.redis_queue import connect

    errors: list[str] = []
    out: dict[str, Any] = {"queue": None, "workers": None, "scratch": None, "recent_failures": None}
    try:
        client = connect(settings.redis_url, retries=1)
        keys = QueueKeys(settings.queue)
        out["queue"] = queue_section(client, keys)
        out["workers"] = worker_section(client, keys)
    except (redis_lib.RedisError, OSError) as exc:
        errors.append(f"redis at {redact_url(settings.redis_url)}: {type(exc).__name__}: {exc}")
    try:
        out["scratch"] = scratch_section(settings)
    except (OSError, StagerdError) as exc:
        errors.append(f"scratch {settings.scratch_dir}: {exc}")
    if settings.database_url:
        try:
            out["recent_failures"] = failures_section(settings.database_url, failures)
        except (psycopg.Error, OSError, StagerdError) as exc:
            errors.append(f"postgres: {type(exc).__name__}: {_first_line(exc)}")
    out["errors"] = errors
    return out


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else ""


def queue_section(client: redis.Redis, keys: QueueKeys) -> dict[str, Any]:
    return {
        "name": keys.pending,
        "pending": int(client.llen(keys.pending)),
        "dead": int(client.llen(keys.dead)),
    }


def worker_section(client: redis.Redis, keys: QueueKeys) -> list[dict[str, Any]]:
    """Every known worker, whether its heartbeat is alive, and its in-flight jobs."""
    now = time.time()
    from stagerd.queue.redis_queue import processing_owners

    # Also workers dropped from the set that still hold jobs (found by their lists).
    registered = {w.decode() for w in cast(set[bytes], client.smembers(keys.workers))}
    workers = sorted(registered | set(processing_owners(client, keys)))
    section = []
    for worker in workers:
        phases = {
            k.decode(): json.loads(v)
            for k, v in cast(dict[bytes, bytes], client.hgetall(keys.phase(worker))).items()
        }
        jobs = []
        for raw in cast(list[bytes], client.lrange(keys.processing(worker), 0, -1)):
            try:
                batch_id = loads_untrusted(raw).get("batch_id")
            except (ValueError, AttributeError):
                batch_id = None
            info = phases.get(batch_id or "(invalid)", {})
            since = info.get("since")
            jobs.append(
                {
                    "batch_id": batch_id,
                    "phase": info.get("phase", "queued"),
                    "age_seconds": round(now - since, 1) if since else None,
                    "attempt": info.get("attempt"),
                }
            )
        ttl = client.pttl(keys.heartbeat(worker))
        section.append(
            {
                "id": worker,
                "alive": bool(ttl is not None and int(ttl) > 0),
                "heartbeat_ttl_seconds": round(int(ttl) / 1000, 1)
                if ttl and int(ttl) > 0
                else None,
                "in_flight": jobs,
            }
        )
    return section


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
