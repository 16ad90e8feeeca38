"""S3 reads for staging: ranged GETs pinned to one object version, as a prefetched stream.

The contract of this module:

* Every GET carries ``If-Match: <etag from HEAD>``, so the bytes of one staging all come
  from one object version; a replaced object surfaces as a :class:`TransientError`
  (412: the job is retried from a fresh HEAD), never as a spliced archive.
* A dropped connection resumes at the byte offset reached, not from zero, under a
  :class:`~stagerd.retry.RetryPolicy`: one policy budget per range, renewed whenever the
  range made progress before it ran out.
* Three stages overlap, each on its own thread: a prefetch thread reads ranges in ~1 MiB
  chunks, a hashing thread feeds them to SHA-256 in order, the consumer writes them out
  (recv, hashlib and write all release the GIL on big buffers). Bounded queues between the
  stages keep memory flat. Hashing used to run on the prefetch thread, where py-spy showed
  it taking half of that thread's time: the download then ran at half its speed and the
  writer waited on it. The consumer pulls zero-copy ``memoryview`` slices.
* Errors leave as stagerd errors: missing object -> ArchiveRejected (permanent), network
  or 5xx after retries -> TransientError, anything else from S3 (403 included) ->
  PermanentError, as the store (:mod:`stagerd.s3.store`) classified it.
"""

from __future__ import annotations

import functools
import hashlib
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stagerd.errors import (
    ArchiveRejected,
    BucketNotFound,
    ObjectChanged,
    ObjectNotFound,
    PermanentError,
    StagerdError,
    TransientError,
)
from stagerd.log import get_logger
from stagerd.retry import RetryPolicy, brief
from stagerd.s3.store import Body, ObjectStore
from stagerd.streams import CHUNK, write_all

log = get_logger(__name__)

MiB = 1024**2
# Large: on the Swift all-in-one each GET cost its proxy ~20 ms of CPU, and 32 MiB ranges
# made staging 1.10x s5cmd's single GET; 256 MiB, 0.77x (bench/analysis.md). A dropped
# connection resumes at its byte offset whatever the range size.
DEFAULT_RANGE_SIZE = 256 * MiB
DEFAULT_PREFETCH = 32 * MiB
_POLL = 0.2  # seconds between stop/cancel checks while blocked on the queue
_CLOSE_WAIT = 2.0  # how long close() waits for the prefetch thread


class StageInterrupted(TransientError):
    """Staging stopped because the stop event was set (shutdown): requeue the job."""


@dataclass(frozen=True)
class ArchiveHead:
    """What HEAD says about the archive object; ``etag`` keeps its quotes (for If-Match)."""

    size: int
    etag: str


# opener(start, end) -> body of bytes [start, end] (inclusive, like an HTTP Range).
RangeOpener = Callable[[int, int], Body]


def head_object(store: ObjectStore, bucket: str, key: str) -> ArchiveHead:
    """HEAD the object. Raises the store's errors (see :func:`map_s3_error`)."""
    head = store.head(bucket, key)
    return ArchiveHead(size=head.size, etag=head.etag)


def s3_range_opener(store: ObjectStore, bucket: str, key: str, etag: str) -> RangeOpener:
    """A :data:`RangeOpener` doing ``GET Range: bytes=start-end`` with ``If-Match: etag``."""

    def open_range(start: int, end: int) -> Body:
        return store.get_range(bucket, key, start, end, if_match=etag)

    return open_range


def map_s3_error(exc: BaseException, bucket: str, key: str) -> StagerdError:
    """An error of staging *key* in the words of staging: a store error (already classified
    by the store) or a local/network error around it (never a secret)."""
    where = f"s3://{bucket}/{key}"
    if isinstance(exc, (ObjectNotFound, BucketNotFound)):
        return ArchiveRejected(f"archive {where} does not exist")
    if isinstance(exc, ObjectChanged):
        return TransientError(f"archive {where} changed while staging (ETag no longer matches)")
    if isinstance(exc, StagerdError):
        return exc
    # A reset or timeout while reading, or anything unforeseen: worth another attempt.
    return TransientError(f"reading {where} failed: {brief(exc)}")


class RangedStream:
    """The object's bytes from *start* to *size*, fetched by a prefetch thread.

    Use as a context manager (``with RangedStream(...) as s:``); :meth:`next_view` raises
    the fetch error, :class:`StageInterrupted` on *stop*. ``sha256`` covers bytes from 0
    when *hasher* was fed the first *start* bytes (resumed downloads).
    """

    def __init__(
        self,
        opener: RangeOpener,
        size: int,
        *,
        describe: Callable[[BaseException], StagerdError],
        start: int = 0,
        range_size: int = DEFAULT_RANGE_SIZE,
        prefetch: int = DEFAULT_PREFETCH,
        policy: RetryPolicy | None = None,
        stop: threading.Event | None = None,
        hasher: Any = None,
    ) -> None:
        self._opener = opener
        self.size = size
        self._describe = describe
        self._offset = start  # next byte the producer will fetch
        self.consumed = start  # bytes handed to the consumer
        self._range_size = range_size
        self._policy = policy or RetryPolicy()
        self._stop = stop
        self._hasher = hasher if hasher is not None else hashlib.sha256()
        # The prefetch budget is split between the two queues (fetched -> hashed -> consumer).
        depth = max(2, prefetch // CHUNK // 2)
        self._fetched: queue.Queue[bytes | StagerdError | None] = queue.Queue(maxsize=depth)
        self._queue: queue.Queue[bytes | StagerdError | None] = queue.Queue(maxsize=depth)
        self._cancel = threading.Event()
        self._fetcher = threading.Thread(target=self._produce, name="stagerd-fetch", daemon=True)
        self._hashing = threading.Thread(target=self._hash, name="stagerd-hash", daemon=True)
        self._chunk = memoryview(b"")
        self._pos = 0
        self._done = False
        self._error: StagerdError | None = None

    def __enter__(self) -> RangedStream:
        self._fetcher.start()
        self._hashing.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def sha256(self) -> str:
        """Hex digest of the object: call it once :meth:`next_view` returned EOF (before
        that, the hashing stage may be ahead of what was consumed)."""
        return str(self._hasher.hexdigest())

    def next_view(self, limit: int) -> memoryview:
        """Up to *limit* bytes; empty once all *size* bytes were consumed."""
        if self._pos >= len(self._chunk):
            if self._done:
                return memoryview(b"")
            item = self._take()
            if item is None:
                self._done = True
                return memoryview(b"")
            self._chunk, self._pos = memoryview(item), 0
        view = self._chunk[self._pos : self._pos + limit]
        self._pos += len(view)
        self.consumed += len(view)
        return view

    def close(self) -> None:
        """Stop the producers and wait for them (idempotent)."""
        self._cancel.set()
        # Unblock a producer waiting on a full queue. A producer asleep in a retry backoff
        # is left to finish on its own (daemon thread; it closes its body and exits).
        deadline = time.monotonic() + _CLOSE_WAIT
        for thread, feeds in ((self._hashing, self._queue), (self._fetcher, self._fetched)):
            while thread.is_alive() and time.monotonic() < deadline:
                try:
                    feeds.get_nowait()
                except queue.Empty:
                    thread.join(timeout=_POLL)

    def _take(self) -> bytes | None:
        while True:
            if self._error is not None:
                raise self._error
            if self._stopping():
                raise StageInterrupted("staging stopped by shutdown")
            try:
                item = self._poll(self._queue, self._hashing)
            except queue.Empty:
                continue
            if isinstance(item, StagerdError):
                # Kept: every later call fails the same way, never reads as a clean EOF.
                self._error = item
                continue
            assert not isinstance(item, BaseException)
            return item

    def _produce(self) -> None:
        try:
            while self._offset < self.size:
                self._fetch_range()
            self._put(self._fetched, None)
        except _Cancelled:
            # EOF must never be faked here: a consumer still waiting gets the real reason.
            if self._stopping():
                self._put(self._fetched, StageInterrupted("staging stopped by shutdown"))
        except (StagerdError, OSError) as exc:
            self._put(self._fetched, self._describe(exc))  # the consumer thread raises it

    def _fetch_range(self) -> None:
        """One range under one policy budget. A budget spent while the offset moved on is
        renewed (the caller re-enters at the offset reached): a link that keeps delivering
        is flaky, not down, and a range is large (each GET costs a Swift proxy more CPU
        than tens of MiB of data). Without progress the last error stands."""
        start = self._offset
        end = min(start + self._range_size, self.size) - 1
        try:
            self._policy.call(
                functools.partial(self._pump, end),
                what=f"GET bytes {start}-{end}",
                stop=self._cancel,
            )
        except Exception as exc:
            if self._offset > start and self._policy.classify(exc) and not self._stopping():
                log.info("GET bytes %d-%d: retries renewed at byte %d", start, end, self._offset)
                return
            raise

    def _hash(self) -> None:
        """The middle stage: every fetched chunk, in order, through the hasher to the
        consumer; an error or EOF passes through as it is and ends the stage."""
        while not self._cancel.is_set():
            try:
                item = self._poll(self._fetched, self._fetcher)
            except queue.Empty:
                continue
            if isinstance(item, bytes):
                self._hasher.update(item)
            if not self._put(self._queue, item) or not isinstance(item, bytes):
                return

    @staticmethod
    def _poll(
        source: queue.Queue[bytes | StagerdError | None], feeder: threading.Thread
    ) -> bytes | StagerdError | None:
        """One bounded wait for the next item of *source* (queue.Empty when none came). A
        *feeder* that an unexpected bug killed (threading.excepthook logged it) reads as a
        TransientError, so its reader neither waits forever nor sees a clean EOF."""
        try:
            return source.get(timeout=_POLL)
        except queue.Empty:
            if not feeder.is_alive() and source.empty():
                return TransientError(f"staging thread {feeder.name} ended unexpectedly")
            raise

    def _pump(self, end: int) -> None:
        """Read [offset, end] into the queue; a retry re-enters at the offset reached."""
        if self._cancel.is_set() or self._stopping():
            raise _Cancelled
        body = self._opener(self._offset, end)
        try:
            while self._offset <= end:
                data = body.read(min(CHUNK, end + 1 - self._offset))
                if not data:
                    raise ConnectionError(f"connection closed at byte {self._offset}")
                self._offset += len(data)
                if not self._put(self._fetched, data) or self._stopping():
                    raise _Cancelled
        finally:
            body.close()

    def _put(
        self, into: queue.Queue[bytes | StagerdError | None], item: bytes | StagerdError | None
    ) -> bool:
        while not self._cancel.is_set():
            try:
                into.put(item, timeout=_POLL)
                return True
            except queue.Full:
                continue
        return False

    def _stopping(self) -> bool:
        return self._stop is not None and self._stop.is_set()


class _Cancelled(PermanentError):
    """The consumer went away; the producer just ends (never surfaces to callers)."""


class FileSource:
    """A :class:`ChunkSource` over an open local file (keep-archive mode)."""

    def __init__(self, fd: int, stop: threading.Event | None = None) -> None:
        self._fd = fd
        self._buf = bytearray(CHUNK)
        self._stop = stop

    def next_view(self, limit: int) -> memoryview:
        if self._stop is not None and self._stop.is_set():
            raise StageInterrupted("staging stopped by shutdown")
        view = memoryview(self._buf)[: min(limit, CHUNK)]
        n = os.readv(self._fd, [view])
        return view[:n]


def download_to_file(
    opener: RangeOpener,
    head: ArchiveHead,
    dest: Path,
    *,
    describe: Callable[[BaseException], StagerdError],
    charge: Callable[[int], None],
    policy: RetryPolicy | None = None,
    stop: threading.Event | None = None,
    range_size: int = DEFAULT_RANGE_SIZE,
    on_progress: Callable[[int], None] | None = None,
) -> str:
    """Download the object to *dest* (resumable), return its SHA-256 hex.

    Bytes go to ``dest + ".part"`` next to a ``.etag`` marker; a later call for the same
    ETag continues after the bytes already there (re-hashing them), a different ETag starts
    over. *charge(n)* is called before *n* new bytes hit the disk (scratch accounting).
    """
    part = dest.with_name(dest.name + ".part")
    marker = dest.with_name(dest.name + ".etag")
    hasher = hashlib.sha256()
    try:
        start = _resume_point(dest, part, marker, head, hasher)
        charge(start)
        if start == head.size and dest.exists():
            return hasher.hexdigest()
        marker.write_text(head.etag)
        _fetch_into(part, start, hasher, opener, head, describe=describe, charge=charge,
                    policy=policy, stop=stop, range_size=range_size,
                    on_progress=on_progress)  # fmt: skip
        os.replace(part, dest)
    except OSError as exc:
        # Local disk trouble (ENOSPC above all) may pass once the janitor frees space.
        raise TransientError(f"writing {dest.name} failed: {exc.strerror or exc}") from None
    return hasher.hexdigest()


def _fetch_into(
    part: Path, start: int, hasher: Any, opener: RangeOpener, head: ArchiveHead, *,
    describe: Callable[[BaseException], StagerdError], charge: Callable[[int], None],
    policy: RetryPolicy | None, stop: threading.Event | None, range_size: int,
    on_progress: Callable[[int], None] | None,
) -> None:  # fmt: skip
    fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
    try:
        os.ftruncate(fd, start)
        os.lseek(fd, start, os.SEEK_SET)
        stream = RangedStream(
            opener, head.size, describe=describe, start=start, range_size=range_size,
            policy=policy, stop=stop, hasher=hasher,
        )  # fmt: skip
        with stream:
            while view := stream.next_view(CHUNK):
                charge(len(view))
                write_all(fd, view)
                if on_progress is not None:
                    on_progress(stream.consumed)
    finally:
        os.close(fd)


def _resume_point(dest: Path, part: Path, marker: Path, head: ArchiveHead, hasher: Any) -> int:
    """Bytes already on disk for this ETag, fed to *hasher*; 0 (stale files removed) else."""
    same = marker.is_file() and marker.read_text() == head.etag
    if same and dest.is_file() and dest.stat().st_size == head.size:
        _hash_file(dest, hasher)
        return head.size
    dest.unlink(missing_ok=True)
    if same and part.is_file() and part.stat().st_size <= head.size:
        _hash_file(part, hasher)
        return part.stat().st_size
    part.unlink(missing_ok=True)
    return 0


def _hash_file(path: Path, hasher: Any) -> None:
    with path.open("rb") as fh:
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        while n := fh.readinto(buf):
            hasher.update(view[:n])
