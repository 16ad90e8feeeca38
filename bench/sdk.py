"""SDK peers that need a few lines of Python: boto3 streaming and obstore (Rust object_store).

``python -m bench.sdk boto3-get KEY`` streams the object to stdout with ``download_fileobj``
(s3transfer's concurrent ranged GETs, reordered for a non-seekable output), to be piped into
``tar -x``; ``obstore-put PATH KEY`` uploads with ``obstore.put`` (its own multipart: 5 MiB
chunks, 12 in flight); ``obstore-get KEY`` streams one GET to stdout. S3 comes from the seed's
variables (S3_ENDPOINT, S3_ACCESS_KEY, S3_SECRET_KEY, S3_BUCKET), as for bench/naive.py. Every
tool runs with its own defaults: the question is what an operator gets by reaching for it.
"""

from __future__ import annotations

import contextlib
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


STALL = 60.0  # seconds without a byte before the boto3 peer is declared hung


def boto3_get(key: str) -> None:
    """``download_fileobj`` to stdout with boto3's defaults, watched: a transfer that moves
    no byte for STALL seconds is reported with s3transfer's own error and ended (exit 3).

    Why: with s3transfer 0.19.3 (this lock's), a multipart download to a pipe stops for good
    after 10 chunks (80 MiB), with no error: the first chunk's done-callback, which
    schedules the other chunks, sits in the in-memory window's acquire (its size,
    ``max_in_memory_download_chunks``, is 10 and boto3's TransferConfig does not expose it).
    Seen every time here, against SeaweedFS and the Swift all-in-one; without the watch the
    contender sat until the bench's 900 s limit."""
    import threading
    import time

    from boto3.s3.transfer import TransferConfig, create_transfer_manager
    from s3transfer.subscribers import BaseSubscriber

    from bench.naive import get_s3_client

    seen = [time.monotonic()]

    class Progress(BaseSubscriber):
        def on_progress(self, future: Any, bytes_transferred: int, **kwargs: Any) -> None:
            seen[0] = time.monotonic()

    out = sys.stdout.buffer
    manager = create_transfer_manager(get_s3_client(), TransferConfig())
    future = manager.download(os.environ["S3_BUCKET"], key, out, subscribers=[Progress()])
    done = threading.Event()

    def wait() -> None:
        with contextlib.suppress(BaseException):  # re-raised by the main thread's result()
            future.result()
        done.set()

    threading.Thread(target=wait, daemon=True).start()
    while not done.wait(1.0):
        if time.monotonic() - seen[0] > STALL:
            why = getattr(getattr(future, "_coordinator", None), "exception", None)
            print(f"boto3 download_fileobj stalled: no byte for {STALL:.0f}s;"
                  f" s3transfer's error: {why!r}", file=sys.stderr, flush=True)  # fmt: skip
            os._exit(3)
    future.result()  # the transfer's error, if any
    manager.shutdown()
    out.flush()


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
