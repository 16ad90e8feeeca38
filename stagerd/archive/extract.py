"""Streaming tar extraction that is safe on hostile input, whatever the Python version.

This interpreter (3.11.7) predates the tarfile filter fixes (CVE-2025-4517 and friends) and
the pax-header ReDoS fix (CVE-2024-6232), so nothing here relies on ``tarfile`` at all.
Headers are decoded by :mod:`stagerd.archive.tarheader`, the same strict parser ``transfer
upload``'s check uses (so an archive the upload accepted is never refused here for its
headers), and files are written by us:

* names and member types: see :mod:`stagerd.archive.tarheader` (regular files and directories
  only; links, devices, fifos, sparse files refused; every path stays inside *dest*;
  names must be UTF-8). Audio batches need nothing else, and refusing is simpler to get
  right than resolving link targets;
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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from stagerd.archive.tarheader import BLOCK, HeaderLimits, MemberWalker, show
from stagerd.errors import ArchiveRejected, StagerdError, TransientError
from stagerd.streams import CHUNK, ChunkSource, write_all

FS_BLOCK = 4096  # what a file's tail or a directory really costs on ext4
DEFAULT_MAX_MEMBERS = 100_000
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

    def header(self) -> HeaderLimits:
        return HeaderLimits(self.max_path_bytes, self.max_depth, self.max_meta_bytes)


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
    walker = MemberWalker(reader, limits.header())
    tree = _Tree(dest)
    files = dirs = nbytes = members = 0
    name = ""
    try:
        while (member := walker.next()) is not None:
            name = member.name
            members += 1
            if members > limits.max_members:
                raise ArchiveRejected(f"archive has more than {limits.max_members} members")
            if member.is_dir:
                if member.parts:
                    charge(FS_BLOCK)
                    tree.dir_fd(member.parts)
                    dirs += 1
                continue
            fd = tree.create_file(member.parts)
            try:
                reader.copy_to(fd, member.size, charge)
            finally:
                os.close(fd)
            charge(-member.size % FS_BLOCK)
            reader.skip(-member.size % BLOCK)
            files += 1
            nbytes += member.size
    except OSError as exc:
        raise _os_error(exc, name) from None
    finally:
        tree.close()
    return ExtractStats(files=files, dirs=dirs, bytes=nbytes, tar_bytes=reader.offset)


def _os_error(exc: OSError, name: str) -> StagerdError:
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return TransientError(f"scratch disk full while writing member {show(name)}: {reason}")
    if exc.errno == errno.EEXIST:
        return ArchiveRejected(f"member {show(name)} duplicates an earlier member")
    if exc.errno in _REJECT_ERRNOS:
        return ArchiveRejected(f"member {show(name)} cannot be extracted safely: {reason}")
    return TransientError(f"extracting member {show(name)} failed: {reason}")


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
