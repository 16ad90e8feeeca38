"""Health checks for ``stagerd doctor``: what a new VM runs after Ansible.

Each check is a small function returning a :class:`Check`; one failing check never stops
the others. No check prints or logs a secret: messages name variables, endpoints and
buckets only.
"""

from __future__ import annotations

import contextlib
import io
import os
import shlex
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from stagerd.config.settings import Settings, redact_url
from stagerd.errors import ConfigError, StagerdError

if TYPE_CHECKING:
    from stagerd.s3.store import ObjectStore

ROLES = ("gpu", "transfer", "janitor")


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    hint: str = ""
    # A risk worth acting on that does not fail the check (doctor still exits 0).
    warn: bool = False


def run_checks(settings: Settings, role: str = "gpu") -> list[Check]:
    """Run every check that matters for *role*, in a useful order."""
    checks: list[Check] = [check_config(settings, role)]
    s3_ok = settings.s3_endpoint and settings.s3_bucket and settings.s3_access_key
    if s3_ok:
        checks.extend(check_s3(settings))
    checks.append(check_redis(settings))
    if checks[-1].ok:
        checks.append(check_redis_persistence(settings))
    if role in ("gpu", "janitor"):
        if settings.database_url:
            checks.append(check_postgres(settings))
        checks.append(check_scratch(settings))
    if role == "gpu":
        checks.append(check_processor(settings))
    return checks


def check_config(settings: Settings, role: str) -> Check:
    missing: list[str] = []
    try:
        settings.require_s3()
    except ConfigError as exc:
        missing.append(str(exc).split(":")[0])
    if role == "gpu":
        if not settings.database_url:
            missing.append("DATABASE_URL")
        if not settings.processor:
            missing.append("STAGERD_PROCESSOR")
    if missing:
        return Check(
            "config",
            False,
            f"missing for role {role}: {', '.join(missing)}",
            f"set them in {settings.env_file or '/etc/stagerd/stagerd.env'} (Ansible: stagerd_env)",
        )
    where = f" (env file {settings.env_file})" if settings.env_file else ""
    return Check("config", True, f"complete for role {role}{where}")


def check_s3(settings: Settings) -> list[Check]:
    """Endpoint reachable, credentials accepted, bucket present, multipart round trip, and
    which checksum mode the server accepts."""
    from stagerd.s3.boto import BotoStore

    s3 = settings.require_s3()
    store = BotoStore.from_settings(settings.replace(s3_max_attempts=2))
    try:
        store.head_bucket(s3.bucket)
    except StagerdError as exc:
        return [
            Check(
                "s3.bucket",
                False,
                str(exc),
                "check S3_ENDPOINT, the keys, and that the bucket exists",
            )
        ]
    checks = [Check("s3.bucket", True, f"bucket {s3.bucket!r} reachable at {s3.endpoint}")]
    checks.append(_multipart_round_trip(store, s3.bucket))
    checks.append(_part_limit(store, s3.bucket, settings.max_parts))
    checks.append(_checksum_mode(settings, s3.bucket))
    return checks


def _part_limit(store: ObjectStore, bucket: str, max_parts: int) -> Check:
    """Does the server take part number STAGERD_MAX_PARTS? (Swift allows 1000 by default,
    S3 10000; a refusal mid-upload wastes the parts before it.) A tiny part is enough:
    part sizes are only checked at Complete, which the probe never sends."""
    from stagerd.s3.hints import part_limit

    key = f"stagerd-doctor/{uuid.uuid4().hex}"
    upload_id = None
    try:
        upload_id = store.create_multipart(bucket, key)
        store.upload_part(bucket, key, upload_id, max_parts, io.BytesIO(b"x"), 1)
    except StagerdError as exc:
        limit = part_limit(str(exc))  # the error quotes the server's own words
        fix = f"set STAGERD_MAX_PARTS={limit}" if limit else "lower STAGERD_MAX_PARTS"
        return Check("s3.parts", False, f"part number {max_parts} refused: {exc}", fix)
    finally:
        if upload_id:
            with contextlib.suppress(StagerdError):
                store.abort_multipart(bucket, key, upload_id)
    return Check("s3.parts", True, f"part number {max_parts} accepted (STAGERD_MAX_PARTS)")


def _multipart_round_trip(store: ObjectStore, bucket: str) -> Check:
    # Outside archives/ so neither workers nor the janitor ever see it.
    key = f"stagerd-doctor/{uuid.uuid4().hex}"
    body = b"stagerd doctor multipart probe\n"
    upload_id = None
    try:
        upload_id = store.create_multipart(bucket, key)
        etag = store.upload_part(bucket, key, upload_id, 1, io.BytesIO(body), len(body))
        store.complete_multipart(bucket, key, upload_id, [etag])
        upload_id = None
        ranged = store.get_range(bucket, key, 0, 5)
        try:
            got = ranged.read()
        finally:
            ranged.close()
        store.delete(bucket, key)
    except StagerdError as exc:
        if upload_id:
            with contextlib.suppress(StagerdError):
                store.abort_multipart(bucket, key, upload_id)
        return Check(
            "s3.multipart",
            False,
            str(exc),
            "the credentials need PutObject/GetObject/DeleteObject and multipart permissions",
        )
    if got != body[:6]:
        return Check("s3.multipart", False, "ranged read returned different bytes")
    return Check("s3.multipart", True, "create/upload/complete/ranged get/delete round trip works")


def _checksum_mode(settings: Settings, bucket: str) -> Check:
    """Whether the server accepts boto3's default request checksums (newer servers) or
    only works with ``when_required`` (older Swift s3api)."""
    from stagerd.s3.boto import BotoStore

    probe = BotoStore.from_settings(
        settings.replace(s3_checksum="when_supported", s3_max_attempts=1)
    )
    key = f"stagerd-doctor/{uuid.uuid4().hex}"
    try:
        probe.put(bucket, key, b"checksum probe")
        probe.delete(bucket, key)
        accepted = "when_supported and when_required"
    except StagerdError:
        accepted = "when_required only"
        if settings.s3_checksum == "when_supported":
            return Check(
                "s3.checksum",
                False,
                "server rejects boto3's default checksums but STAGERD_S3_CHECKSUM=when_supported",
                "set STAGERD_S3_CHECKSUM=when_required",
            )
    return Check("s3.checksum", True, f"server accepts {accepted}; using {settings.s3_checksum}")


def check_redis(settings: Settings) -> Check:
    from stagerd.queue.errors import queue_errors
    from stagerd.queue.health import queue_depth
    from stagerd.queue.redis_queue import connect

    where = redact_url(settings.redis_url)
    try:
        depth = queue_depth(connect(settings.redis_url, retries=1), settings.queue)
    except queue_errors() as exc:
        return Check(
            "redis", False, f"cannot reach {where}: {exc}", "check REDIS_URL and the network"
        )
    return Check("redis", True, f"{where} answers; {settings.queue} holds {depth} job(s)")


REDIS_PERSISTENCE_HINT = (
    "set `appendonly yes` and `appendfsync everysec` in redis.conf (see README: Reliability); "
    "until then a Redis restart loses every queued job (`stagerd reconcile` re-enqueues them)"
)


def check_redis_persistence(settings: Settings) -> Check:
    """Warn when Redis keeps nothing across a restart: the queue would vanish with it."""
    from stagerd.queue.errors import queue_errors
    from stagerd.queue.health import persistence
    from stagerd.queue.redis_queue import connect

    try:
        aof, save = persistence(connect(settings.redis_url, retries=1))
    except queue_errors() as exc:
        return Check("redis.persist", True, f"cannot tell ({exc})", REDIS_PERSISTENCE_HINT, True)
    if aof:
        return Check("redis.persist", True, "append-only file enabled")
    if save:
        return Check(
            "redis.persist",
            True,
            f"RDB snapshots only (save {save}): a crash loses the jobs since the last one",
            REDIS_PERSISTENCE_HINT,
            True,
        )
    return Check(
        "redis.persist", True, "no persistence (no AOF, no snapshots)", REDIS_PERSISTENCE_HINT, True
    )


def check_postgres(settings: Settings) -> Check:
    from stagerd.db.errors import db_errors
    from stagerd.db.schema import pending_migrations

    url = settings.require_database()
    try:
        pending = pending_migrations(url)
    except db_errors() as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return Check(
            "postgres", False, f"cannot use {redact_url(url)}: {detail}", "check DATABASE_URL"
        )
    if pending:
        return Check(
            "postgres", False, f"{len(pending)} migration(s) not applied", "run: stagerd db migrate"
        )
    return Check("postgres", True, f"{redact_url(url)} reachable and migrated")


def check_scratch(settings: Settings) -> Check:
    root = settings.scratch_dir
    if not root.is_dir():
        return Check("scratch", False, f"{root} is not a directory", "create it (Ansible does)")
    probe = root / f".doctor-{uuid.uuid4().hex}"
    try:
        probe.write_bytes(b"x")
        probe.unlink()
    except OSError as exc:
        return Check(
            "scratch", False, f"{root} is not writable: {exc.strerror}", "fix its owner/mode"
        )
    mount, fstype = mount_of(root)
    data = Path("/data")
    if root.resolve().is_relative_to(data) and mount == Path("/"):
        return Check(
            "scratch",
            False,
            f"{root} is on the root file system: the data volume is not mounted at /data",
            "mount the data volume (Ansible role: stagerd_manage_volume)",
        )
    st = os.statvfs(root)
    total = st.f_blocks * st.f_frsize
    free = st.f_bavail * st.f_frsize
    need = settings.scratch_budget + settings.scratch_headroom
    if total < need:
        return Check(
            "scratch",
            False,
            f"file system at {mount} ({fstype}) holds {total} bytes < budget + headroom ({need})",
            "lower STAGERD_SCRATCH_BUDGET or grow the volume",
        )
    return Check(
        "scratch",
        True,
        f"{root} writable on {mount} ({fstype}); {free} bytes free, budget {settings.scratch_budget}",
    )


def mount_of(path: Path) -> tuple[Path, str]:
    """The mount point and file system type holding *path* (from /proc/self/mountinfo)."""
    target = path.resolve()
    best, fstype = Path("/"), "unknown"
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return best, fstype
    for line in lines:
        fields = line.split()
        if " - " not in line or len(fields) < 5:
            continue
        mount = Path(fields[4].replace("\\040", " "))
        if target.is_relative_to(mount) and len(mount.parts) >= len(best.parts):
            best, fstype = mount, line.split(" - ", 1)[1].split()[0]
    return best, fstype


def check_processor(settings: Settings) -> Check:
    if not settings.processor:
        return Check(
            "processor", False, "STAGERD_PROCESSOR is not set", "set the processing command"
        )
    try:
        argv = shlex.split(settings.processor)
    except ValueError as exc:
        return Check("processor", False, f"STAGERD_PROCESSOR does not parse: {exc}")
    if not argv:
        return Check("processor", False, "STAGERD_PROCESSOR is empty")
    found = shutil.which(argv[0])
    if found is None:
        return Check("processor", False, f"{argv[0]!r} not found on PATH or not executable")
    return Check("processor", True, f"{argv[0]} -> {found}")
