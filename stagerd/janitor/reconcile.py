"""``stagerd reconcile``: recovery when Redis forgot (a restart without persistence, a
FLUSHALL). Compares S3, the ledger and the queues and re-enqueues what was lost.

A batch is lost when its archive ``archives/{id}.tar`` is in S3, the ledger does not say
``done`` or ``dead``, and its job is in no Redis list (pending, dead-letter, any worker's
processing list). The lists are read in ONE Lua script (SCAN included), so a job moving
between lists (a pickup, a requeue) is seen exactly once; the ledger is read after that.
A job is always in some list until the ledger says done or dead (the worker acks only
after the commit, dead-letters before recording), so this finds no false losses, except
an upload whose job is not pushed yet: an archive with no ledger row younger than
``--min-age`` is left alone unless its digest record (``stagerd/digests/{id}.json``, in S3,
written after the enqueue) says it was enqueued.

Re-enqueued jobs carry the seed's payload plus size and digest from the digest record when
it matches the object's size. The lease epoch is raised past the ledger's newest token.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from stagerd.errors import ConfigError, InvalidBatchId, StagerdError, first_line
from stagerd.ids import digest_key, validate_batch_id
from stagerd.job import Job
from stagerd.log import get_logger
from stagerd.queue.keys import QueueKeys

if TYPE_CHECKING:
    from stagerd.config.settings import Settings
    from stagerd.queue.redis_queue import RedisClient
    from stagerd.s3.store import ObjectStore

log = get_logger(__name__)
ARCHIVE_PREFIX = "archives/"


class LedgerNotMigrated(StagerdError):
    """The ledger has no schema yet: nothing says which batches are done, so nothing is
    re-enqueued (a wrong DATABASE_URL must not re-run every archive in the bucket)."""


@dataclass(frozen=True)
class ReconcileOptions:
    dry_run: bool = False
    min_age: float = 600.0


@dataclass(frozen=True)
class ReconcileReport:
    """What one pass found and did (or, dry, would do)."""

    archives: int
    queued: int
    settled: int
    reenqueued: list[str] = field(default_factory=list)
    too_young: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "archives": self.archives,
            "in_queues": self.queued,
            "done_or_dead": self.settled,
            "reenqueued": self.reenqueued,
            "too_young": self.too_young,
        }


@dataclass(frozen=True)
class Archive:
    batch_id: str
    size: int
    modified: float


def reconcile(
    settings: Settings,
    options: ReconcileOptions,
    *,
    s3: ObjectStore,
    client: RedisClient,
    clock: Callable[[], float] = time.time,
) -> ReconcileReport:
    """One pass. Raises ConfigError without DATABASE_URL or S3, LedgerNotMigrated;
    service errors propagate."""
    from stagerd.db.reconcile import batch_states
    from stagerd.queue.snapshot import queued_batch_ids

    if not settings.database_url:
        raise ConfigError("DATABASE_URL: not set (reconcile reads the ledger's done batches)")
    bucket = settings.require_s3().bucket
    keys = QueueKeys(settings.queue)
    _require_migrated(settings.database_url)
    archives = list_archives(s3, bucket)
    queued = queued_batch_ids(client, keys)
    states = batch_states(settings.database_url, [a.batch_id for a in archives])
    reenqueued, young, settled = [], [], 0
    now = clock()
    for archive in archives:
        state = states.get(archive.batch_id)
        if archive.batch_id in queued:
            continue
        if state in ("done", "dead"):
            settled += 1
            continue
        record = _digest_record(s3, bucket, archive)
        if (
            state is None
            and not record.get("enqueued")
            and now - archive.modified < options.min_age
        ):
            young.append(archive.batch_id)
            continue
        if not options.dry_run:
            _enqueue(client, keys, _job(archive, record))
        reenqueued.append(archive.batch_id)
    if not options.dry_run:
        _raise_epoch(client, keys, settings.database_url)
    _log_reenqueued(reenqueued, dry_run=options.dry_run)
    in_queues = sum(1 for a in archives if a.batch_id in queued)
    return ReconcileReport(len(archives), in_queues, settled, reenqueued, young)


def _log_reenqueued(reenqueued: list[str], *, dry_run: bool) -> None:
    if reenqueued:
        log.warning(
            "reconcile: %s %d lost batch(es): %s",
            "would re-enqueue" if dry_run else "re-enqueued",
            len(reenqueued),
            ", ".join(reenqueued),
            extra={"event": "reconcile_reenqueued"},
        )


def run_reconcile(settings: Settings, options: ReconcileOptions) -> ReconcileReport:
    """Connect and run one pass; every service failure becomes one ServiceUnavailable."""
    from stagerd.config.settings import redact_url
    from stagerd.db.errors import db_errors
    from stagerd.errors import PermanentError, ServiceUnavailable, TransientError
    from stagerd.queue.errors import queue_errors
    from stagerd.queue.redis_queue import connect
    from stagerd.s3.boto import BotoStore

    s3 = settings.require_s3()
    client = connect(settings.redis_url, retries=1)
    try:
        return reconcile(settings, options, s3=BotoStore.from_settings(s3), client=client)
    except (TransientError, PermanentError) as exc:  # the store's, already one line
        raise ServiceUnavailable(str(exc)) from None
    except queue_errors() as exc:  # before db_errors(): an OSError is Redis's, as it was
        where = redact_url(settings.redis_url)
        raise ServiceUnavailable(f"Redis at {where} unreachable: {exc}") from None
    except db_errors() as exc:
        first = first_line(exc)
        raise ServiceUnavailable(f"ledger: {first} (did `stagerd db migrate` run?)") from None
    finally:
        client.close()


def list_archives(s3: ObjectStore, bucket: str) -> list[Archive]:
    """Every ``archives/{id}.tar`` with a valid batch id (other keys are not ours)."""
    found = []
    for obj in s3.list_objects(bucket, ARCHIVE_PREFIX):
        name = obj.key[len(ARCHIVE_PREFIX) :]
        if not name.endswith(".tar") or "/" in name:
            continue
        try:
            batch_id = validate_batch_id(name[: -len(".tar")])
        except InvalidBatchId:
            continue
        modified = obj.last_modified
        stamp = modified.timestamp() if isinstance(modified, datetime) else 0.0
        found.append(Archive(batch_id, obj.size, stamp))
    return found


def _require_migrated(database_url: str) -> None:
    """Raise LedgerNotMigrated unless the ledger's schema exists."""
    from stagerd.db.ledger import Ledger
    from stagerd.db.pg import CLI_POLICY

    ledger = Ledger(database_url, policy=CLI_POLICY)
    try:
        ready = ledger.schema_ready()
    finally:
        ledger.close()
    if not ready:
        raise LedgerNotMigrated(
            "the ledger is not migrated (run stagerd db migrate, or check DATABASE_URL): "
            "nothing says which batches are done, so nothing was re-enqueued"
        )


def _digest_record(s3: ObjectStore, bucket: str, archive: Archive) -> dict[str, Any]:
    """The digest record if present and about this very object (same size), else {}."""
    from stagerd.errors import ObjectNotFound

    try:
        data = json.loads(s3.get(bucket, digest_key(archive.batch_id)))
    except ObjectNotFound:
        return {}
    except ValueError:
        return {}
    if not isinstance(data, dict) or data.get("size") != archive.size:
        return {}
    return data


def _job(archive: Archive, record: dict[str, Any]) -> Job:
    file_count = record.get("file_count")
    sha256 = record.get("sha256")
    return Job.new(
        archive.batch_id,
        file_count=file_count if isinstance(file_count, int) else None,
        size=archive.size,
        sha256=sha256 if isinstance(sha256, str) and len(sha256) == 64 else None,
    )


def _enqueue(client: RedisClient, keys: QueueKeys, job: Job) -> None:
    from stagerd.queue.redis_queue import enqueue_once

    # force: the enqueued marker may have survived while the job itself was lost.
    enqueue_once(client, keys, job, force=True)


def _raise_epoch(client: RedisClient, keys: QueueKeys, database_url: str) -> None:
    """After a Redis loss the lease counter restarts low: raise it past the ledger's."""
    from stagerd.db.reconcile import max_lease

    floor = max_lease(database_url)
    if floor:
        from stagerd.queue.redis_queue import raise_epoch

        raise_epoch(client, keys, floor)
