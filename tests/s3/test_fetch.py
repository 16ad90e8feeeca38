"""stagerd.s3.fetch against a real S3 server (SeaweedFS): ranges, If-Match, resume, stop."""

from __future__ import annotations

import errno
import hashlib
import os
import threading
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from stagerd.errors import ArchiveRejected, TransientError
from stagerd.retry import RetryPolicy
from stagerd.s3.boto import BotoStore, map_error
from stagerd.s3.fetch import (
    CHUNK,
    ArchiveHead,
    Body,
    RangedStream,
    RangeOpener,
    StageInterrupted,
    download_to_file,
    head_object,
    map_s3_error,
    s3_range_opener,
)

FAST = RetryPolicy(attempts=5, base=0.001, max_delay=0.01, total=10)
KEY = "archives/b1.tar"


class FlakyBody:
    """A real body that drops the connection after *reads* reads."""

    def __init__(self, body: Body, reads: int) -> None:
        self._body = body
        self._left = reads

    def read(self, amt: int | None = None, /) -> bytes:
        if self._left == 0:
            raise ConnectionResetError(104, "Connection reset by peer (injected)")
        self._left -= 1
        return self._body.read(amt)

    def close(self) -> None:
        self._body.close()


class Recorder:
    """Wraps an opener: records every (start, end) and makes the first *flaky* bodies fail."""

    def __init__(self, opener: RangeOpener, *, flaky: int = 0, reads: int = 1) -> None:
        self._opener = opener
        self.calls: list[tuple[int, int]] = []
        self._flaky = flaky
        self._reads = reads

    def __call__(self, start: int, end: int) -> Body:
        self.calls.append((start, end))
        body = self._opener(start, end)
        if self._flaky:
            self._flaky -= 1
            return FlakyBody(body, self._reads)
        return body


@pytest.fixture
def blob(s3_client: Any, s3_bucket: str) -> tuple[bytes, ArchiveHead]:
    data = os.urandom(3 * CHUNK + 12345)
    s3_client.put_object(Bucket=s3_bucket, Key=KEY, Body=data)
    return data, head_object(BotoStore(s3_client), s3_bucket, KEY)


def read_all(stream: RangedStream) -> bytes:
    parts = []
    while view := stream.next_view(100_000):
        parts.append(bytes(view))
    return b"".join(parts)


def describe(bucket: str) -> Any:
    return partial(map_s3_error, bucket=bucket, key=KEY)


def test_ranged_stream_reads_every_byte_in_ranges(
    s3_client: Any, s3_bucket: str, blob: tuple[bytes, ArchiveHead]
) -> None:
    data, head = blob
    assert head.size == len(data) and head.etag.startswith('"')
    opener = Recorder(s3_range_opener(BotoStore(s3_client), s3_bucket, KEY, head.etag))
    with RangedStream(
        opener, head.size, describe=describe(s3_bucket), range_size=CHUNK, policy=FAST
    ) as stream:
        assert read_all(stream) == data
    assert stream.sha256() == hashlib.sha256(data).hexdigest()
    assert opener.calls == [(0, CHUNK - 1), (CHUNK, 2 * CHUNK - 1), (2 * CHUNK, 3 * CHUNK - 1),
                            (3 * CHUNK, len(data) - 1)]  # fmt: skip


def test_dropped_connection_resumes_at_the_byte_offset(
    s3_client: Any, s3_bucket: str, blob: tuple[bytes, ArchiveHead]
) -> None:
    data, head = blob
    real = s3_range_opener(BotoStore(s3_client), s3_bucket, KEY, head.etag)
    opener = Recorder(real, flaky=2, reads=1)  # two drops, each after one 1 MiB read
    with RangedStream(
        opener, head.size, describe=describe(s3_bucket), range_size=4 * CHUNK, policy=FAST
    ) as stream:
        assert read_all(stream) == data
    assert stream.sha256() == hashlib.sha256(data).hexdigest()
    # Resumed where the dropped reads left off, never from zero.
    assert [start for start, _ in opener.calls] == [0, CHUNK, 2 * CHUNK]


def test_a_range_that_keeps_progressing_renews_its_retries(
    s3_client: Any, s3_bucket: str, blob: tuple[bytes, ArchiveHead]
) -> None:
    """Three drops in one range, two attempts per budget: the budget runs out after the
    offset moved on, so it is renewed and the stream finishes (a flaky link, not a dead one)."""
    data, head = blob
    real = s3_range_opener(BotoStore(s3_client), s3_bucket, KEY, head.etag)
    opener = Recorder(real, flaky=3, reads=1)  # each of the first three GETs: 1 MiB, then a drop
    with RangedStream(
        opener, head.size, describe=describe(s3_bucket), range_size=8 * CHUNK,
        policy=RetryPolicy(attempts=2, base=0.001, max_delay=0.01, total=10),
    ) as stream:  # fmt: skip
        assert read_all(stream) == data
    assert stream.sha256() == hashlib.sha256(data).hexdigest()
    assert [start for start, _ in opener.calls] == [0, CHUNK, 2 * CHUNK, 3 * CHUNK]


def test_retries_exhausted_surface_as_transient(
    s3_client: Any, s3_bucket: str, blob: tuple[bytes, ArchiveHead]
) -> None:
    _, head = blob
    real = s3_range_opener(BotoStore(s3_client), s3_bucket, KEY, head.etag)
    opener = Recorder(real, flaky=100, reads=0)
    with (
        RangedStream(
            opener,
            head.size,
            describe=describe(s3_bucket),
            policy=RetryPolicy(attempts=3, base=0.001),
        ) as stream,
        pytest.raises(TransientError, match="Connection reset"),
    ):
        read_all(stream)
    assert len(opener.calls) == 3
    with pytest.raises(TransientError):  # and it stays failed, never a clean EOF
        stream.next_view(10)


class BrokenHasher:
    """A hasher that raises on its *n*-th update: a bug in the hashing stage."""

    def __init__(self, n: int) -> None:
        self._left = n

    def update(self, data: bytes) -> None:
        self._left -= 1
        if self._left == 0:
            raise RuntimeError("hasher bug (injected)")

    def hexdigest(self) -> str:
        return "0" * 64


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dead_hashing_stage_fails_the_stream_never_a_short_eof(
    s3_client: Any, s3_bucket: str, blob: tuple[bytes, ArchiveHead]
) -> None:
    _, head = blob
    opener = s3_range_opener(BotoStore(s3_client), s3_bucket, KEY, head.etag)
    with (
        RangedStream(
            opener, head.size, describe=describe(s3_bucket), policy=FAST, hasher=BrokenHasher(2)
        ) as stream,  # fmt: skip
        pytest.raises(TransientError, match="ended unexpectedly"),
    ):
        read_all(stream)
    # Only what was hashed before the bug reached the consumer (the first chunk).
    assert 0 < stream.consumed < head.size


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dead_fetch_stage_fails_the_stream_never_a_short_eof(s3_bucket: str) -> None:
    def opener(start: int, end: int) -> Body:
        raise RuntimeError("fetcher bug (injected)")

    with (
        RangedStream(opener, 10 * CHUNK, describe=describe(s3_bucket), policy=FAST) as stream,
        pytest.raises(TransientError, match="ended unexpectedly"),
    ):
        read_all(stream)
    assert stream.consumed == 0


def test_replaced_object_fails_if_match_as_transient(
    s3_client: Any, s3_bucket: str, blob: tuple[bytes, ArchiveHead]
) -> None:
    _, head = blob
    s3_client.put_object(Bucket=s3_bucket, Key=KEY, Body=b"a different archive")
    opener = s3_range_opener(BotoStore(s3_client), s3_bucket, KEY, head.etag)
    with (
        RangedStream(opener, head.size, describe=describe(s3_bucket), policy=FAST) as stream,
        pytest.raises(TransientError, match="changed while staging"),
    ):
        read_all(stream)


def test_missing_object_is_rejected(s3_client: Any, s3_bucket: str) -> None:
    from botocore.exceptions import ClientError

    with pytest.raises(ClientError) as info:
        s3_client.head_object(Bucket=s3_bucket, Key="archives/nope.tar")
    # The store is the one place that turns botocore's error into ours.
    error = map_error(info.value, "HeadObject", s3_bucket, "http://s3")
    assert isinstance(map_s3_error(error, s3_bucket, "archives/nope.tar"), ArchiveRejected)


def test_stop_event_interrupts_the_consumer(
    s3_client: Any, s3_bucket: str, blob: tuple[bytes, ArchiveHead]
) -> None:
    _, head = blob
    stop = threading.Event()
    opener = s3_range_opener(BotoStore(s3_client), s3_bucket, KEY, head.etag)
    with RangedStream(
        opener, head.size, describe=describe(s3_bucket), policy=FAST, stop=stop, prefetch=2 * CHUNK
    ) as stream:
        assert stream.next_view(1000)
        stop.set()
        with pytest.raises(StageInterrupted):
            read_all(stream)


def test_download_resumes_a_partial_file_for_the_same_etag(
    tmp_path: Path, s3_client: Any, s3_bucket: str, blob: tuple[bytes, ArchiveHead]
) -> None:
    data, head = blob
    real = s3_range_opener(BotoStore(s3_client), s3_bucket, KEY, head.etag)
    dest = tmp_path / "archive.tar"
    charged: list[int] = []
    reads = iter([2] + [0] * 100)  # 2 MiB, then a link that drops every connection at once

    def broken(start: int, end: int) -> Body:
        return FlakyBody(real(start, end), next(reads))

    with pytest.raises(TransientError):
        download_to_file(
            broken, head, dest, describe=describe(s3_bucket), charge=charged.append,
            policy=RetryPolicy(attempts=1),
        )  # fmt: skip
    part = tmp_path / "archive.tar.part"
    assert part.stat().st_size == 2 * CHUNK and not dest.exists()
    opener = Recorder(real)
    charged.clear()
    digest = download_to_file(
        opener, head, dest, describe=describe(s3_bucket), charge=charged.append, policy=FAST
    )
    assert digest == hashlib.sha256(data).hexdigest()
    assert dest.read_bytes() == data and not part.exists()
    assert opener.calls[0][0] == 2 * CHUNK  # continued after the bytes on disk
    assert sum(charged) == len(data)  # the resumed bytes count against the budget too
    # A complete archive for the same ETag is reused without any GET.
    again = Recorder(real)
    assert (
        download_to_file(again, head, dest, describe=describe(s3_bucket), charge=charged.append)
        == digest
    )
    assert again.calls == []


def test_download_starts_over_for_a_different_etag(
    tmp_path: Path, s3_client: Any, s3_bucket: str, blob: tuple[bytes, ArchiveHead]
) -> None:
    data, head = blob
    dest = tmp_path / "archive.tar"
    (tmp_path / "archive.tar.part").write_bytes(b"stale bytes of an older upload")
    (tmp_path / "archive.tar.etag").write_text('"older-etag"')
    opener = Recorder(s3_range_opener(BotoStore(s3_client), s3_bucket, KEY, head.etag))
    digest = download_to_file(
        opener, head, dest, describe=describe(s3_bucket), charge=lambda n: None
    )
    assert digest == hashlib.sha256(data).hexdigest() and dest.read_bytes() == data
    assert opener.calls[0][0] == 0


def test_download_disk_errors_are_transient(
    tmp_path: Path, s3_client: Any, s3_bucket: str, blob: tuple[bytes, ArchiveHead]
) -> None:
    _, head = blob

    def disk_full(_n: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    opener = s3_range_opener(BotoStore(s3_client), s3_bucket, KEY, head.etag)
    with pytest.raises(TransientError, match=r"writing archive\.tar failed: No space left"):
        download_to_file(
            opener, head, tmp_path / "archive.tar", describe=describe(s3_bucket), charge=disk_full
        )
