"""``stagerd janitor``: one pass of crash recovery, each part on its own.

Parts, in order:

1. scratch sweep (local): :func:`stagerd.scratch.sweep.sweep_scratch`;
2. reservation records (local): records of dead owners, :meth:`ScratchManager.reclaim_dead`;
3. queue (cluster): in-flight jobs of workers whose heartbeat expired,
   :func:`stagerd.queue.orphans.recover_orphans`;
4. multipart uploads (cluster): incomplete uploads under ``archives/`` older than the
   maximum age are aborted (Swift's S3 API has no lifecycle rules to do it);
5. ledger (cluster, when ``DATABASE_URL`` is set): batches of the dead workers found in 3
   are marked requeued, :func:`stagerd.db.ledger.requeue_stale_batches`;
6. reconcile (cluster, when S3 and ``DATABASE_URL`` are set): archives whose jobs Redis
   lost are re-enqueued, :func:`stagerd.janitor.reconcile.reconcile` (under the cluster lock, so
   on one host at a time).

Two janitors never overlap: a file lock under ``root/.stagerd/`` guards the local parts
(the loser exits 0), a Redis key with a TTL guards the cluster parts (the loser skips them).
A part whose service is not configured is skipped with a warning; one that fails (service
unreachable included) is reported in ``errors`` and the others still run.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from stagerd.config.settings import redact_url
from stagerd.errors import ConfigError, StagerdError, first_line
from stagerd.log import get_logger
from stagerd.queue import clusterlock
from stagerd.queue.errors import queue_errors
from stagerd.queue.keys import QueueKeys
from stagerd.scratch.locks import FileLock
from stagerd.scratch.space import ScratchManager
from stagerd.scratch.sweep import check_scratch_root, sweep_scratch

if TYPE_CHECKING:
    from stagerd.config.settings import Settings
    from stagerd.queue.redis_queue import RedisClient
    from stagerd.s3.store import ObjectStore

log = get_logger(__name__)

ARCHIVE_PREFIX = "archives/"
# The cluster lock outlives a normal run by far; it only matters if a janitor dies holding it.
CLUSTER_LOCK_TTL = 600.0


@dataclass(frozen=True)
class JanitorOptions:
    dry_run: bool = False
    min_age: float = 15 * 60.0
    upload_max_age: float = 24 * 3600.0


@dataclass
class JanitorReport:
    """What one run did (or, dry, would do). ``as_json`` has exactly the documented keys."""

    dry_run: bool = False
    busy: bool = False
    removed: list[str] = field(default_factory=list)
    freed_bytes: int = 0
    kept_locked: list[str] = field(default_factory=list)
    reservations_reclaimed: list[str] = field(default_factory=list)
    requeued_jobs: list[str] = field(default_factory=list)
    dead_lettered: list[str] = field(default_factory=list)
    aborted_uploads: list[str] = field(default_factory=list)
    ledger_requeued: list[str] = field(default_factory=list)
    reenqueued: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def as_json(self) -> dict[str, Any]:
        return {
            "removed": self.removed,
            "freed_bytes": self.freed_bytes,
            "kept_locked": self.kept_locked,
            "reservations_reclaimed": self.reservations_reclaimed,
            "requeued_jobs": self.requeued_jobs,
            "dead_lettered": self.dead_lettered,
            "aborted_uploads": self.aborted_uploads,
            "errors": self.errors,
            "reenqueued": self.reenqueued,
        }

    def skip(self, part: str, why: str) -> None:
        log.warning(f"janitor: skipping {part}: {why}")
        self.skipped.append(f"{part}: {why}")

    def fail(self, part: str, why: str) -> None:
        log.error(f"janitor: {part} failed: {why}")
        self.errors.append(f"{part}: {why}")


def run_janitor(
    settings: Settings,
    options: JanitorOptions,
    *,
    clock: Callable[[], float] = time.time,
) -> JanitorReport:
    """One janitor pass. Raises ConfigError for a scratch root it must refuse."""
    report = JanitorReport(dry_run=options.dry_run)
    root = settings.scratch_dir
    has_scratch = check_scratch_root(root, settings.scratch_dir)
    with _local_lock(settings if has_scratch else None) as got:
        if not got:
            report.busy = True
            return report
        if has_scratch:
            _scratch_parts(settings, options, report, clock())
        else:
            report.skip("scratch", f"{root} does not exist on this host")
        _cluster_parts(settings, options, report, clock)
    return report


@contextmanager
def _local_lock(settings: Settings | None) -> Iterator[bool]:
    if settings is None:
        yield True
        return
    state = settings.scratch_dir / ".stagerd"
    state.mkdir(mode=0o755, exist_ok=True)
    lock = FileLock(state / "janitor.lock")
    if not lock.acquire(blocking=False):
        yield False
        return
    try:
        yield True
    finally:
        lock.release()


def _settled_batches(settings: Settings) -> Callable[[str], bool]:
    """Whether the ledger holds a batch as done or dead (asked only for scratch dirs with
    uncommitted results); False when it cannot tell, so such a dir is kept."""

    def settled(batch_id: str) -> bool:
        if not settings.database_url:
            return False
        from stagerd.db.ledger import Ledger
        from stagerd.db.pg import CLI_POLICY

        ledger = Ledger(settings.database_url, policy=CLI_POLICY)
        try:
            row = ledger.batch(batch_id) if ledger.schema_ready() else None
        except StagerdError:
            return False
        finally:
            ledger.close()
        return row is not None and row.state in ("done", "dead")

    return settled


def _scratch_parts(
    settings: Settings, options: JanitorOptions, report: JanitorReport, now: float
) -> None:
    try:
        swept = sweep_scratch(
            settings.scratch_dir,
            min_age=options.min_age,
            dry_run=options.dry_run,
            now=now,
            settled=_settled_batches(settings),
        )
    except OSError as exc:
        report.fail("scratch", f"{settings.scratch_dir}: {exc.strerror or exc}")
    else:
        report.removed, report.freed_bytes = swept.removed, swept.freed_bytes
        report.kept_locked = swept.kept_locked
        report.errors.extend(swept.errors)
    try:
        manager = ScratchManager.from_settings(settings)
        report.reservations_reclaimed = manager.reclaim_dead(dry_run=options.dry_run)
    except (OSError, StagerdError) as exc:
        report.fail("reservations", str(exc))


def _cluster_parts(
    settings: Settings,
    options: JanitorOptions,
    report: JanitorReport,
    clock: Callable[[], float],
) -> None:
    keys = QueueKeys(settings.queue)
    with _cluster_lock(settings, keys, report) as (client, got):
        if client is not None and not got:
            report.skip("queue, uploads and ledger", "another janitor holds the cluster lock")
            return
        dead_workers = _queue_part(client, keys, settings, options, report)
        _uploads_part(settings, options, report, clock)
        _ledger_part(settings, options, dead_workers, report)
        if client is not None:
            _reconcile_part(settings, options, client, report)


@contextmanager
def _cluster_lock(
    settings: Settings, keys: QueueKeys, report: JanitorReport
) -> Iterator[tuple[RedisClient | None, bool]]:
    """(client, acquired); client is None when Redis cannot be reached (reported)."""
    from stagerd.queue.redis_queue import connect_plain

    token = uuid.uuid4().hex
    client: RedisClient | None = None
    try:
        client = connect_plain(settings.redis_url)
        got = clusterlock.acquire(client, keys.janitor_lock, token, CLUSTER_LOCK_TTL)
    except queue_errors() as exc:
        report.fail("queue", f"redis at {redact_url(settings.redis_url)} unreachable: {exc}")
        yield None, False
        return
    try:
        yield client, got
    finally:
        if got:
            try:
                clusterlock.release(client, keys.janitor_lock, token)
            except queue_errors() as exc:
                log.warning(f"janitor: could not release the cluster lock (expires anyway): {exc}")
        client.close()


def _queue_part(
    client: RedisClient | None,
    keys: QueueKeys,
    settings: Settings,
    options: JanitorOptions,
    report: JanitorReport,
) -> list[str] | None:
    """Requeue or dead-letter orphaned jobs; the dead workers, None if this part failed."""
    if client is None:
        return None
    from stagerd.queue.orphans import recover_orphans

    try:
        recovered = recover_orphans(
            client, keys, max_attempts=settings.max_attempts, dry_run=options.dry_run
        )
    except queue_errors(StagerdError) as exc:
        report.fail("queue", f"orphan recovery: {exc}")
        return None
    report.requeued_jobs = recovered.requeued
    report.dead_lettered = recovered.dead_lettered
    return recovered.dead_workers


def stale_uploads(
    uploads: list[dict[str, Any]], now: float, max_age: float
) -> list[dict[str, Any]]:
    """The uploads (``list_multipart_uploads`` entries) initiated more than *max_age* ago."""
    stale = []
    for upload in uploads:
        initiated = upload.get("Initiated")
        if isinstance(initiated, datetime) and now - initiated.timestamp() > max_age:
            stale.append(upload)
    return stale


def abort_stale_uploads(
    store: ObjectStore, bucket: str, *, max_age: float, now: float, dry_run: bool = False
) -> list[str]:
    """Abort incomplete multipart uploads under ``archives/`` older than *max_age* seconds;
    the keys aborted (or, dry, that would be). Raises the store's errors (an upload gone
    meanwhile is not one: abort is idempotent)."""
    aborted = []
    listed = [
        {"Key": u.key, "UploadId": u.upload_id, "Initiated": u.initiated}
        for u in store.list_uploads(bucket, ARCHIVE_PREFIX)
    ]
    for upload in stale_uploads(listed, now, max_age):
        key = upload["Key"]
        if not dry_run:
            store.abort_multipart(bucket, key, upload["UploadId"])
            log.info("aborted stale multipart upload", extra={"key": key})
        aborted.append(key)
    return aborted


def _uploads_part(
    settings: Settings,
    options: JanitorOptions,
    report: JanitorReport,
    clock: Callable[[], float],
) -> None:
    try:
        s3 = settings.require_s3()
    except ConfigError as exc:
        report.skip("uploads", str(exc))
        return
    from stagerd.s3.boto import BotoStore

    try:
        report.aborted_uploads = abort_stale_uploads(
            BotoStore.from_settings(s3),
            s3.bucket,
            max_age=options.upload_max_age,
            now=clock(),
            dry_run=options.dry_run,
        )
    except StagerdError as exc:  # the store's errors, already one line
        report.fail("uploads", str(exc))


def _ledger_part(
    settings: Settings,
    options: JanitorOptions,
    dead_workers: list[str] | None,
    report: JanitorReport,
) -> None:
    if not settings.database_url:
        report.skip("ledger", "DATABASE_URL not set")
        return
    if dead_workers is None:
        report.skip("ledger", "no list of dead workers (the queue part did not run)")
        return
    if not dead_workers:
        return
    if options.dry_run:
        log.info(f"janitor: dry run: would mark batches of {', '.join(dead_workers)} requeued")
        return
    from stagerd.db.errors import db_errors
    from stagerd.db.ledger import requeue_stale_batches

    try:
        report.ledger_requeued = requeue_stale_batches(
            settings.database_url, dead_workers, report.dead_lettered
        )
    except db_errors(StagerdError) as exc:
        first = first_line(exc)
        report.fail("ledger", f"postgres: {first}")


def _reconcile_part(
    settings: Settings, options: JanitorOptions, client: RedisClient, report: JanitorReport
) -> None:
    if not settings.database_url:
        report.skip("reconcile", "DATABASE_URL not set")
        return
    try:
        s3 = settings.require_s3()
    except ConfigError as exc:
        report.skip("reconcile", str(exc))
        return
    from stagerd.db.errors import db_errors
    from stagerd.janitor.reconcile import LedgerNotMigrated, ReconcileOptions, reconcile
    from stagerd.s3.boto import BotoStore

    try:
        store = BotoStore.from_settings(s3)
        done = reconcile(
            settings, ReconcileOptions(dry_run=options.dry_run), s3=store, client=client
        )
    except LedgerNotMigrated as exc:
        report.skip("reconcile", str(exc))
    except queue_errors(*db_errors(), StagerdError) as exc:
        report.fail("reconcile", first_line(exc))
    else:
        report.reenqueued = done.reenqueued
