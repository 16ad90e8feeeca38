"""``stagerd transfer upload`` as a real process against SeaweedFS and Redis."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from stagerd.s3.partio import MiB
from tests.conftest import base_env
from tests.faultproxy import FaultProxy, Head
from tests.transfer_helpers import write_tar

KEYS = {"batch_id", "s3_key", "bytes", "sha256", "parts", "part_size", "uploaded_bytes",
        "resumed_bytes", "enqueued", "seconds"}  # fmt: skip


def _upload(run_cli: Any, env: dict[str, str], path: Path, batch: str, *extra: str) -> Any:
    return run_cli(["transfer", "upload", str(path), "--batch-id", batch, *extra], env=env)


def _json(result: Any) -> dict[str, Any]:
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, result.stdout  # exactly one JSON object on stdout
    data: dict[str, Any] = json.loads(lines[0])
    assert data.keys() >= KEYS
    return data


def _queue(redis_client: Any, queue_name: str) -> list[dict[str, Any]]:
    return [json.loads(raw) for raw in redis_client.lrange(queue_name, 0, -1)]


def _upload_part(head: Head) -> bool:
    return head.method == "PUT" and "partNumber=" in head.target


def _spawn(args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "stagerd", *args],
        env={**base_env(), **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.interop
def test_upload_enqueues_once_and_force_redoes_it(
    run_cli: Any, stagerd_env: dict[str, str], s3_client: Any, s3_bucket: str,
    redis_client: Any, queue_name: str, tmp_path: Path,
) -> None:  # fmt: skip
    path = write_tar(tmp_path / "b1.tar", 12 * MiB, members=3)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    first = _json(_upload(run_cli, stagerd_env, path, "b1", "--part-size", "5MiB"))
    assert first["s3_key"] == "archives/b1.tar" and first["enqueued"] is True
    assert first["sha256"] == digest and first["bytes"] == path.stat().st_size
    assert first["parts"] == 3 and first["uploaded_bytes"] == first["bytes"]
    body = s3_client.get_object(Bucket=s3_bucket, Key="archives/b1.tar")["Body"].read()
    assert body == path.read_bytes()
    (job,) = _queue(redis_client, queue_name)
    assert job["batch_id"] == "b1" and job["s3_key"] == "archives/b1.tar"
    assert job["file_count"] == 3 and job["sha256"] == digest and job["size"] == first["bytes"]
    assert job["transferred_at"].endswith("+00:00")

    again = _json(_upload(run_cli, stagerd_env, path, "b1", "--part-size", "5MiB"))
    assert again["uploaded_bytes"] == 0 and again["enqueued"] is False
    assert again["resumed_bytes"] == again["bytes"]
    assert len(_queue(redis_client, queue_name)) == 1

    forced = _json(_upload(run_cli, stagerd_env, path, "b1", "--force", "--file-count", "7"))
    assert forced["enqueued"] is True and forced["uploaded_bytes"] == forced["bytes"]
    assert [j["file_count"] for j in _queue(redis_client, queue_name)] == [3, 7]


def test_no_enqueue_uploads_only(
    run_cli: Any, stagerd_env: dict[str, str], redis_client: Any, queue_name: str, tmp_path: Path
) -> None:
    path = write_tar(tmp_path / "b.tar", 1 * MiB)
    data = _json(_upload(run_cli, stagerd_env, path, "b2", "--no-enqueue"))
    assert data["enqueued"] is False and data["uploaded_bytes"] == data["bytes"]
    assert _queue(redis_client, queue_name) == []


def test_concurrent_runs_enqueue_once(
    stagerd_env: dict[str, str], redis_client: Any, queue_name: str, tmp_path: Path
) -> None:
    path = write_tar(tmp_path / "c.tar", 16 * MiB)
    args = ["transfer", "upload", str(path), "--batch-id", "c1", "--part-size", "5MiB"]
    procs = [_spawn(args, stagerd_env) for _ in range(3)]
    outputs = [p.communicate(timeout=120) for p in procs]
    results = []
    for proc, (out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err
        results.append(json.loads(out))
    assert sorted(r["enqueued"] for r in results) == [False, False, True]
    assert len(_queue(redis_client, queue_name)) == 1


def test_second_run_completing_the_upload_first_is_accepted(
    stagerd_env: dict[str, str], s3_client: Any, s3_bucket: str, redis_client: Any,
    queue_name: str, tmp_path: Path,
) -> None:  # fmt: skip
    path = write_tar(tmp_path / "two.tar", 25 * MiB)
    args = ["transfer", "upload", str(path), "--batch-id", "two", "--part-size", "5MiB",
            "--concurrency", "1"]  # fmt: skip
    with FaultProxy(stagerd_env["S3_ENDPOINT"], throttle_up=5 * MiB) as proxy:
        slow = _spawn(args, {**stagerd_env, "S3_ENDPOINT": proxy.endpoint})
        _wait_for_parts(s3_client, s3_bucket, "archives/two.tar", at_least=2)
        fast = _spawn(args, stagerd_env)  # resumes the slow run's upload and completes it
        fast_out, fast_err = fast.communicate(timeout=120)
        slow_out, slow_err = slow.communicate(timeout=120)
    assert fast.returncode == 0, fast_err
    assert slow.returncode == 0, slow_err
    # Which path the slow run takes depends on the server (AWS/Swift forget a completed
    # upload, so it sees NoSuchUpload and verifies the object; SeaweedFS still accepts parts).
    fast_json, slow_json = json.loads(fast_out), json.loads(slow_out)
    assert fast_json["resumed_bytes"] >= 2 * 5 * MiB
    assert [fast_json["enqueued"], slow_json["enqueued"]].count(True) == 1
    body = s3_client.get_object(Bucket=s3_bucket, Key="archives/two.tar")["Body"].read()
    assert body == path.read_bytes()
    assert len(_queue(redis_client, queue_name)) == 1


@pytest.mark.interop
def test_resume_after_sigkill_resends_at_most_missing_plus_in_flight(
    run_cli: Any, stagerd_env: dict[str, str], s3_client: Any, s3_bucket: str,
    redis_client: Any, queue_name: str, tmp_path: Path,
) -> None:  # fmt: skip
    part, concurrency = 5 * MiB, 2
    path = write_tar(tmp_path / "k.tar", 60 * MiB, members=6)
    size = path.stat().st_size
    args = ["transfer", "upload", str(path), "--batch-id", "k1", "--part-size", "5MiB",
            "--concurrency", str(concurrency)]  # fmt: skip
    # Throttle the first run so it is surely killed in the middle of its parts.
    with FaultProxy(stagerd_env["S3_ENDPOINT"], throttle_up=15 * MiB) as proxy:
        proc = _spawn(args, {**stagerd_env, "S3_ENDPOINT": proxy.endpoint})
        listed = _wait_for_parts(s3_client, s3_bucket, "archives/k1.tar", at_least=3)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    listed_bytes = _listed_bytes(s3_client, s3_bucket, "archives/k1.tar")
    assert listed_bytes >= listed * part and listed_bytes < size
    assert _queue(redis_client, queue_name) == []  # nothing half-done is enqueued

    data = _json(run_cli(args, env=stagerd_env))
    assert data["resumed_bytes"] >= listed_bytes
    assert data["uploaded_bytes"] <= size - listed_bytes + concurrency * part
    assert data["uploaded_bytes"] + data["resumed_bytes"] == size
    assert data["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    body = s3_client.get_object(Bucket=s3_bucket, Key="archives/k1.tar")["Body"].read()
    assert body == path.read_bytes()
    assert s3_client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []
    assert len(_queue(redis_client, queue_name)) == 1


def test_changed_file_after_crash_restarts_clean(
    run_cli: Any, stagerd_env: dict[str, str], s3_client: Any, s3_bucket: str, tmp_path: Path
) -> None:
    path = write_tar(tmp_path / "ch.tar", 30 * MiB, members=3)
    args = ["transfer", "upload", str(path), "--batch-id", "ch", "--part-size", "5MiB",
            "--concurrency", "1"]  # fmt: skip
    with FaultProxy(stagerd_env["S3_ENDPOINT"], throttle_up=10 * MiB) as proxy:
        proc = _spawn(args, {**stagerd_env, "S3_ENDPOINT": proxy.endpoint})
        _wait_for_parts(s3_client, s3_bucket, "archives/ch.tar", at_least=2)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    write_tar(path, 30 * MiB, members=3)  # same size, new bytes
    data = _json(run_cli(args, env=stagerd_env))
    assert data["resumed_bytes"] == 0 and data["uploaded_bytes"] == data["bytes"]
    body = s3_client.get_object(Bucket=s3_bucket, Key="archives/ch.tar")["Body"].read()
    assert body == path.read_bytes()
    assert s3_client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []


def test_injected_resets_and_503_are_retried(
    run_cli: Any, stagerd_env: dict[str, str], s3_client: Any, s3_bucket: str, tmp_path: Path
) -> None:
    path = write_tar(tmp_path / "r.tar", 16 * MiB)
    with FaultProxy(stagerd_env["S3_ENDPOINT"]) as proxy:
        proxy.fail_first(2, "reset_request", _upload_part)
        proxy.fail_first(2, "slowdown", _upload_part)
        env = {**stagerd_env, "S3_ENDPOINT": proxy.endpoint}
        data = _json(_upload(run_cli, env, path, "r1", "--part-size", "5MiB"))
    assert proxy.stats().injected == {"reset_request": 2, "slowdown": 2}
    body = s3_client.get_object(Bucket=s3_bucket, Key="archives/r1.tar")["Body"].read()
    assert body == path.read_bytes() and data["uploaded_bytes"] == data["bytes"]


def test_peak_rss_stays_bounded_with_default_parts(
    stagerd_env: dict[str, str], tmp_path: Path
) -> None:
    path = write_tar(tmp_path / "big.tar", 300 * MiB, members=4)
    # A wrapper process so RUSAGE_CHILDREN measures exactly the stagerd child.
    code = (
        "import resource, subprocess, sys\n"
        "r = subprocess.run([sys.executable, '-m', 'stagerd', 'transfer', 'upload', sys.argv[1],"
        " '--batch-id', 'big', '--no-enqueue'], capture_output=True, text=True)\n"
        "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
        "print(r.stdout.strip()); print(r.stderr[-2000:], file=sys.stderr)\n"
    )
    env = {**base_env(), **stagerd_env}
    out = subprocess.run(
        [sys.executable, "-c", code, str(path)], env=env, capture_output=True, text=True,
        timeout=240,
    )  # fmt: skip
    first, report = out.stdout.splitlines()[:2]
    rc, maxrss_kib = (int(x) for x in first.split())
    assert rc == 0, out.stderr
    data = json.loads(report)
    assert data["part_size"] == 64 * MiB and data["parts"] == 5
    print(f"peak RSS of the upload: {maxrss_kib / 1024:.0f} MiB")
    assert maxrss_kib * 1024 < 200 * 1000 * 1000, f"peak RSS {maxrss_kib} KiB"


def test_bad_input_and_unreachable_services(
    run_cli: Any, stagerd_env: dict[str, str], s3_client: Any, s3_bucket: str,
    redis_client: Any, queue_name: str, tmp_path: Path,
) -> None:  # fmt: skip
    good = write_tar(tmp_path / "g.tar", 64 * 1024)
    truncated = tmp_path / "t.tar"
    truncated.write_bytes(good.read_bytes()[:40000])
    cases: list[tuple[list[str], dict[str, str], int, str]] = [
        ([str(good), "--batch-id", "../etc"], {}, 2, "'..'"),
        ([str(good), "--batch-id", "a/b"], {}, 2, "invalid"),
        ([str(good), "--batch-id", "x" * 129], {}, 2, "at most 128"),
        ([str(tmp_path / "missing.tar"), "--batch-id", "m"], {}, 1, "missing.tar"),
        ([str(tmp_path), "--batch-id", "d"], {}, 1, "not a regular file"),
        ([str(truncated), "--batch-id", "t"], {}, 1, "truncated"),
        ([str(good), "--batch-id", "g", "--part-size", "1KiB"], {}, 2, "--part-size"),
        ([str(good), "--batch-id", "g"], {"REDIS_URL": "redis://127.0.0.1:1/0"}, 1, "Redis"),
        (
            [str(good), "--batch-id", "g"],
            {"S3_ENDPOINT": "http://127.0.0.1:1", "STAGERD_S3_MAX_ATTEMPTS": "1"},
            1,
            "S3 endpoint http://127.0.0.1:1 unreachable",
        ),
        ([str(good), "--batch-id", "g"], {"S3_SECRET_KEY": "wrong-secret-xyz"}, 1, s3_bucket),
        ([str(good), "--batch-id", "g"], {"S3_BUCKET": f"{s3_bucket}-nope"}, 1, "does not exist"),
    ]
    for args, extra, code, needle in cases:
        result = run_cli(["transfer", "upload", *args], env={**stagerd_env, **extra}, timeout=90)
        assert result.returncode == code, (args, extra, result.stderr)
        assert needle in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr and result.stdout == ""
        assert "wrong-secret" not in result.stderr and stagerd_env["S3_SECRET_KEY"] not in (
            result.stderr
        )
    assert s3_client.list_objects_v2(Bucket=s3_bucket).get("KeyCount", 0) == 0
    assert s3_client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []
    assert _queue(redis_client, queue_name) == []


def _wait_for_parts(client: Any, bucket: str, key: str, *, at_least: int) -> int:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        uploads = client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
        for upload in uploads:
            parts = client.list_parts(Bucket=bucket, Key=key, UploadId=upload["UploadId"])
            if len(parts.get("Parts", [])) >= at_least:
                return len(parts["Parts"])
        time.sleep(0.05)
    raise AssertionError(f"no upload reached {at_least} parts")


def _listed_bytes(client: Any, bucket: str, key: str) -> int:
    (upload,) = client.list_multipart_uploads(Bucket=bucket)["Uploads"]
    parts = client.list_parts(Bucket=bucket, Key=key, UploadId=upload["UploadId"])
    return sum(p["Size"] for p in parts.get("Parts", []))
