"""Issue 17 (c): batch ids are immutable. ``transfer upload`` of a different archive under a
used id is refused (exit 1, one line) with nothing changed in S3, the ledger or the queue;
``--force`` replaces it and the batch is processed again. The worker never acknowledges a
job as "already done" when its digest or size differs from the done batch's."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path
from typing import Any

from stagerd.db import ledger as db
from stagerd.ids import digest_key
from stagerd.job import Job
from stagerd.queue.keys import QueueKeys
from tests.worker_support import WAVINFO, dead_letters, make_tar


def _tar_of(payload: bytes) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("clip-000.wav")
        info.size = len(payload)
        info.mtime = 0
        tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


def _object(s3: Any, bucket: str, key: str) -> tuple[str, bytes]:
    got = s3.get_object(Bucket=bucket, Key=key)
    return got["ETag"], got["Body"].read()


def _ledger_state(database_url: str, batch: str) -> tuple[Any, list[Any]]:
    ledger = db.Ledger(database_url)
    try:
        row = ledger.batch(batch)
        return (row.state, row.sha256, row.attempts) if row else None, ledger.results(batch)
    finally:
        ledger.close()


def test_a_used_batch_id_refuses_a_different_archive_and_force_replaces_it(
    stagerd_env: dict[str, str],
    s3_client: Any,
    s3_bucket: str,
    redis_client: Any,
    queue_name: str,
    database_url: str,
    run_cli: Any,
    tmp_path: Path,
) -> None:
    env = {**stagerd_env, "STAGERD_PROCESSOR": WAVINFO}
    first, bigger = tmp_path / "first.tar", tmp_path / "bigger.tar"
    first.write_bytes(make_tar(files=2))
    bigger.write_bytes(make_tar(files=3))
    upload = ["transfer", "upload", "--batch-id", "imm-1", "--progress", "none"]
    assert run_cli([*upload, str(first)], env=env).returncode == 0
    worker = run_cli(["gpu", "--burst"], env=env)
    assert worker.returncode == 0, worker.stderr[-2000:]
    before = (
        _object(s3_client, s3_bucket, "archives/imm-1.tar"),
        _object(s3_client, s3_bucket, digest_key("imm-1")),
        _ledger_state(database_url, "imm-1"),
    )
    assert before[2][0][0] == "done" and len(before[2][1]) == 2

    refused = run_cli([*upload, str(bigger)], env=env)
    assert refused.returncode == 1, refused.stderr
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "already holds a different archive" in lines[0], lines
    assert "--force" in lines[0] and "Traceback" not in refused.stderr
    after = (
        _object(s3_client, s3_bucket, "archives/imm-1.tar"),
        _object(s3_client, s3_bucket, digest_key("imm-1")),
        _ledger_state(database_url, "imm-1"),
    )
    assert after == before
    assert redis_client.llen(queue_name) == 0

    forced = run_cli([*upload, "--force", str(bigger)], env=env)
    assert forced.returncode == 0, forced.stderr
    assert json.loads(forced.stdout)["enqueued"] is True
    worker = run_cli(["gpu", "--burst"], env=env)
    assert worker.returncode == 0, worker.stderr[-2000:]
    (state, sha, _), results = _ledger_state(database_url, "imm-1")
    assert state == "done" and sha == hashlib.sha256(bigger.read_bytes()).hexdigest()
    assert len(results) == 3  # the old results were replaced by the new archive's
    assert dead_letters(redis_client, queue_name) == []


def test_same_size_different_bytes_is_refused_too(
    stagerd_env: dict[str, str], s3_client: Any, s3_bucket: str, run_cli: Any, tmp_path: Path
) -> None:
    one, two = tmp_path / "one.tar", tmp_path / "two.tar"
    one.write_bytes(_tar_of(b"A" * 5000))
    two.write_bytes(_tar_of(b"B" * 5000))
    assert one.stat().st_size == two.stat().st_size
    upload = ["transfer", "upload", "--batch-id", "imm-2", "--progress", "none", "--no-enqueue"]
    assert run_cli([*upload, str(one)], env=stagerd_env).returncode == 0
    refused = run_cli([*upload, str(two)], env=stagerd_env)
    assert refused.returncode == 1 and "different archive" in refused.stderr
    assert _object(s3_client, s3_bucket, "archives/imm-2.tar")[1] == one.read_bytes()
    # The same file again is not a reuse: idempotent as before.
    again = run_cli([*upload, str(one)], env=stagerd_env)
    assert again.returncode == 0 and json.loads(again.stdout)["already_uploaded"] is True


def test_worker_dead_letters_a_job_whose_digest_differs_from_the_done_batch(
    stagerd_env: dict[str, str],
    redis_client: Any,
    queue_name: str,
    database_url: str,
    run_cli: Any,
    tmp_path: Path,
) -> None:
    env = {**stagerd_env, "STAGERD_PROCESSOR": WAVINFO}
    path = tmp_path / "a.tar"
    path.write_bytes(make_tar(files=2))
    upload = ["transfer", "upload", "--batch-id", "imm-3", "--progress", "none"]
    assert run_cli([*upload, str(path)], env=env).returncode == 0
    assert run_cli(["gpu", "--burst"], env=env).returncode == 0
    # A producer outside stagerd pushes a job naming another archive under the same id.
    other = Job.new("imm-3", size=path.stat().st_size, sha256="0" * 64)
    redis_client.rpush(queue_name, other.to_json())
    worker = run_cli(["gpu", "--burst"], env=env)
    assert worker.returncode == 0, worker.stderr[-2000:]
    dead = dead_letters(redis_client, queue_name)
    assert [d["batch_id"] for d in dead] == ["imm-3"]
    assert "batch id reused" in dead[0]["error"]
    (state, _, _), results = _ledger_state(database_url, "imm-3")
    assert state == "done" and len(results) == 2
    assert redis_client.llen(QueueKeys(queue_name).pending) == 0
