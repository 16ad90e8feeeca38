"""The seed's naive flow, as a peer: boto3 ``upload_file`` / ``download_file`` + ``extractall``.

Exactly what the storage guide's interface code does, plus the obvious loop around it for the
tiny-batch scenario (RPUSH/BLPOP, a subprocess per batch, one INSERT per batch). Run as
``python -m bench.naive upload PATH KEY`` | ``stage KEY DEST`` |
``produce DIR QUEUE N [VIA [verify]]`` | ``consume N QUEUE PROCESSOR SCRATCH [VIA [verify]]``;
S3 comes from the seed's variables, Redis from ``REDIS_URL``, PostgreSQL from ``DATABASE_URL``.

VIA picks the tool the loops move the archives with, so the tiny-batch scenario has a peer of
each kind: ``boto3`` (the seed: upload_file, download_file + extractall), ``s5cmd`` (one
``s5cmd cp`` process per upload; ``s5cmd cp`` + ``tar -x`` per batch staged) or ``obstore``
(put; get streamed into a file, then ``tar -x``). ``verify`` adds stagerd's checks: the producer puts the archive's SHA-256 in
the job, the consumer hashes what it downloaded and refuses a mismatch.
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


def _sha256(path: Path) -> str:
    import hashlib

    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _s5cmd(*args: str) -> list[str]:
    from bench.peers import tool

    return [tool("s5cmd"), "--endpoint-url", os.environ["S3_ENDPOINT"], *args]


def _s5cmd_env() -> dict[str, str]:
    return {
        **os.environ,
        "AWS_ACCESS_KEY_ID": os.environ["S3_ACCESS_KEY"],
        "AWS_SECRET_ACCESS_KEY": os.environ["S3_SECRET_KEY"],
        "AWS_REGION": "us-east-1",
    }


class Mover:
    """Puts an archive to S3 and gets one back into a batch dir, with the tool VIA names."""

    def __init__(self, via: str) -> None:
        self.via, self.bucket = via, os.environ["S3_BUCKET"]
        if via == "boto3":
            self.client = get_s3_client()
        elif via == "obstore":
            from bench.sdk import obstore_store

            self.store = obstore_store()
        elif via != "s5cmd":
            raise SystemExit(f"unknown VIA {via!r}")

    def put(self, path: Path, key: str) -> None:
        if self.via == "boto3":
            self.client.upload_file(str(path), self.bucket, key)
        elif self.via == "obstore":
            import obstore

            obstore.put(self.store, key, path)
        else:
            cmd = _s5cmd("cp", str(path), f"s3://{self.bucket}/{key}")
            subprocess.run(cmd, check=True, env=_s5cmd_env(), stdout=subprocess.DEVNULL)

    def get(self, key: str, batch_dir: Path) -> Path:
        """Download *key* to batch_dir/archive.tar, extract it into batch_dir/input; return
        the archive's path (the verifying consumer hashes it)."""
        if self.via == "boto3":
            stage(key, str(batch_dir), self.client)
            return batch_dir / "archive.tar"
        (batch_dir / "input").mkdir(parents=True, exist_ok=True)
        archive = batch_dir / "archive.tar"
        if self.via == "obstore":
            import obstore

            with open(archive, "wb") as f:
                for chunk in obstore.get(self.store, key).stream():
                    f.write(memoryview(chunk))
        else:
            cmd = _s5cmd("cp", f"s3://{self.bucket}/{key}", str(archive))
            subprocess.run(cmd, check=True, env=_s5cmd_env(), stdout=subprocess.DEVNULL)
        subprocess.run(
            ["tar", "-x", "-f", str(archive), "-C", str(batch_dir / "input")], check=True
        )
        return archive


def produce(src: str, queue: str, count: int, via: str = "boto3", verify: bool = False) -> None:
    """Watch *src*: upload + RPUSH every ``*.tar`` that appears, until *count* were sent."""
    import redis

    mover, r = Mover(via), redis.Redis.from_url(os.environ["REDIS_URL"])
    sent = 0
    while sent < count:
        found = sorted(Path(src).glob("*.tar"))
        if not found:
            time.sleep(0.05)
        sent += len(found)
        for path in found:
            _produce_one(mover, r, path, queue, verify)


def _produce_one(mover: Mover, r: Any, path: Path, queue: str, verify: bool) -> None:
    key = f"archives/{path.stem}.tar"
    sha256 = _sha256(path) if verify else None
    mover.put(path, key)
    job = {
        "batch_id": path.stem,
        "s3_key": key,
        "file_count": None,
        "transferred_at": datetime.now(timezone.utc).isoformat(),
        "sha256": sha256,
    }
    r.rpush(queue, json.dumps(job))
    path.unlink()


def consume(
    count: int, queue: str, processor: str, scratch: str, via: str = "boto3", verify: bool = False
) -> None:
    import psycopg
    import redis

    mover, r = Mover(via), redis.Redis.from_url(os.environ["REDIS_URL"])
    with psycopg.connect(os.environ["DATABASE_URL"], autocommit=True) as db:
        db.execute("CREATE TABLE IF NOT EXISTS naive_batches (batch_id text PRIMARY KEY)")
        for _ in range(count):
            popped = r.blpop([queue], timeout=120)
            if popped is None:
                raise SystemExit("naive consumer: queue stayed empty for 120 s")
            job = json.loads(popped[1])
            batch_dir = Path(scratch) / job["batch_id"]
            archive = mover.get(job["s3_key"], batch_dir)
            if verify and _sha256(archive) != job["sha256"]:
                raise SystemExit(f"naive consumer: {job['batch_id']}: SHA-256 mismatch")
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
        via = args[3] if len(args) > 3 else "boto3"
        produce(args[0], args[1], int(args[2]), via, "verify" in args[4:])
    elif cmd == "consume":
        via = args[4] if len(args) > 4 else "boto3"
        consume(int(args[0]), args[1], args[2], args[3], via, "verify" in args[5:])
    else:
        raise SystemExit(f"unknown naive command {cmd!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
