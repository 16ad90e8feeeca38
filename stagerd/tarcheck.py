"""Check that a file is a complete tar archive before it is uploaded.

Only the 512-byte headers are read; member data is skipped with offsets, so checking a
40 GiB archive costs one small read per member, not a pass over the bytes. The walk ends at
the end-of-archive marker (two zero blocks). A file that ends before a member's data or
before the marker is truncated; a header whose checksum does not add up is not tar. Both
are refused with :class:`ArchiveRejected`, because uploading them would hand the GPU side a
batch it can only fail on.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

from stagerd.errors import ArchiveRejected

BLOCK = 512
ZERO_BLOCK = bytes(BLOCK)
# Regular files: '0', NUL (old v7/GNU) and '7' (contiguous). These are what file_count counts.
REGULAR_TYPES = frozenset(b"0\x007")
# Types whose size field says how much data follows although they are not members.
META_TYPES = frozenset(b"xgLKX")
# Links, directories, devices and FIFOs carry no data whatever their size field says
# (tarfile and GNU tar agree on this).
NO_DATA_TYPES = frozenset(b"123456")
MAX_META_BYTES = 1024 * 1024


@dataclass(frozen=True)
class TarSummary:
    """What the walk learned: regular files, all members, bytes up to the end marker."""

    file_count: int
    members: int
    archive_bytes: int


def check_tar(path: Path) -> TarSummary:
    """Walk *path*'s tar headers to the end-of-archive marker.

    Raises ArchiveRejected when the file is empty, not tar, truncated or holds no regular
    file; OSError when it cannot be opened or read.
    """
    with open(path, "rb") as handle:
        fd = handle.fileno()
        size = os.fstat(fd).st_size
        if size == 0:
            raise ArchiveRejected(f"{path}: file is empty")
        return _walk(fd, size, path)


def _walk(fd: int, size: int, path: Path) -> TarSummary:
    offset = members = files = 0
    pax_size: int | None = None
    while True:
        header = _read_block(fd, offset, size, path, "header")
        if header == ZERO_BLOCK:
            _read_end_marker(fd, offset, size, path)
            break
        _verify_checksum(header, offset, path)
        typeflag = header[156]
        member_size = _parse_size(header, offset, path)
        if typeflag == ord("x") and member_size <= MAX_META_BYTES:
            pax_size = _pax_size(os.pread(fd, member_size, offset + BLOCK), pax_size)
        elif typeflag not in META_TYPES:
            if pax_size is not None:
                member_size, pax_size = pax_size, None
            members += 1
            files += typeflag in REGULAR_TYPES
        data = 0 if typeflag in NO_DATA_TYPES else _round_up(member_size)
        offset += BLOCK + data
        if offset > size:
            raise ArchiveRejected(
                f"{path}: truncated tar archive (member data ends at byte {offset}, "
                f"file has {size})"
            )
    if files == 0:
        raise ArchiveRejected(f"{path}: tar archive holds no regular files")
    return TarSummary(file_count=files, members=members, archive_bytes=offset + 2 * BLOCK)


def _read_block(fd: int, offset: int, size: int, path: Path, what: str) -> bytes:
    if offset + BLOCK > size:
        raise ArchiveRejected(
            f"{path}: truncated tar archive (no end-of-archive marker; "
            f"{what} expected at byte {offset}, file has {size})"
        )
    return os.pread(fd, BLOCK, offset)


def _read_end_marker(fd: int, offset: int, size: int, path: Path) -> None:
    second = _read_block(fd, offset + BLOCK, size, path, "second end-of-archive block")
    if second != ZERO_BLOCK:
        raise ArchiveRejected(f"{path}: corrupt tar archive (lone zero block at byte {offset})")


def _verify_checksum(header: bytes, offset: int, path: Path) -> None:
    stored = _octal(header[148:156])
    # The checksum is computed with its own field read as eight spaces; some old writers
    # summed signed bytes, so accept either.
    unsigned = sum(header[:148]) + 8 * 32 + sum(header[156:])
    if stored == unsigned:
        return  # the common case: skip the per-byte signed sum (it dominated 10k-member walks)
    signed = unsigned - 256 * sum(1 for b in header[:148] + header[156:] if b > 127)
    if stored is None or stored != signed:
        if offset == 0:
            raise ArchiveRejected(f"{path}: not a tar archive (bad header at byte 0)")
        raise ArchiveRejected(f"{path}: corrupt tar archive (bad header at byte {offset})")


def _parse_size(header: bytes, offset: int, path: Path) -> int:
    field = header[124:136]
    if field[0] & 0x80:
        # GNU base-256 encoding, used for members of 8 GiB and more.
        return int.from_bytes(field[1:], "big") + ((field[0] & 0x7F) << 88)
    value = _octal(field)
    if value is None:
        raise ArchiveRejected(f"{path}: corrupt tar archive (bad size field at byte {offset})")
    return value


def _octal(field: bytes) -> int | None:
    text = field.replace(b"\x00", b" ").strip()
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        return None


def _pax_size(data: bytes, current: int | None) -> int | None:
    """The ``size`` record of a pax extended header (records are ``"LEN key=value\\n"``)."""
    pos = 0
    while pos < len(data) and data[pos] != 0:
        space = data.find(b" ", pos)
        if space < 0:
            break
        try:
            length = int(data[pos:space])
        except ValueError:
            break
        if length <= 0:
            break
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        if key == b"size":
            with contextlib.suppress(ValueError):  # a bad record: keep the header's size
                current = int(value)
        pos += length
    return current


def _round_up(n: int) -> int:
    return (n + BLOCK - 1) // BLOCK * BLOCK
