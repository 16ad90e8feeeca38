"""Helpers for the worker tests: real batches on real S3, jobs on real Redis, polling with
deadlines. A slow S3 link (phase-precise kills, prefetch) is tests/faultproxy.py's
``FaultProxy(endpoint, throttle_down=bytes_per_s)``."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import tarfile
import time
import wave
from collections.abc import Callable
from pathlib import Path
from typing import Any

from stagerd.job import Job
from stagerd.queue.keys import QueueKeys

ROOT = Path(__file__).resolve().parent.parent
# The processor child gets a scrubbed copy of the worker's environment; pin PYTHONPATH so
# it runs this checkout's sample processor, not whatever stagerd the venv resolves to.
WAVINFO = f"env PYTHONPATH={ROOT} {sys.executable} -m stagerd.samples.wavinfo"


def wav(seconds: float, rate: int = 8000) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(b"\x01\x00" * int(seconds * rate))
    return buf.getvalue()


def make_tar(files: int = 3, seconds: float = 0.1) -> bytes:
    """A tar of *files* small WAVs named ``clip-NNN.wav``."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for i in range(files):
            data = wav(seconds + i * 0.01)
            info = tarfile.TarInfo(f"clip-{i:03d}.wav")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def put_batch(
    s3: Any,
    redis: Any,
    bucket: str,
    queue: str,
    batch_id: str,
    body: bytes,
    *,
    sha256: str | None = None,
    enqueue: bool = True,
) -> Job:
    """Upload *body* as ``archives/{batch_id}.tar`` and RPUSH its job (seed payload + ours)."""
    s3.put_object(Bucket=bucket, Key=f"archives/{batch_id}.tar", Body=body)
    job = Job.new(batch_id, size=len(body), sha256=sha256 or hashlib.sha256(body).hexdigest())
    if enqueue:
        redis.rpush(queue, job.to_json())
    return job


def wait_for(
    predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05
) -> Any:
    """Poll *predicate* until truthy (returned) or fail after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def phases(redis: Any, queue: str, worker: str) -> dict[str, str]:
    """batch id -> phase, as the worker publishes it for ``stagerd status``."""
    raw = redis.hgetall(QueueKeys(queue).phase(worker))
    return {k.decode(): json.loads(v)["phase"] for k, v in raw.items()}


def pending_ids(redis: Any, queue: str) -> list[str]:
    return [json.loads(raw)["batch_id"] for raw in redis.lrange(queue, 0, -1)]


def dead_letters(redis: Any, queue: str) -> list[dict[str, Any]]:
    return [json.loads(raw) for raw in redis.lrange(QueueKeys(queue).dead, 0, -1)]


def scratch_leftovers(scratch: Path) -> list[str]:
    """Everything on scratch except the manager's hidden bookkeeping."""
    return sorted(p.name for p in scratch.iterdir() if p.name != ".stagerd")


def start_worker(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    """``python -m stagerd gpu ARGS`` as a real process (stderr captured for asserts)."""
    from tests.conftest import base_env

    return subprocess.Popen(
        [sys.executable, "-m", "stagerd", "--log-json", "gpu", *args],
        env={**base_env(), **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
