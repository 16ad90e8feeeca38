"""Everything a scenario needs to know about this run: sizes, the S3 target, paths, env.

One frozen :class:`BenchContext` is built by ``bench.run`` and handed to every scenario.
Sizes come in two profiles: the full one the issue asks for, and ``--quick`` (small enough
for the test suite, big enough that every code path runs: several parts, several members).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# The stagerd checkout under test (default: this one). Pointing it elsewhere measures another
# branch's code with this harness; children then write no bytecode into that tree.
STAGERD_ROOT = Path(os.environ.get("BENCH_STAGERD_ROOT", str(ROOT))).resolve()
MiB = 1024**2
GiB = 1024**3


@dataclass(frozen=True)
class Sizes:
    big_archive: int  # the "2 GiB archive"
    member: int  # "16 MiB WAV-sized members"
    small_files: int  # the "10,000-file archive"
    small_file_bytes: int
    resume_archive: int
    resume_part: int
    tiny_batches: int  # "200 tiny batches"
    janitor_dirs: int  # "10,000 stale and 10,000 locked dirs"
    startup_runs: int
    prefetch_batches: int
    prefetch_archive: int  # sets the staging time; processing time is then k x measured staging
    result_rows: int = 1_000_000  # "RSS < 200 MB for a 1,000,000-row results file"


FULL = Sizes(
    big_archive=2 * GiB,
    member=16 * MiB,
    small_files=10_000,
    small_file_bytes=4096,
    resume_archive=2 * GiB,
    resume_part=64 * MiB,
    tiny_batches=200,
    janitor_dirs=10_000,
    startup_runs=20,
    prefetch_batches=5,
    prefetch_archive=128 * MiB,
)
QUICK = Sizes(
    big_archive=24 * MiB,
    member=4 * MiB,
    small_files=300,
    small_file_bytes=2048,
    resume_archive=48 * MiB,
    resume_part=5 * MiB,  # S3's minimum part: the most parts for the fewest bytes
    tiny_batches=10,
    janitor_dirs=300,
    startup_runs=3,
    prefetch_batches=2,
    prefetch_archive=8 * MiB,
    result_rows=20_000,
)


@dataclass(frozen=True)
class S3Target:
    name: str  # "seaweedfs" | "swift"
    endpoint: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"


@dataclass(frozen=True)
class BenchContext:
    quick: bool
    rounds: int
    sizes: Sizes
    s3: S3Target
    redis_url: str
    database_url: str
    work: Path  # bench/work: generated data (kept between runs) and per-run scratch
    python: str = sys.executable
    server_pids: tuple[int, ...] = ()  # the S3 server's processes (their CPU is reported)
    profile_dir: Path | None = None  # --profile: py-spy one extra stagerd run per scenario
    scale: bool = False  # --scale: the scale set (bench/scenarios/scale.py)

    @property
    def data_dir(self) -> Path:
        return self.work / "data"

    def fresh_dir(self, name: str) -> Path:
        """An empty directory under work/runs (removed first if it exists)."""
        path = self.work / "runs" / name
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path

    def s3_client(self) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.s3.endpoint,
            aws_access_key_id=self.s3.access_key,
            aws_secret_access_key=self.s3.secret_key,
            region_name=self.s3.region,
            config=Config(
                signature_version="s3v4",
                s3={"addressing_style": "path"},
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
                max_pool_connections=20,
            ),
        )

    @contextmanager
    def bucket(self, prefix: str) -> Iterator[str]:
        """A fresh bucket, emptied and deleted afterwards.

        Deleting the bucket (SeaweedFS drops the whole collection) is what returns the disk:
        deleted objects would otherwise wait for a vacuum, and a full run writes ~40 GiB.
        """
        name = f"bench-{prefix}-{uuid.uuid4().hex[:8]}"
        client = self.s3_client()
        client.create_bucket(Bucket=name)
        try:
            yield name
        finally:
            empty_bucket(client, name)
            client.delete_bucket(Bucket=name)

    def base_env(self) -> dict[str, str]:
        """A clean child environment: no inherited S3/stagerd settings."""
        keep = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR")
        env = {k: v for k, v in os.environ.items() if k in keep}
        env["PYTHONPATH"] = f"{STAGERD_ROOT}:{ROOT}" if STAGERD_ROOT != ROOT else str(ROOT)
        env["PYTHONUNBUFFERED"] = "1"
        if STAGERD_ROOT != ROOT:
            env["PYTHONDONTWRITEBYTECODE"] = "1"
        return env

    def aws_env(self) -> dict[str, str]:
        """What s5cmd (and any AWS SDK) reads for credentials."""
        return {
            **self.base_env(),
            "AWS_ACCESS_KEY_ID": self.s3.access_key,
            "AWS_SECRET_ACCESS_KEY": self.s3.secret_key,
            "AWS_REGION": self.s3.region,
        }

    def stagerd_env(self, bucket: str, scratch: Path, **extra: str) -> dict[str, str]:
        """A stagerd process wired to *bucket*, the bench Redis/PostgreSQL and *scratch*."""
        env_file = self.work / "empty.env"
        env_file.parent.mkdir(parents=True, exist_ok=True)
        env_file.write_text("# bench: keep /etc/stagerd/stagerd.env out\n")
        return {
            **self.base_env(),
            "S3_ENDPOINT": self.s3.endpoint,
            "S3_ACCESS_KEY": self.s3.access_key,
            "S3_SECRET_KEY": self.s3.secret_key,
            "S3_BUCKET": bucket,
            "S3_REGION": self.s3.region,
            "REDIS_URL": self.redis_url,
            "DATABASE_URL": self.database_url,
            "STAGERD_SCRATCH_DIR": str(scratch),
            "STAGERD_SCRATCH_BUDGET": "8GiB",
            "STAGERD_SCRATCH_HEADROOM": "64MiB",
            "STAGERD_ENV_FILE": str(env_file),
            "STAGERD_LOG_LEVEL": "warning",
            **extra,
        }

    def stagerd(self, *args: str) -> list[str]:
        return [self.python, "-m", "stagerd", *args]


def empty_bucket(client: Any, bucket: str) -> None:
    """Abort multipart uploads and delete every object of *bucket*."""
    for upload in client.list_multipart_uploads(Bucket=bucket).get("Uploads", []):
        client.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            client.delete_object(Bucket=bucket, Key=obj["Key"])


def stagerd_has(*modules: str) -> str | None:
    """None when every ``stagerd.<module>`` exists in this checkout, else why not.

    The commands land on ``main`` one by one; a scenario whose stagerd side is missing still
    measures its peers and says what it is waiting for.
    """

    def present(module: str) -> bool:
        path = STAGERD_ROOT / "stagerd" / module.replace(".", "/")
        return path.with_suffix(".py").exists() or (path / "__init__.py").exists()

    missing = [m for m in modules if not present(m)]
    return f"stagerd.{', stagerd.'.join(missing)} not in this checkout yet" if missing else None


def sync_disks(ctx: BenchContext) -> None:
    """Flush dirty pages between runs so one run's writeback is not billed to the next.

    Skipped in --quick: a smoke run measures nothing seriously, and ``sync`` waits for every
    other tenant's writes too.
    """
    if not ctx.quick:
        subprocess.run(["sync"], check=False)
