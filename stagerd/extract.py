"""Streaming tar extraction that is safe on hostile input, whatever the Python version.

This interpreter (3.11.7) predates the tarfile filter fixes (CVE-2025-4517 and friends) and
the pax-header ReDoS fix (CVE-2024-6232), so nothing here relies on ``filter='data'`` or on
``TarFile``'s member processing. We read the stream ourselves, use only
``TarInfo.frombuf`` to decode single 512-byte headers, parse pax records linearly with
size caps, and write files ourselves:

* names: absolute paths, ``..`` components, NUL bytes, over-long or over-deep names are
  refused; ``.`` and empty components are dropped, so every path stays inside *dest*;
* member types: regular files and directories only. **All** link members (symlinks and
  hardlinks), devices, fifos, sparse files (GNU ``S`` and pax ``GNU.sparse.*``) and
  unknown types are refused: audio batches need none of them, and refusing is simpler
  to get right than resolving link targets;
* files are created with ``O_CREAT|O_EXCL|O_NOFOLLOW`` relative to directory fds opened
  with ``O_DIRECTORY|O_NOFOLLOW``, so no path component can be a symlink and a duplicate
  member cannot overwrite an earlier one;
* the member count is capped, and every byte actually written is *charged* (plus the
  filesystem's block rounding) before it is written, so a lying header cannot blow the
  scratch budget: the data simply runs out and the archive is refused as truncated.

Everything refused raises :class:`ArchiveRejected` (permanent); a full disk raises
:class:`TransientError`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from stagerd.errors import ArchiveRejected, StagerdError, TransientError
from stagerd.fetch import CHUNK, ChunkSource, write_all

BLOCK = 512
ZERO_BLOCK = bytes(BLOCK)
FS_BLOCK = 4096  # what a file's tail or a directory really costs on ext4
DEFAULT_MAX_MEMBERS = 100_000
_REGULAR = frozenset({tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE})
_EXTENDED = frozenset(
    {tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE}
)
_REFUSED = {
    tarfile.LNKTYPE: "hard link",
    tarfile.SYMTYPE: "symbolic link",
    tarfile.CHRTYPE: "character device",
    tarfile.BLKTYPE: "block device",
    tarfile.FIFOTYPE: "fifo",
    tarfile.GNUTYPE_SPARSE: "sparse file",
}
_MAX_EXTENDED_IN_A_ROW = 8
_MAX_OPEN_DIRS = 256
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_REJECT_ERRNOS = frozenset(
    {errno.EEXIST, errno.ENOTDIR, errno.EISDIR, errno.ELOOP, errno.ENAMETOOLONG, errno.EINVAL,
     errno.EILSEQ}
)  # fmt: skip


@dataclass(frozen=True)
class ExtractLimits:
    """Caps on what one archive may ask of us."""

    max_members: int = DEFAULT_MAX_MEMBERS
    max_path_bytes: int = 4096
    max_depth: int = 64
    max_meta_bytes: int = 1024**2  # one pax header or GNU long name payload


@dataclass(frozen=True)
class ExtractStats:
    """What an extraction wrote: regular files, directories, file data bytes, and the
    tar stream bytes consumed through the end-of-archive marker."""

    files: int
    dirs: int
    bytes: int
    tar_bytes: int


def extract_tar(
    source: ChunkSource,
    dest: Path,
    *,
    charge: Callable[[int], None],
    limits: ExtractLimits | None = None,
) -> ExtractStats:
    """Extract the tar stream *source* into the new directory *dest*.

    *charge(n)* is called before *n* bytes of disk are used; it may raise (budget). Raises
    ArchiveRejected for hostile/corrupt/truncated input, TransientError on ENOSPC/IO errors.
    """
    limits = limits or ExtractLimits()
    try:
        dest.mkdir(mode=0o755)
    except FileExistsError:
        # Never extract into something already there (it could be a planted symlink).
        raise TransientError(f"extraction directory {dest} already exists") from None
    reader = _Reader(source)
    tree = _Tree(dest)
    files = dirs = nbytes = members = 0
    name = ""
    try:
        while (info := _next_member(reader, limits)) is not None:
            name = info.name
            members += 1
            if members > limits.max_members:
                raise ArchiveRejected(f"archive has more than {limits.max_members} members")
            parts = _safe_parts(info, limits)
            if info.type == tarfile.DIRTYPE:
                if parts:
                    charge(FS_BLOCK)
                    tree.dir_fd(parts)
                    dirs += 1
                continue
            fd = tree.create_file(parts)
            try:
                reader.copy_to(fd, info.size, charge)
            finally:
                os.close(fd)
            charge(-info.size % FS_BLOCK)
            reader.skip(-info.size % BLOCK)
            files += 1
            nbytes += info.size
    except OSError as exc:
        raise _os_error(exc, name) from None
    finally:
        tree.close()
    return ExtractStats(files=files, dirs=dirs, bytes=nbytes, tar_bytes=reader.offset)


def _show(name: str) -> str:
    """A member name safe to put in a log line (attacker-controlled, so bounded)."""
    text = repr(name)
    return text if len(text) <= 120 else text[:117] + "..."


def _os_error(exc: OSError, name: str) -> StagerdError:
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return TransientError(f"scratch disk full while writing member {_show(name)}: {reason}")
    if exc.errno == errno.EEXIST:
        return ArchiveRejected(f"member {_show(name)} duplicates an earlier member")
    if exc.errno in _REJECT_ERRNOS:
        return ArchiveRejected(f"member {_show(name)} cannot be extracted safely: {reason}")
    return TransientError(f"extracting member {_show(name)} failed: {reason}")


class _Reader:
    """Byte-exact reading over a ChunkSource, counting the offset for error messages."""

    def __init__(self, source: ChunkSource) -> None:
        self._source = source
        self.offset = 0

    def read_exact(self, n: int) -> bytes:
        parts = []
        need = n
        while need:
            view = self._source.next_view(need)
            if not view:
                break
            parts.append(bytes(view))
            need -= len(view)
        data = b"".join(parts)
        self.offset += len(data)
        return data

    def skip(self, n: int) -> None:
        while n:
            view = self._source.next_view(min(n, CHUNK))
            if not view:
                raise ArchiveRejected(f"archive is truncated at byte {self.offset}")
            n -= len(view)
            self.offset += len(view)

    def copy_to(self, fd: int, n: int, charge: Callable[[int], None]) -> None:
        while n:
            view = self._source.next_view(min(n, CHUNK))
            if not view:
                raise ArchiveRejected(f"archive is truncated at byte {self.offset}")
            charge(len(view))
            write_all(fd, view)
            n -= len(view)
            self.offset += len(view)


def _next_member(reader: _Reader, limits: ExtractLimits) -> tarfile.TarInfo | None:
    """The next real member with pax/GNU long-name overrides applied; None at the end."""
    overrides: dict[str, str] = {}
    for _ in range(_MAX_EXTENDED_IN_A_ROW + 1):
        at = reader.offset
        block = reader.read_exact(BLOCK)
        if len(block) < BLOCK:
            raise ArchiveRejected(f"archive is truncated at byte {reader.offset} (no end marker)")
        if block == ZERO_BLOCK:
            return None
        try:
            info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
        except tarfile.HeaderError as exc:
            raise ArchiveRejected(f"corrupt tar header at byte {at}: {exc}") from None
        if info.size < 0:
            raise ArchiveRejected(f"corrupt tar header at byte {at}: negative size")
        if info.type not in _EXTENDED:
            return _apply(info, overrides)
        data = _read_meta(reader, info.size, limits)
        if info.type == tarfile.GNUTYPE_LONGNAME:
            overrides["path"] = _nts(data)
        elif info.type == tarfile.GNUTYPE_LONGLINK:
            overrides["linkpath"] = _nts(data)
        elif info.type == tarfile.XHDTYPE:
            overrides.update(_parse_pax(data, at))
        else:
            _parse_pax(data, at)  # global header: validated, nothing we use
    raise ArchiveRejected(f"too many extended headers in a row at byte {reader.offset}")


def _read_meta(reader: _Reader, size: int, limits: ExtractLimits) -> bytes:
    if size > limits.max_meta_bytes:
        raise ArchiveRejected(
            f"extended header at byte {reader.offset} is {size} bytes "
            f"(at most {limits.max_meta_bytes})"
        )
    data = reader.read_exact(size)
    if len(data) < size:
        raise ArchiveRejected(f"archive is truncated at byte {reader.offset}")
    reader.skip(-size % BLOCK)
    return data


def _nts(data: bytes) -> str:
    return data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _parse_pax(data: bytes, at: int) -> dict[str, str]:
    """Parse ``"<len> <key>=<value>\\n"`` records in one linear pass (no regex)."""
    records: dict[str, str] = {}
    pos = 0
    while pos < len(data) and data[pos] != 0:
        space = data.find(b" ", pos, pos + 21)
        digits = data[pos:space] if space > pos else b""
        if not digits.isdigit():
            raise ArchiveRejected(f"malformed pax header at byte {at}")
        end = pos + int(digits)
        if end <= space + 2 or end > len(data) or data[end - 1] != 0x0A:
            raise ArchiveRejected(f"malformed pax header at byte {at}")
        key, eq, value = data[space + 1 : end - 1].partition(b"=")
        if not eq or not key:
            raise ArchiveRejected(f"malformed pax header at byte {at}")
        name = key.decode("utf-8", "surrogateescape")
        if name.startswith("GNU.sparse."):
            raise ArchiveRejected(f"sparse member (pax header at byte {at}) refused")
        records[name] = value.decode("utf-8", "surrogateescape")
        pos = end
    return records


def _apply(info: tarfile.TarInfo, overrides: dict[str, str]) -> tarfile.TarInfo:
    """Apply extended-header values; refuse any member that is not a file or directory."""
    if "path" in overrides:
        info.name = overrides["path"]
    if "linkpath" in overrides:
        info.linkname = overrides["linkpath"]
    if "size" in overrides:
        if not overrides["size"].isdigit():
            raise ArchiveRejected(f"member {_show(info.name)} has a malformed pax size")
        info.size = int(overrides["size"])
    kind = _REFUSED.get(info.type)
    if kind is not None:
        raise ArchiveRejected(f"member {_show(info.name)} is a {kind}: refused")
    if info.type == tarfile.DIRTYPE:
        if info.size:
            raise ArchiveRejected(f"directory member {_show(info.name)} carries data")
    elif info.type not in _REGULAR:
        raise ArchiveRejected(f"member {_show(info.name)} has unsupported type {info.type!r}")
    return info


def _safe_parts(info: tarfile.TarInfo, limits: ExtractLimits) -> tuple[str, ...]:
    """The member's path as components that cannot leave the destination directory."""
    name = info.name
    if "\0" in name:
        raise ArchiveRejected(f"member {_show(name)} has a NUL byte in its name")
    if name.startswith("/"):
        raise ArchiveRejected(f"member {_show(name)} has an absolute path")
    if len(name.encode("utf-8", "surrogateescape")) > limits.max_path_bytes:
        raise ArchiveRejected(f"member {_show(name)} has a name over {limits.max_path_bytes} bytes")
    parts = tuple(part for part in name.split("/") if part not in ("", "."))
    if ".." in parts:
        raise ArchiveRejected(f"member {_show(name)} has a '..' component")
    if len(parts) > limits.max_depth:
        raise ArchiveRejected(f"member {_show(name)} is nested over {limits.max_depth} deep")
    if not parts and info.type != tarfile.DIRTYPE:
        raise ArchiveRejected(f"member {_show(name)} has an empty name")
    return parts


class _Tree:
    """Directory fds under the destination root; every open refuses symlinks."""

    def __init__(self, root: Path) -> None:
        self._root = os.open(root, _DIR_FLAGS)
        self._dirs: dict[tuple[str, ...], int] = {(): self._root}

    def dir_fd(self, parts: tuple[str, ...]) -> int:
        fd = self._dirs.get(parts)
        if fd is not None:
            return fd
        parent = self.dir_fd(parts[:-1])
        # An earlier member may have made it; the O_DIRECTORY|O_NOFOLLOW open checks its kind.
        with contextlib.suppress(FileExistsError):
            os.mkdir(parts[-1], 0o755, dir_fd=parent)
        fd = os.open(parts[-1], _DIR_FLAGS, dir_fd=parent)
        if len(self._dirs) >= _MAX_OPEN_DIRS:
            self._close_cached()
        self._dirs[parts] = fd
        return fd

    def create_file(self, parts: tuple[str, ...]) -> int:
        return os.open(parts[-1], _FILE_FLAGS, 0o644, dir_fd=self.dir_fd(parts[:-1]))

    def _close_cached(self) -> None:
        for key, fd in self._dirs.items():
            if key:
                os.close(fd)
        self._dirs = {(): self._root}

    def close(self) -> None:
        self._close_cached()
        os.close(self._root)
