"""The watcher: in-process scans against real services, and a real process with SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from stagerd.s3.partio import MiB
from stagerd.transfer.upload import TransferReport, TransferRequest, transfer
from stagerd.transfer.watch import Watcher, WatchOptions, ready_archives
from tests.conftest import base_env
from tests.faultproxy import FaultProxy
from tests.transfer_helpers import write_tar


def _watcher(settings: Any, directory: Path, **kw: Any) -> Watcher:
    def run(request: TransferRequest, stop: threading.Event) -> TransferReport:
        return transfer(settings, request, stop=stop, progress_mode="none")

    return Watcher(WatchOptions(directory=directory, **kw), run)


def test_ready_archives_ignores_partial_hidden_and_other_files(tmp_path: Path) -> None:
    (tmp_path / "b.tar").write_bytes(b"x")
    os.utime(tmp_path / "b.tar", (1, 1))
    (tmp_path / "a.tar").write_bytes(b"x")
    for name in ("c.tar.part", ".d.tar", "e.txt"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "done").mkdir()
    (tmp_path / "dir.tar").mkdir()
    (tmp_path / "link.tar").symlink_to(tmp_path / "a.tar")
    assert [p.name for p in ready_archives(tmp_path)] == ["b.tar", "a.tar"]  # oldest first


def test_scan_moves_successes_to_done_and_refusals_to_failed(
    settings: Any, s3_client: Any, s3_bucket: str, redis_client: Any, queue_name: str,
    tmp_path: Path,
) -> None:  # fmt: skip
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    write_tar(inbox / "ok-1.tar", 64 * 1024)
    bad = inbox / "bad.tar"
    bad.write_bytes((inbox / "ok-1.tar").read_bytes()[:5000])
    write_tar(inbox / "-x.tar", 1024)  # invalid batch id
    write_tar(inbox / "later.tar.part", 1024)
    reports = _watcher(settings, inbox).scan_once(threading.Event())
    assert [r.batch_id for r in reports] == ["ok-1"]
    assert sorted(p.name for p in (inbox / "done").iterdir()) == ["ok-1.tar"]
    failed = sorted(p.name for p in (inbox / "failed").iterdir())
    assert failed == ["-x.tar", "-x.tar.error", "bad.tar", "bad.tar.error"]
    assert "truncated" in (inbox / "failed" / "bad.tar.error").read_text()
    assert "batch id" in (inbox / "failed" / "-x.tar.error").read_text()
    assert (inbox / "later.tar.part").exists()
    (raw,) = redis_client.lrange(queue_name, 0, -1)
    assert json.loads(raw)["batch_id"] == "ok-1"
    assert s3_client.head_object(Bucket=s3_bucket, Key="archives/ok-1.tar")["ContentLength"] > 0


def test_delete_after(settings: Any, tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    write_tar(inbox / "d1.tar", 1024)
    reports = _watcher(settings, inbox, delete_after=True).scan_once(threading.Event())
    assert [r.batch_id for r in reports] == ["d1"]
    assert list(inbox.iterdir()) == []


def test_infrastructure_failure_leaves_the_file_and_backs_off(
    settings: Any, tmp_path: Path
) -> None:
    write_tar(tmp_path / "w1.tar", 1024)
    clock = [1000.0]
    calls: list[str] = []
    dead = settings.replace(redis_url="redis://127.0.0.1:1/0")

    def run(request: TransferRequest, stop: threading.Event) -> TransferReport:
        calls.append(request.batch_id)
        return transfer(dead, request, stop=stop, progress_mode="none")

    watcher = Watcher(
        WatchOptions(directory=tmp_path, retry_delays=(30.0,)), run, clock=lambda: clock[0]
    )
    assert watcher.scan_once(threading.Event()) == []
    assert (tmp_path / "w1.tar").exists() and not (tmp_path / "failed").exists()
    watcher.scan_once(threading.Event())  # inside the back-off: not retried
    assert calls == ["w1"]
    clock[0] += 31
    watcher.scan_once(threading.Event())
    assert calls == ["w1", "w1"]


def test_loop_returns_when_stop_is_set(settings: Any, tmp_path: Path) -> None:
    stop = threading.Event()
    thread = threading.Thread(target=_watcher(settings, tmp_path, interval=0.05).loop, args=(stop,))
    thread.start()
    time.sleep(0.2)
    stop.set()
    thread.join(timeout=5)
    assert not thread.is_alive()


def test_sigterm_stops_cleanly_and_restart_resumes(
    stagerd_env: dict[str, str], s3_client: Any, s3_bucket: str, redis_client: Any,
    queue_name: str, tmp_path: Path,
) -> None:  # fmt: skip
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    path = write_tar(inbox / "big.tar.part", 40 * MiB)
    path.rename(inbox / "big.tar")
    args = [sys.executable, "-m", "stagerd", "transfer", "watch", str(inbox), "--interval",
            "0.1", "--part-size", "5MiB", "--concurrency", "2"]  # fmt: skip
    with FaultProxy(stagerd_env["S3_ENDPOINT"], throttle_up=10 * MiB) as proxy:
        env = {**base_env(), **stagerd_env, "S3_ENDPOINT": proxy.endpoint}
        proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        _wait_for_parts(s3_client, s3_bucket, at_least=2)
        stopped_at = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert time.monotonic() - stopped_at < 10
    assert (inbox / "big.tar").exists() and redis_client.llen(queue_name) == 0
    (upload,) = s3_client.list_multipart_uploads(Bucket=s3_bucket)["Uploads"]
    assert upload["Key"] == "archives/big.tar"

    env = {**base_env(), **stagerd_env}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 90
    while not (inbox / "done" / "big.tar").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert (inbox / "done" / "big.tar").exists()
    reports = [json.loads(line) for line in err.decode().splitlines() if '"transferred ' in line]
    assert len(reports) == 1 and reports[0]["resumed_bytes"] >= 2 * 5 * MiB
    assert redis_client.llen(queue_name) == 1


def _wait_for_parts(client: Any, bucket: str, *, at_least: int) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for upload in client.list_multipart_uploads(Bucket=bucket).get("Uploads", []):
            parts = client.list_parts(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
            if len(parts.get("Parts", [])) >= at_least:
                return
        time.sleep(0.05)
    raise AssertionError("the upload never got going")
