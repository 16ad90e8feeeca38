"""Bring up what the benchmark talks to: the local SeaweedFS (or a Swift endpoint), Redis,
PostgreSQL, via the project's idempotent ``build/services.sh``."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

from bench.context import ROOT, S3Target

SEAWEEDFS = S3Target("seaweedfs", "http://127.0.0.1:8333", "stagerd-dev", "stagerd-dev-secret")


def swift_target() -> S3Target:
    """Swift's s3api, from BENCH_SWIFT_* (defaults: the Swift all-in-one's test account)."""
    return S3Target(
        "swift",
        os.environ.get("BENCH_SWIFT_ENDPOINT", "http://127.0.0.1:8080"),
        os.environ.get("BENCH_SWIFT_ACCESS_KEY", "test:tester"),
        os.environ.get("BENCH_SWIFT_SECRET_KEY", "testing"),
    )


def reachable(url: str) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 80), 2):
            return True
    except OSError:
        return False


def ensure(target: S3Target) -> None:
    """Start SeaweedFS/Redis/PostgreSQL when they are not answering (no-op when they are).

    Raises RuntimeError naming what could not be reached; Swift is never started here.
    """
    wanted = ["redis", "postgres"] + (["seaweedfs"] if target.name == "seaweedfs" else [])
    env = {**os.environ, "STAGERD_VENV": os.environ.get("STAGERD_VENV", _venv())}
    proc = subprocess.run(
        [str(ROOT / "build" / "services.sh"), *wanted],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"build/services.sh {' '.join(wanted)} failed: {proc.stderr[-500:]}")
    if not reachable(target.endpoint):
        raise RuntimeError(f"S3 target {target.name} is not reachable at {target.endpoint}")


def _venv() -> str:
    return str(Path(sys.executable).parent.parent)
