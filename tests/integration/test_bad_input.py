"""The bad-input catalogue (issue 8), in one place and table-driven.

Every hostile or malformed input gets one clear error (its reason text), no traceback, and
loses nothing: the job lands in the dead-letter list with its reason (worker side) or
nothing is sent at all (transfer side); a good batch queued after the bad ones ends done,
so the worker kept going.

All the worker cases share one queue and one ``stagerd gpu --burst`` process.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from stagerd.db import ledger as db
from stagerd.queue.keys import QueueKeys
from tests.transfer_helpers import write_tar
from tests.worker_support import WAVINFO, dead_letters, make_tar, put_batch, scratch_leftovers

MAX_MEMBERS = 50


# --- malformed payloads ---------------------------------------------------------------


@dataclass(frozen=True)
class PayloadCase:
    name: str
    raw: bytes
    reason: str  # a substring of the dead letter's error


def _payload(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


PAYLOADS = [
    PayloadCase("not json", b"{this is not json", "payload is not JSON"),
    PayloadCase("not an object", b'["archives/x.tar"]', "must be a JSON object, got list"),
    PayloadCase("missing s3_key", _payload(batch_id="p-missing"), "lacks required field 's3_key'"),
    PayloadCase("missing batch_id", _payload(s3_key="archives/p.tar"), "'batch_id'"),
    PayloadCase("batch_id not a string", _payload(batch_id=7, s3_key="archives/7.tar"), "batch id"),
    PayloadCase(
        "size wrong type",
        _payload(batch_id="p-size", s3_key="archives/p-size.tar", size="big"),
        "field 'size' must be a non-negative integer",
    ),
    PayloadCase(
        "sha256 wrong type",
        _payload(batch_id="p-sha", s3_key="archives/p-sha.tar", sha256=12),
        "field 'sha256'",
    ),
    PayloadCase(
        "s3_key mismatch",
        _payload(batch_id="p-key", s3_key="archives/other.tar"),
        "does not match batch id",
    ),
    PayloadCase(
        "hostile batch id in payload",
        _payload(batch_id="../../etc", s3_key="archives/../../etc.tar"),
        "'..'",
    ),
    PayloadCase(
        "huge payload",
        _payload(batch_id="p-huge", s3_key="archives/p-huge.tar", pad="x" * 70_000),
        "at most 65536",
    ),
]


# --- hostile archives -----------------------------------------------------------------


def _tar(*members: tuple[tarfile.TarInfo, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for info, data in members:
            info.size = len(data) if info.isreg() else 0
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buf.getvalue()


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    return info


def _lying_size() -> bytes:
    """A header that promises 1 MiB for a member whose data is 512 bytes, then the end."""
    info = tarfile.TarInfo("liar.wav")
    info.size = 1024 * 1024
    return info.tobuf(format=tarfile.GNU_FORMAT) + b"\x01" * 512 + bytes(1024)


@dataclass(frozen=True)
class ArchiveCase:
    batch_id: str
    body: bytes
    reason: str
    job: dict[str, Any] | None = None  # payload overrides (lying size / digest)


def _archives() -> list[ArchiveCase]:
    good = make_tar(files=2)
    wav = make_tar(files=1)
    return [
        ArchiveCase("h-traversal", _tar((_member("../evil.wav"), b"x")), "'..' component"),
        ArchiveCase("h-absolute", _tar((_member("/tmp/evil.wav"), b"x")), "absolute path"),
        ArchiveCase(
            "h-symlink",
            _tar((_member("out", tarfile.SYMTYPE, "/etc/passwd"), b"")),
            "symbolic link",
        ),
        ArchiveCase(
            "h-hardlink",
            _tar((_member("out", tarfile.LNKTYPE, "../../etc/passwd"), b"")),
            "hard link",
        ),
        ArchiveCase("h-device", _tar((_member("null", tarfile.CHRTYPE), b"")), "character device"),
        ArchiveCase("h-fifo", _tar((_member("pipe", tarfile.FIFOTYPE), b"")), "fifo"),
        ArchiveCase(
            "h-members",
            _tar(*((_member(f"m{i:03d}.wav"), b"x") for i in range(MAX_MEMBERS + 5))),
            f"more than {MAX_MEMBERS} members",
        ),
        ArchiveCase("h-lying-member", _lying_size(), "truncated"),
        ArchiveCase("h-lying-job-size", good, "the job says 1", job={"size": 1}),
        ArchiveCase("h-lying-sha256", good, "SHA-256 mismatch", job={"sha256": "0" * 64}),
        ArchiveCase("h-truncated", wav[:1500], "truncated"),  # inside the member data
        ArchiveCase("h-not-a-tar", b"PK\x03\x04 this is a zip, not a tar" * 40, "tar header"),
        ArchiveCase("h-missing", b"", "does not exist", job={"_no_upload": True}),
    ]


def test_malformed_payloads_and_hostile_archives_are_dead_lettered_with_reasons(
    run_cli: Any,
    stagerd_env: dict[str, str],
    s3_client: Any,
    s3_bucket: str,
    redis_client: Any,
    queue_name: str,
    database_url: str,
    scratch_dir: Path,
) -> None:
    for case in PAYLOADS:
        redis_client.rpush(queue_name, case.raw)
    archives = _archives()
    for arc in archives:
        overrides = dict(arc.job or {})
        if overrides.pop("_no_upload", False):
            job = put_batch(
                s3_client, redis_client, s3_bucket, queue_name, arc.batch_id, b"x", enqueue=False
            )
            s3_client.delete_object(Bucket=s3_bucket, Key=job.s3_key)
            redis_client.rpush(queue_name, job.to_json())
            continue
        job = put_batch(
            s3_client, redis_client, s3_bucket, queue_name, arc.batch_id, arc.body, enqueue=False
        )
        redis_client.rpush(queue_name, json.dumps({**job.to_dict(), **overrides}))
    good = make_tar(files=3)
    put_batch(s3_client, redis_client, s3_bucket, queue_name, "good-after", good)

    env = {
        **stagerd_env,
        "STAGERD_PROCESSOR": WAVINFO,
        "STAGERD_MAX_MEMBERS": str(MAX_MEMBERS),
        "STAGERD_HEARTBEAT_TTL": "2s",
    }
    result = run_cli(["gpu", "--burst", "--prefetch", "0"], env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]

    dead = dead_letters(redis_client, queue_name)
    by_payload = {entry["payload"]: entry for entry in dead}
    problems = []
    for case in PAYLOADS:
        entry = by_payload.get(case.raw.decode())
        if entry is None or case.reason not in entry["error"]:
            problems.append((case.name, entry and entry["error"]))
    by_batch = {entry["batch_id"]: entry for entry in dead if entry["batch_id"]}
    for arc in archives:
        entry = by_batch.get(arc.batch_id)
        if entry is None or arc.reason not in entry["error"]:
            problems.append((arc.batch_id, entry and entry["error"]))
    assert not problems, problems
    assert len(dead) == len(PAYLOADS) + len(archives)  # each exactly once, nothing else
    for entry in dead:
        assert "\n" not in entry["error"] and "Traceback" not in entry["error"]

    ledger = db.Ledger(database_url)
    try:
        row = ledger.batch("good-after")
        assert row is not None and row.state == "done"
        assert row.sha256 == hashlib.sha256(good).hexdigest()
        assert len(ledger.results("good-after")) == 3
        failures = {f.batch_id: f for f in ledger.recent_failures(limit=100)}
        for arc in archives:  # the reason is recorded in the ledger as well
            assert arc.reason in failures[arc.batch_id].error, arc.batch_id
            assert failures[arc.batch_id].outcome == "dead"
    finally:
        ledger.close()
    keys = QueueKeys(queue_name)
    assert redis_client.llen(keys.pending) == 0
    assert scratch_leftovers(scratch_dir) == []
    assert not (scratch_dir.parent / "evil.wav").exists()


# --- hostile batch ids and bad S3 settings at the transfer side ------------------------

HOSTILE_IDS = [
    ("dotdot", "--batch-id=..", "'..'"),
    ("traversal", "--batch-id=../etc", "'..'"),
    ("slash", "--batch-id=a/b", "batch id"),
    ("empty", "--batch-id=", "batch id"),
    ("too long", "--batch-id=" + "x" * 129, "at most 128"),
    ("leading dash", "--batch-id=-rf", "batch id"),
    ("unicode", "--batch-id=bätch", "batch id"),
    ("space", "--batch-id=a b", "batch id"),
]


@pytest.mark.parametrize(("name", "arg", "needle"), HOSTILE_IDS, ids=[c[0] for c in HOSTILE_IDS])
def test_hostile_batch_ids_are_usage_errors_and_send_nothing(
    name: str,
    arg: str,
    needle: str,
    run_cli: Any,
    stagerd_env: dict[str, str],
    s3_client: Any,
    s3_bucket: str,
    redis_client: Any,
    queue_name: str,
    tmp_path: Path,
) -> None:
    path = write_tar(tmp_path / "b.tar", 64 * 1024)
    result = run_cli(["transfer", "upload", str(path), arg], env=stagerd_env, timeout=60)
    assert result.returncode == 2, (name, result.stderr)
    assert needle in result.stderr, (name, result.stderr)
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert s3_client.list_objects_v2(Bucket=s3_bucket).get("KeyCount", 0) == 0
    assert s3_client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []
    assert redis_client.llen(queue_name) == 0


def test_wrong_credentials_and_missing_bucket_fail_clearly_without_secrets(
    run_cli: Any,
    stagerd_env: dict[str, str],
    s3_client: Any,
    s3_bucket: str,
    redis_client: Any,
    queue_name: str,
    tmp_path: Path,
) -> None:
    path = write_tar(tmp_path / "b.tar", 64 * 1024)
    endpoint = stagerd_env["S3_ENDPOINT"]
    cases = [
        ({"S3_SECRET_KEY": "wrong-secret-xyz"}, [s3_bucket, endpoint]),
        ({"S3_ACCESS_KEY": "no-such-key-abc"}, [s3_bucket, endpoint]),
        ({"S3_BUCKET": f"{s3_bucket}-nope"}, [f"{s3_bucket}-nope", "does not exist", endpoint]),
    ]
    for extra, needles in cases:
        env = {**stagerd_env, **extra, "STAGERD_S3_MAX_ATTEMPTS": "2"}
        result = run_cli(["transfer", "upload", str(path), "--batch-id", "b"], env=env)
        assert result.returncode == 1, (extra, result.stderr)
        for needle in needles:
            assert needle in result.stderr, (extra, needle, result.stderr)
        assert "Traceback" not in result.stderr and result.stdout == ""
        assert len(result.stderr.strip().splitlines()) <= 3, result.stderr
        for secret in ("wrong-secret-xyz", stagerd_env["S3_SECRET_KEY"]):
            assert secret not in result.stderr
    assert s3_client.list_objects_v2(Bucket=s3_bucket).get("KeyCount", 0) == 0
    assert redis_client.llen(queue_name) == 0
