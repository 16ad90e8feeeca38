"""Check that a file is a complete tar archive before it is uploaded.

Only the 512-byte headers are read; member data is skipped with offsets, so checking a
40 GiB archive costs one small read per member, not a pass over the bytes. Headers go
through :mod:`stagerd.archive.tarheader`, the very parser the GPU side extracts with, so an
archive this check accepts has no header the worker would refuse (hostile names, links,
devices, malformed pax records, non-UTF-8 names are all refused here, before a byte is
sent). The walk ends at the end-of-archive marker (two zero blocks). A file that ends
before a member's data or before the marker is truncated. Everything refused raises
:class:`ArchiveRejected`, because uploading it would hand the GPU side a batch it can
only fail on.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from stagerd.archive.tarheader import BLOCK, ZERO_BLOCK, MemberWalker, round_up
from stagerd.errors import ArchiveRejected


@dataclass(frozen=True)
class TarSummary:
    """What the walk learned: regular files, all members, bytes up to the end marker."""

    file_count: int
    members: int
    archive_bytes: int


def check_tar(path: Path) -> TarSummary:
    """Walk *path*'s tar headers to the end-of-archive marker.

    Raises ArchiveRejected when the file is empty, not tar, truncated, holds no regular
    file or a member extraction would refuse; OSError when it cannot be opened or read.
    """
    with open(path, "rb") as handle:
        fd = handle.fileno()
        size = os.fstat(fd).st_size
        if size == 0:
            raise ArchiveRejected(f"{path}: file is empty")
        try:
            return _walk(_PreadSource(fd, size))
        except ArchiveRejected as exc:
            raise ArchiveRejected(f"{path}: {_explain(exc)}") from None


def _explain(exc: ArchiveRejected) -> str:
    text = str(exc)
    if text.startswith("corrupt tar header at byte 0:"):
        return f"not a tar archive ({text})"
    if text.startswith("corrupt tar header"):
        return f"corrupt tar archive ({text})"
    return text


def _walk(source: _PreadSource) -> TarSummary:
    walker = MemberWalker(source)
    members = files = 0
    while (member := walker.next()) is not None:
        members += 1
        if not member.is_dir:
            files += 1
            source.skip(round_up(member.size))
    # The walker consumed the first zero block; the second must follow.
    end = source.offset
    if source.read_exact(BLOCK) != ZERO_BLOCK:
        raise ArchiveRejected(
            f"truncated tar archive (no second end-of-archive block at byte {end})"
        )
    if files == 0:
        raise ArchiveRejected("tar archive holds no regular files")
    return TarSummary(file_count=files, members=members, archive_bytes=source.offset)


class _PreadSource:
    """A BlockSource over a file descriptor: reads headers, skips data by offset."""

    def __init__(self, fd: int, size: int) -> None:
        self._fd = fd
        self._size = size
        self.offset = 0

    def read_exact(self, n: int) -> bytes:
        data = os.pread(self._fd, min(n, max(0, self._size - self.offset)), self.offset)
        self.offset += len(data)
        return data

    def skip(self, n: int) -> None:
        if self.offset + n > self._size:
            raise ArchiveRejected(
                f"truncated tar archive (member data ends at byte {self.offset + n}, "
                f"file has {self._size})"
            )
        self.offset += n
