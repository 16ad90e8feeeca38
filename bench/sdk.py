"""SDK peers that need a few lines of Python: boto3 streaming and obstore (Rust object_store).

``python -m bench.sdk boto3-get KEY`` streams the object to stdout with ``download_fileobj``
(s3transfer's concurrent ranged GETs, reordered for a non-seekable output), to be piped into
``tar -x``; ``obstore-put PATH KEY`` uploads with ``obstore.put`` (its own multipart: 5 MiB
chunks, 12 in flight); ``obstore-get KEY`` streams one GET to stdout. S3 comes from the seed's
variables (S3_ENDPOINT, S3_ACCESS_KEY, S3_SECRET_KEY, S3_BUCKET), as for bench/naive.py. Every
tool runs with its own defaults: the question is what an operator gets by reaching for it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

OBSTORE_CHUNK = 8 * 1024 * 1024


def obstore_missing() -> str | None:
    """None when obstore imports here, else why it cannot be a contender."""
    try:
        import obstore  # noqa: F401
    except ImportError as exc:
        return f"obstore is not installed ({exc}); pip install obstore"
    return None


def obstore_store() -> Any:
    from obstore.store import S3Store

    return S3Store(
        os.environ["S3_BUCKET"],
        endpoint=os.environ["S3_ENDPOINT"],
        access_key_id=os.environ["S3_ACCESS_KEY"],
        secret_access_key=os.environ["S3_SECRET_KEY"],
        region=os.environ.get("S3_REGION", "us-east-1"),
        virtual_hosted_style_request=False,
        client_options={"allow_http": True},
    )


def obstore_put(path: str, key: str) -> None:
    import obstore

    obstore.put(obstore_store(), key, Path(path))


def obstore_get(key: str) -> None:
    import obstore

    out = sys.stdout.buffer
    for chunk in obstore.get(obstore_store(), key).stream(min_chunk_size=OBSTORE_CHUNK):
        out.write(memoryview(chunk))
    out.flush()


def boto3_get(key: str) -> None:
    from bench.naive import get_s3_client

    get_s3_client().download_fileobj(os.environ["S3_BUCKET"], key, sys.stdout.buffer)
    sys.stdout.buffer.flush()


def main(argv: list[str]) -> None:
    cmd, args = argv[0], argv[1:]
    if cmd == "boto3-get":
        boto3_get(*args)
    elif cmd == "obstore-put":
        obstore_put(*args)
    elif cmd == "obstore-get":
        obstore_get(*args)
    else:
        raise SystemExit(f"unknown sdk command {cmd!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
