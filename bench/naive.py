"""The seed's naive flow, as a peer: boto3 ``upload_file`` / ``download_file`` + ``extractall``.

Exactly what the storage guide's interface code does, plus the obvious loop around it for the
tiny-batch scenario (RPUSH/BLPOP, a subprocess per batch, one INSERT per batch). Run as
``python -m bench.naive upload PATH KEY`` | ``stage KEY DEST`` | ``produce DIR QUEUE`` |
``consume N QUEUE PROCESSOR``; S3 comes from the seed's variables, Redis from ``REDIS_URL``,
PostgreSQL from ``DATABASE_URL``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any


def get_s3_client() -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=os.environ["S3_ENDPOINT"],
        aws_access_key_id=os.environ["S3_ACCESS_KEY"],
        aws_secret_access_key=os.environ["S3_SECRET_KEY"],
        region_name="us-east-1",
        config=Config(
            signature_version="s3v4",
            s3={"addressing_style": "path"},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        ),
    )


def upload(path: str, key: str) -> None:
    get_s3_client().upload_file(path, os.environ["S3_BUCKET"], key)


def stage(key: str, dest: str, client: Any = None) -> Path:
    """download_archive() then extractall(): the archive and its members coexist on scratch."""
    batch_dir = Path(dest)
    batch_dir.mkdir(parents=True, exist_ok=True)
    archive = batch_dir / "archive.tar"
    (client or get_s3_client()).download_file(os.environ["S3_BUCKET"], key, str(archive))
    with tarfile.open(archive) as tar:
        tar.extractall(batch_dir / "input")  # the seed's unfiltered extraction
    return batch_dir


def produce(src: str, queue: str, count: int) -> None:
    """Watch *src*: upload + RPUSH every ``*.tar`` that appears, until *count* were sent."""
    import redis

    client, r = get_s3_client(), redis.Redis.from_url(os.environ["REDIS_URL"])
    sent = 0
    while sent < count:
        found = sorted(Path(src).glob("*.tar"))
        if not found:
            time.sleep(0.05)
        sent += len(found)
        for path in found:
            _produce_one(client, r, path, queue)


def _produce_one(client: Any, r: Any, path: Path, queue: str) -> None:
    key = f"archives/{path.stem}.tar"
    client.upload_file(str(path), os.environ["S3_BUCKET"], key)
    job = {
        "batch_id": path.stem,
        "s3_key": key,
        "file_count": None,
        "transferred_at": datetime.now(timezone.utc).isoformat(),
    }
    r.rpush(queue, json.dumps(job))
    path.unlink()


def consume(count: int, queue: str, processor: str, scratch: str) -> None:
    import psycopg
    import redis

    client, r = get_s3_client(), redis.Redis.from_url(os.environ["REDIS_URL"])
    with psycopg.connect(os.environ["DATABASE_URL"], autocommit=True) as db:
        db.execute("CREATE TABLE IF NOT EXISTS naive_batches (batch_id text PRIMARY KEY)")
        for _ in range(count):
            popped = r.blpop([queue], timeout=120)
            if popped is None:
                raise SystemExit("naive consumer: queue stayed empty for 120 s")
            job = json.loads(popped[1])
            batch_dir = stage(job["s3_key"], os.path.join(scratch, job["batch_id"]), client)
            env = {**os.environ, "STAGERD_BATCH_ID": job["batch_id"]}
            env["STAGERD_INPUT_DIR"] = str(batch_dir / "input")
            env["STAGERD_RESULTS"] = str(batch_dir / "results.jsonl")
            subprocess.run(processor, shell=True, check=True, cwd=batch_dir, env=env)
            db.execute("INSERT INTO naive_batches VALUES (%s)", (job["batch_id"],))
            shutil.rmtree(batch_dir)


def main(argv: list[str]) -> None:
    cmd, args = argv[0], argv[1:]
    if cmd == "upload":
        upload(*args)
    elif cmd == "stage":
        stage(*args)
    elif cmd == "produce":
        produce(args[0], args[1], int(args[2]))
    elif cmd == "consume":
        consume(int(args[0]), *args[1:])
    else:
        raise SystemExit(f"unknown naive command {cmd!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
