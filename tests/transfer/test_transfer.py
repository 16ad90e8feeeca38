"""The transfer pipeline in-process against SeaweedFS and Redis."""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path
from typing import Any

import pytest

from stagerd.errors import ArchiveRejected, InvalidBatchId, ServiceUnavailable
from stagerd.retry import RetryPolicy
from stagerd.s3.multipart import UploadInterrupted
from stagerd.s3.partio import MiB
from stagerd.transfer.upload import TransferRequest, get_s3_client, transfer, upload_archive
from tests.transfer_helpers import write_tar

FAST = RetryPolicy(attempts=4, base=0.001, max_delay=0.01, total=10.0)


def test_transfer_uploads_verifies_and_enqueues(
    settings: Any, s3_client: Any, s3_bucket: str, redis_client: Any, queue_name: str,
    tmp_path: Path,
) -> None:  # fmt: skip
    path = write_tar(tmp_path / "a.tar", 7 * MiB, members=5)
    report = transfer(
        settings, TransferRequest(path, "batch-7", part_size=5 * MiB), policy=FAST,
        progress_mode="none",
    )  # fmt: skip
    data = path.read_bytes()
    assert report.s3_key == "archives/batch-7.tar" and report.bucket == s3_bucket
    assert report.sha256 == hashlib.sha256(data).hexdigest() and report.bytes == len(data)
    assert report.parts == 2 and report.file_count == 5 and report.enqueued
    assert s3_client.get_object(Bucket=s3_bucket, Key=report.s3_key)["Body"].read() == data
    (raw,) = redis_client.lrange(queue_name, 0, -1)
    job = json.loads(raw)
    assert set(job) == {"batch_id", "s3_key", "file_count", "transferred_at", "size", "sha256"}
    assert job["sha256"] == report.sha256 and job["file_count"] == 5


def test_seed_upload_archive_keeps_its_signature(
    stagerd_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, s3_client: Any,
    s3_bucket: str, redis_client: Any, queue_name: str, tmp_path: Path,
) -> None:  # fmt: skip
    for name, value in stagerd_env.items():
        monkeypatch.setenv(name, value)
    path = write_tar(tmp_path / "s.tar", 256 * 1024)
    assert upload_archive(path, "seed-1") == "archives/seed-1.tar"
    head = s3_client.head_object(Bucket=s3_bucket, Key="archives/seed-1.tar")
    assert head["ContentLength"] == path.stat().st_size
    assert redis_client.llen(queue_name) == 0  # the seed's caller enqueues itself
    assert get_s3_client().list_objects_v2(Bucket=s3_bucket)["KeyCount"] == 1


def test_refusals_happen_before_anything_is_sent(
    settings: Any, s3_client: Any, s3_bucket: str, redis_client: Any, queue_name: str,
    tmp_path: Path,
) -> None:  # fmt: skip
    good = write_tar(tmp_path / "g.tar", 64 * 1024)
    with pytest.raises(InvalidBatchId):
        transfer(settings, TransferRequest(good, "-rf"), progress_mode="none")
    empty = tmp_path / "e.tar"
    empty.write_bytes(b"")
    with pytest.raises(ArchiveRejected, match="empty"):
        transfer(settings, TransferRequest(empty, "e"), progress_mode="none")
    dead_redis = settings.replace(redis_url="redis://127.0.0.1:1/0")
    with pytest.raises(ServiceUnavailable, match=r"Redis at redis://127\.0\.0\.1:1/0"):
        transfer(dead_redis, TransferRequest(good, "g"), progress_mode="none")
    assert s3_client.list_objects_v2(Bucket=s3_bucket)["KeyCount"] == 0
    assert s3_client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []
    assert redis_client.llen(queue_name) == 0


def test_stop_interrupts_without_enqueueing(
    settings: Any, redis_client: Any, queue_name: str, tmp_path: Path
) -> None:
    path = write_tar(tmp_path / "s.tar", 12 * MiB)
    stop = threading.Event()
    stop.set()
    with pytest.raises(UploadInterrupted):
        transfer(
            settings, TransferRequest(path, "s1", part_size=5 * MiB), stop=stop,
            progress_mode="none",
        )  # fmt: skip
    assert redis_client.llen(queue_name) == 0


def test_kept_connections_check_the_ledger_over_one_postgres_connection(
    settings: Any, s3_client: Any, s3_bucket: str, database_url: str, tmp_path: Path
) -> None:
    """The watcher keeps one set of connections for many archives; the batch-id guard in the
    ledger must still refuse a different archive under a used id, and must not open a
    PostgreSQL connection (a server fork) per archive, which tiny batches paid."""
    from stagerd.db.ledger import Ledger
    from stagerd.db.schema import migrate
    from stagerd.errors import BatchIdReused
    from stagerd.transfer.upload import Connections

    migrate(database_url)
    used = write_tar(tmp_path / "used.tar", 64 * 1024)
    seed = Ledger(database_url)
    try:
        assert seed.begin("kept-0", "archives/kept-0.tar", worker="w", sha256="0" * 64, size=1)
    finally:
        seed.close()
    kept = Connections.open(settings, enqueue=False)
    assert kept.ledger is not None
    pids = set()
    try:
        for n in (1, 2, 3):
            path = write_tar(tmp_path / f"k{n}.tar", 64 * 1024, members=n)
            request = TransferRequest(path, f"kept-{n}", enqueue=False)
            transfer(settings, request, progress_mode="none", connections=kept)
            pids.add(_backend_pid(kept.ledger))
        with pytest.raises(BatchIdReused, match="ledger's batch is 1 bytes"):
            transfer(
                settings, TransferRequest(used, "kept-0", enqueue=False),
                progress_mode="none", connections=kept,
            )  # fmt: skip
        pids.add(_backend_pid(kept.ledger))
    finally:
        kept.close()
    assert len(pids) == 1 and None not in pids
    keys = {o["Key"] for o in s3_client.list_objects_v2(Bucket=s3_bucket)["Contents"]}
    assert "archives/kept-0.tar" not in keys and "archives/kept-3.tar" in keys


def _backend_pid(ledger: Any) -> int:
    """The PostgreSQL server process serving *ledger*'s connection (one per connection)."""
    return int(ledger._run("pid", lambda c: c.execute("SELECT pg_backend_pid()").fetchone()[0]))


def test_a_kept_ledger_survives_a_postgres_outage_between_archives(
    settings: Any, database_url: str, tmp_path: Path
) -> None:
    """The watcher's kept ledger connection is reset by an outage: the archive that meets it
    still goes up (an unreachable ledger is a warning, the S3 check still guards), and once
    PostgreSQL is back the next archive reconnects and the guard refuses again."""
    from dataclasses import replace

    from stagerd.db.ledger import Ledger
    from stagerd.db.schema import migrate
    from stagerd.errors import BatchIdReused
    from stagerd.transfer.upload import Connections
    from tests.tcpproxy import TcpProxy

    assert "@127.0.0.1:5432/" in database_url
    migrate(database_url)
    seed = Ledger(database_url)
    try:
        assert seed.begin("out-0", "archives/out-0.tar", worker="w", sha256="0" * 64, size=1)
    finally:
        seed.close()
    proxy = TcpProxy("127.0.0.1", 5432).start()
    proxied = replace(settings, database_url=database_url.replace(":5432/", f":{proxy.port}/"))
    kept = Connections.open(proxied, enqueue=False)
    assert kept.ledger is not None

    def send(name: str, batch: str, members: int = 1) -> Any:
        path = write_tar(tmp_path / name, 64 * 1024, members=members)
        request = TransferRequest(path, batch, enqueue=False)
        return transfer(proxied, request, progress_mode="none", connections=kept)

    try:
        assert send("a.tar", "out-1").bytes > 0
        before = _backend_pid(kept.ledger)
        proxy.stop()
        assert send("b.tar", "out-2", members=2).bytes > 0  # ledger down: uploaded anyway
        proxy.start()
        with pytest.raises(BatchIdReused, match="ledger's batch is 1 bytes"):
            send("c.tar", "out-0", members=3)
        assert _backend_pid(kept.ledger) != before  # a new connection after the reset
    finally:
        kept.close()
        proxy.stop()
