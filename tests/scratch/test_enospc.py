"""Disk full (ENOSPC) during extraction in the real worker (issue 8).

Scratch lives on a small tmpfs of its own; staging is slowed by a throttling proxy so the
test can fill the tmpfs with a hog file while the batch is being extracted. The worker must
record the ENOSPC reason (ledger failure history), clean the batch's scratch dir, stay
alive and put the job back for a later attempt; once the hog is removed the batch
completes. Needs root (mount); skipped with the reason when mounting is not permitted.
"""

from __future__ import annotations

import contextlib
import errno
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from stagerd.db import ledger as db
from stagerd.queue.keys import QueueKeys
from tests.faultproxy import FaultProxy
from tests.worker_support import (
    WAVINFO,
    dead_letters,
    make_tar,
    put_batch,
    scratch_leftovers,
    start_worker,
    wait_for,
)

FILES = 12
RATE = 1_000_000  # ~3.8 MB batch: ~4 s of staging, time enough to fill the disk mid-way


@pytest.fixture
def small_scratch(tmp_path: Path) -> Iterator[Path]:
    """A 32 MiB tmpfs mounted for this test (unmounted afterwards)."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs for scratch (needs root): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(path: Path) -> int:
    """Write zeros to *path* until the file system is full; returns the bytes written."""
    written = 0
    chunk = bytes(1024 * 1024)
    with path.open("wb", buffering=0) as out:
        while True:
            try:
                written += out.write(chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                break
    # Top up the last few KiB too, so the next write of the extractor cannot fit.
    with path.open("ab", buffering=0) as out, contextlib.suppress(OSError):
        while out.write(bytes(4096)):
            written += 4096
    return written


def _failures(database_url: str, batch: str) -> list[Any]:
    ledger = db.Ledger(database_url)
    try:
        return [f for f in ledger.recent_failures(limit=50) if f.batch_id == batch]
    finally:
        ledger.close()


def test_disk_full_during_extraction_is_retried_after_space_returns(
    stagerd_env: dict[str, str],
    s3_server: Any,
    s3_client: Any,
    s3_bucket: str,
    redis_client: Any,
    queue_name: str,
    database_url: str,
    small_scratch: Path,
) -> None:
    put_batch(s3_client, redis_client, s3_bucket, queue_name, "e1", make_tar(FILES, seconds=20))
    env = {
        **stagerd_env,
        "STAGERD_SCRATCH_DIR": str(small_scratch),
        "STAGERD_SCRATCH_BUDGET": "24MiB",
        "STAGERD_SCRATCH_HEADROOM": "1MiB",
        "STAGERD_PROCESSOR": WAVINFO,
        "STAGERD_MAX_ATTEMPTS": "5",
        "STAGERD_HEARTBEAT_TTL": "2s",
    }
    hog = small_scratch / "hog"
    keys = QueueKeys(queue_name)
    with FaultProxy(s3_server.endpoint, throttle_down=RATE) as proxy:
        worker = start_worker({**env, "S3_ENDPOINT": proxy.endpoint}, "--prefetch", "0")
        try:
            inputs = small_scratch / "e1" / "input"
            wait_for(lambda: inputs.is_dir() and any(inputs.iterdir()), 30, "extraction")
            _fill(hog)
            found = wait_for(lambda: _failures(database_url, "e1"), 30, "the ENOSPC failure")
            reason = found[0].error
            assert "disk full" in reason and "No space left" in reason, reason
            assert found[0].phase == "staging" and found[0].outcome == "requeued", found[0]
            # Scratch cleaned (only the hog is left), the worker alive, the job kept.
            wait_for(lambda: not (small_scratch / "e1").exists(), 15, "e1 cleaned")
            assert scratch_leftovers(small_scratch) == ["hog"]
            assert worker.poll() is None
            assert dead_letters(redis_client, queue_name) == []
            in_queue = redis_client.llen(keys.pending) + redis_client.llen(
                keys.processing(env["STAGERD_WORKER_ID"])
            )
            assert in_queue == 1  # waiting for space (pending or held by the worker)

            hog.unlink()  # space is back: the retry goes through
            wait_for(lambda: _done(database_url, "e1"), 60, "e1 done after the retry")
            assert worker.poll() is None
        finally:
            worker.send_signal(signal.SIGTERM)
            _out, err = worker.communicate(timeout=30)
    assert worker.returncode == 0, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    ledger = db.Ledger(database_url)
    try:
        row = ledger.batch("e1")
        assert row is not None and row.state == "done" and row.attempts == 2, row
        assert len(ledger.results("e1")) == FILES
    finally:
        ledger.close()
    assert dead_letters(redis_client, queue_name) == []
    assert redis_client.llen(keys.pending) == 0
    assert scratch_leftovers(small_scratch) == []


def _done(database_url: str, batch: str) -> bool:
    ledger = db.Ledger(database_url)
    try:
        row = ledger.batch(batch)
        return row is not None and row.state == "done"
    finally:
        ledger.close()
