"""``stagerd gpu`` as a real process: end to end, usage errors, SIGTERM, systemd notify."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from stagerd.db import ledger as db
from stagerd.queue.keys import QueueKeys
from tests.faultproxy import FaultProxy
from tests.worker_support import (
    WAVINFO,
    make_tar,
    pending_ids,
    phases,
    put_batch,
    scratch_leftovers,
    start_worker,
    wait_for,
)


@pytest.mark.interop
def test_gpu_burst_end_to_end_and_db_results(
    run_cli: Any,
    stagerd_env: dict[str, str],
    s3_client: Any,
    s3_bucket: str,
    redis_client: Any,
    queue_name: str,
    scratch_dir: Path,
) -> None:
    for i in range(2):
        put_batch(s3_client, redis_client, s3_bucket, queue_name, f"e{i}", make_tar(files=3))
    result = run_cli(["gpu", "--burst", "--processor", WAVINFO], env=stagerd_env)
    assert result.returncode == 0, result.stderr
    shown = run_cli(["db", "results", "e1"], env=stagerd_env)
    assert shown.returncode == 0, shown.stderr
    data = json.loads(shown.stdout)
    assert data["state"] == "done" and data["file_count"] == 3
    assert sorted(r["item"] for r in data["results"]) == [f"clip-{i:03d}.wav" for i in range(3)]
    assert scratch_leftovers(scratch_dir) == []
    assert redis_client.llen(queue_name) == 0
    for secret in (stagerd_env["S3_SECRET_KEY"], stagerd_env["S3_ACCESS_KEY"]):
        assert secret not in result.stderr + result.stdout
    # Off a terminal (systemd), staging reports quiet JSON progress lines on stderr.
    progress = [
        json.loads(line)
        for line in result.stderr.splitlines()
        if line.startswith("{") and '"event": "progress"' in line
    ]
    finals = {p["label"]: p for p in progress if p.get("final")}
    assert set(finals) == {"stage e0", "stage e1"}
    assert all(p["percent"] == 100.0 and p["bytes"] == p["total"] for p in finals.values())


def test_usage_errors_exit_2_with_one_line(run_cli: Any, stagerd_env: dict[str, str]) -> None:
    cases = [
        (["gpu", "--burst"], "STAGERD_PROCESSOR"),
        (["gpu", "--processor", "true", "--processor-mode", "forever"], "--processor-mode"),
        (["gpu", "--processor", "true", "--drain-timeout", "soon"], "--drain-timeout"),
        (["gpu", "--processor", "true", "--prefetch", "-1"], "prefetch"),
    ]
    for args, needle in cases:
        result = run_cli(args, env=stagerd_env)
        assert result.returncode == 2, (args, result.stderr)
        assert needle in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_sigterm_drains_processing_and_notifies_systemd(
    stagerd_env: dict[str, str],
    s3_client: Any,
    s3_bucket: str,
    redis_client: Any,
    queue_name: str,
    database_url: str,
    scratch_dir: Path,
    tmp_path: Path,
) -> None:
    for i in range(2):
        put_batch(s3_client, redis_client, s3_bucket, queue_name, f"t{i}", make_tar())
    sock_path = str(tmp_path / "notify.sock")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(sock_path)
    notify.settimeout(1)
    messages: list[str] = []
    listening = threading.Event()
    listening.set()

    def listen() -> None:  # as systemd does: keep reading
        while listening.is_set():
            with contextlib.suppress(TimeoutError):
                messages.append(notify.recv(200).decode())

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    env = {**stagerd_env, "NOTIFY_SOCKET": sock_path, "STAGERD_PROCESSOR": f"{WAVINFO} --sleep 3"}
    proc = start_worker(env, "--drain-timeout", "30s", "--prefetch", "1")
    try:
        wait_for(lambda: messages, 30, "READY=1")
        assert messages[0].startswith("READY=1")
        worker = stagerd_env["STAGERD_WORKER_ID"]
        wait_for(
            lambda: phases(redis_client, queue_name, worker).get("t0") == "processing", 30, "t0"
        )
        wait_for(lambda: phases(redis_client, queue_name, worker).get("t1") == "staged", 30, "t1")
        proc.send_signal(signal.SIGTERM)
        # The prefetched batch goes back at once while t0 drains.
        wait_for(lambda: pending_ids(redis_client, queue_name) == ["t1"], 5, "t1 requeued")
        _out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-3000:]
    wait_for(lambda: "STOPPING=1" in messages, 5, "STOPPING=1")
    listening.clear()
    listener.join(5)
    notify.close()
    assert "WATCHDOG=1" in messages and "STOPPING=1" in messages, messages
    ledger = db.Ledger(database_url)
    try:
        assert ledger.batch("t0").state == "done"  # type: ignore[union-attr]
        assert ledger.batch("t1").state == "requeued"  # type: ignore[union-attr]
    finally:
        ledger.close()
    assert not redis_client.exists(QueueKeys(queue_name).heartbeat(worker))
    assert scratch_leftovers(scratch_dir) == []


def test_sigterm_while_staging_requeues_at_once(
    stagerd_env: dict[str, str],
    s3_server: Any,
    s3_client: Any,
    s3_bucket: str,
    redis_client: Any,
    queue_name: str,
    database_url: str,
    scratch_dir: Path,
) -> None:
    put_batch(s3_client, redis_client, s3_bucket, queue_name, "slow", make_tar(12, seconds=20))
    put_batch(s3_client, redis_client, s3_bucket, queue_name, "next", make_tar())
    with FaultProxy(s3_server.endpoint, throttle_down=500_000) as proxy:
        env = {**stagerd_env, "S3_ENDPOINT": proxy.endpoint, "STAGERD_PROCESSOR": WAVINFO}
        proc = start_worker(env, "--prefetch", "0")
        try:
            worker = stagerd_env["STAGERD_WORKER_ID"]
            wait_for(
                lambda: phases(redis_client, queue_name, worker).get("slow") == "staging",
                30,
                "staging",
            )
            time.sleep(0.5)
            proc.send_signal(signal.SIGTERM)
            started = time.monotonic()
            _out, err = proc.communicate(timeout=30)
            elapsed = time.monotonic() - started
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 0, err[-3000:]
    assert elapsed < 6, f"staging was not interrupted promptly ({elapsed:.1f}s)"
    assert pending_ids(redis_client, queue_name) == ["slow", "next"]
    ledger = db.Ledger(database_url)
    try:
        assert ledger.batch("slow").state == "requeued"  # type: ignore[union-attr]
    finally:
        ledger.close()
    assert scratch_leftovers(scratch_dir) == []


def test_persistent_processor_serves_every_batch_from_one_process(
    run_cli: Any,
    stagerd_env: dict[str, str],
    s3_client: Any,
    s3_bucket: str,
    redis_client: Any,
    queue_name: str,
    scratch_dir: Path,
) -> None:
    for i in range(3):
        put_batch(s3_client, redis_client, s3_bucket, queue_name, f"p{i}", make_tar(files=2))
    args = [
        "gpu",
        "--burst",
        "--processor-mode",
        "persistent",
        "--processor",
        f"{WAVINFO} --persistent",
    ]
    result = run_cli(args, env=stagerd_env)
    assert result.returncode == 0, result.stderr
    for i in range(3):
        data = json.loads(run_cli(["db", "results", f"p{i}"], env=stagerd_env).stdout)
        assert data["state"] == "done" and len(data["results"]) == 2
    # One model-loading process served all three batches: it announced itself once.
    assert result.stderr.count("persistent processor ready") == 1, result.stderr
    assert scratch_leftovers(scratch_dir) == []
