"""The file side of a multipart upload: part layout, part bodies, and the one hashing pass.

Memory stays bounded whatever the file size: part bodies are seekable windows onto the file
(read in small pieces by botocore and http.client, never held whole), and the hashing pass
reuses one buffer. The page cache, not the process, holds the bytes in between.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from stagerd.errors import PermanentError

MiB = 1024**2
GiB = 1024**3
MIN_PART = 5 * MiB  # S3 and Swift: every part but the last
MAX_PART = 5 * GiB  # Swift's largest segment, S3's largest part
HASH_CHUNK = 4 * MiB


@dataclass(frozen=True)
class Part:
    """One part of the upload: 1-based number and its byte range in the file."""

    number: int
    offset: int
    length: int


def plan_part_size(size: int, configured: int, max_parts: int) -> int:
    """``max(configured, ceil(size / max_parts))``: the smallest part size within the limit.

    Raises PermanentError when even 5 GiB parts would exceed *max_parts*.
    """
    needed = -(-size // max_parts) if size else 0
    part_size = max(configured, needed, MIN_PART)
    if part_size > MAX_PART:
        raise PermanentError(
            f"file of {size} bytes needs parts of {part_size} bytes to stay within "
            f"{max_parts} parts; the largest allowed part is {MAX_PART} bytes "
            "(raise STAGERD_MAX_PARTS if the server allows more parts)"
        )
    return part_size


def split_parts(size: int, part_size: int) -> list[Part]:
    """The parts covering *size* bytes; an empty file is one empty part."""
    if size == 0:
        return [Part(1, 0, 0)]
    return [
        Part(i + 1, offset, min(part_size, size - offset))
        for i, offset in enumerate(range(0, size, part_size))
    ]


def multipart_etag(md5_hexes: list[str]) -> str:
    """The ETag S3, Swift s3api and SeaweedFS give a completed multipart object."""
    joined = b"".join(bytes.fromhex(h) for h in md5_hexes)
    return f"{hashlib.md5(joined).hexdigest()}-{len(md5_hexes)}"


def verify_layout(
    path: Path, size: int, part_size: int, etag: str, check: Callable[[], None]
) -> tuple[str, int] | None:
    """``(sha256, parts)`` when the first *size* bytes of *path*, cut in *part_size* parts,
    give ETag *etag* (a multipart ETag, or one PutObject's plain MD5); None if they differ.
    *check* runs before each part (it raises to stop). One pass over the file."""
    parts = split_parts(size, part_size)
    md5s: list[str] = []
    with SequentialHasher(path) as hasher:
        for part in parts:
            check()
            md5s.append(hasher.read_part(part, md5=True) or "")
        sha256 = hasher.sha256()
    single_put = len(md5s) == 1 and etag == md5s[0]
    if etag != multipart_etag(md5s) and not single_put:
        return None
    return sha256, len(parts)


class Cancelled(Exception):
    """A part body was read after the upload was cancelled (shutdown or a failed sibling).

    Deliberately not a StagerdError or OSError: neither botocore nor our retry policy
    retries it, so the request unwinds at once.
    """


class FileSlice:
    """A seekable, read-only window ``[offset, offset+length)`` of a file, for a part body.

    Reads check *cancelled* so an in-flight part stops within one read when the upload is
    cancelled. It has no ``fileno`` on purpose: botocore would otherwise size the body
    from the whole file.
    """

    def __init__(self, path: Path, offset: int, length: int, cancelled: Callable[[], bool]) -> None:
        self._fd = os.open(path, os.O_RDONLY)
        self._offset = offset
        self._length = length
        self._pos = 0
        self._cancelled = cancelled

    def read(self, n: int = -1) -> bytes:
        if self._cancelled():
            raise Cancelled("upload cancelled")
        remaining = self._length - self._pos
        count = remaining if n is None or n < 0 else min(n, remaining)
        if count <= 0:
            return b""
        data = os.pread(self._fd, count, self._offset + self._pos)
        if not data:
            raise PermanentError("file shrank while it was being uploaded")
        self._pos += len(data)
        return data

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._length}[whence]
        self._pos = max(0, min(base + pos, self._length))
        return self._pos

    def tell(self) -> int:
        return self._pos

    def __len__(self) -> int:
        return self._length

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> FileSlice:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class SequentialHasher:
    """Reads the file once, in order: SHA-256 of the whole file, MD5 of parts on request.

    Parts must be fed in order (the SHA-256 needs it). MD5 is computed only for parts that
    must be compared with an ETag (resume, rerun), so a fresh upload pays only for SHA-256.
    """

    def __init__(self, path: Path, chunk: int = HASH_CHUNK) -> None:
        self._fd = os.open(path, os.O_RDONLY)
        self._sha = hashlib.sha256()
        self._buf = bytearray(chunk)
        self._next = 0

    def read_part(self, part: Part, *, md5: bool) -> str | None:
        """Hash *part*'s bytes; return their MD5 hex if asked. Raises PermanentError if the
        file is shorter than expected (it changed since it was measured)."""
        if part.offset != self._next:
            raise ValueError(f"parts must be hashed in order (expected offset {self._next})")
        digest = hashlib.md5() if md5 else None
        view = memoryview(self._buf)
        pos, end = part.offset, part.offset + part.length
        while pos < end:
            n = os.preadv(self._fd, [view[: min(len(view), end - pos)]], pos)
            if n == 0:
                raise PermanentError("file shrank while it was being read")
            self._sha.update(view[:n])
            if digest is not None:
                digest.update(view[:n])
            pos += n
        self._next = end
        return digest.hexdigest() if digest is not None else None

    def sha256(self) -> str:
        return self._sha.hexdigest()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> SequentialHasher:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
