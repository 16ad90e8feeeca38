"""Types and small helpers of the multipart engine (see :mod:`stagerd.s3.multipart`)."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from stagerd.errors import TransientError
from stagerd.retry import RetryPolicy
from stagerd.s3.store import ObjectStore

PART_SIZE_META = "stagerd-part-size"


class UploadInterrupted(TransientError):
    """The upload was stopped (shutdown); the parts sent so far stay in S3 for a resume."""


class StaleUpload(Exception):
    """An in-progress upload whose parts do not match the local file."""


@dataclass(frozen=True)
class UploadTarget:
    """Where the file goes: a key in a bucket of an object store."""

    store: ObjectStore
    bucket: str
    key: str


@dataclass(frozen=True)
class UploadOptions:
    part_size: int = 64 * 1024**2
    concurrency: int = 8
    max_parts: int = 1000
    policy: RetryPolicy = field(default_factory=RetryPolicy)
    metadata: Mapping[str, str] = field(default_factory=dict)
    force: bool = False  # re-send even if the object is already complete and matching
    # Refuse (BatchIdReused) rather than overwrite an object that differs from the file.
    keep_existing: bool = False


@dataclass(frozen=True)
class UploadResult:
    size: int
    sha256: str
    etag: str
    parts: int
    part_size: int
    uploaded_bytes: int  # sent by this run
    resumed_bytes: int  # already in S3, verified, not re-sent
    already_complete: bool  # the object was there and matched: nothing was uploaded


@dataclass(frozen=True)
class FileState:
    size: int
    mtime_ns: int
    inode: int

    @classmethod
    def of(cls, path: Path) -> FileState:
        st = os.stat(path)
        return cls(st.st_size, st.st_mtime_ns, st.st_ino)


def either(a: threading.Event, b: threading.Event) -> Callable[[], bool]:
    return lambda: a.is_set() or b.is_set()


def strip_etag(etag: str) -> str:
    return etag.strip().strip('"')
