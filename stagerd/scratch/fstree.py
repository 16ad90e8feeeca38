"""Walking and removing trees in scratch without ever following a link or leaving the volume.

Both functions work relative to an open directory fd (``openat``-style), re-open every
subdirectory with ``O_NOFOLLOW`` and check that it is the inode ``lstat`` saw on the same
device, so a symlink (or a mount point, or an entry swapped for either mid-walk) can never
lead them out of the scratch root: they unlink the link and move on. They iterate with an
explicit stack, because an extracted archive may nest deeper than Python's recursion limit.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_OWNER_RWX = stat.S_IRWXU
_SYS_FCHMODAT2 = 452  # Linux >= 6.6, same number on every architecture
_AT_SYMLINK_NOFOLLOW = 0x100


class LeftVolume(OSError):
    """A subdirectory is a mount point (another device): refusing to descend."""


@dataclass
class _Frame:
    fd: int
    names: list[str]
    name: str  # this directory's name inside its parent


def _names(fd: int) -> list[str]:
    with os.scandir(fd) as it:
        return [entry.name for entry in it]


def _open_subdir(name: str, parent_fd: int, seen: os.stat_result) -> int:
    if seen.st_uid == os.geteuid() and seen.st_mode & _OWNER_RWX != _OWNER_RWX:
        # A processor may leave a 0555 (or 0000) dir: without owner w+x nothing in it can
        # be removed, and root's DAC override would hide that in tests. We own it, so we
        # may give the owner its rights back, never through a symlink.
        restore_owner_rwx(name, parent_fd, seen)
    fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
    now = os.fstat(fd)
    if (now.st_dev, now.st_ino) != (seen.st_dev, seen.st_ino):
        os.close(fd)
        raise OSError(errno.ESTALE, f"{name!r} changed while walking it")
    return fd


def _check_same(fd: int, seen: os.stat_result, name: str) -> None:
    now = os.fstat(fd)
    if (now.st_dev, now.st_ino) != (seen.st_dev, seen.st_ino):
        raise OSError(errno.ESTALE, f"{name!r} changed while walking it")


def restore_owner_rwx(name: str, parent_fd: int, seen: os.stat_result) -> None:
    """Add u+rwx to the directory *name* (the inode *seen*) without following a link.

    Tries, in order: an fd opened ``O_NOFOLLOW`` (needs read permission); an ``O_PATH``
    fd (needs none) changed through its ``/proc/self/fd`` link, which names the inode
    itself, so no path is followed again (what glibc does for ``lchmod``; works on every
    kernel, Debian 12's 6.1 included); then ``fchmodat2(AT_SYMLINK_NOFOLLOW)`` (Linux
    6.6+) where /proc is not mounted. Raises OSError if none works."""
    mode = stat.S_IMODE(seen.st_mode) | _OWNER_RWX
    with contextlib.suppress(PermissionError):
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
        try:
            _check_same(fd, seen, name)
            os.fchmod(fd, mode)
            return
        finally:
            os.close(fd)
    with contextlib.suppress(FileNotFoundError):  # no /proc: try fchmodat2 below
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent_fd)
        try:
            _check_same(fd, seen, name)
            if not stat.S_ISDIR(os.fstat(fd).st_mode):
                raise OSError(errno.ENOTDIR, f"{name!r} is no longer a directory")
            os.chmod(f"/proc/self/fd/{fd}", mode)
            return
        finally:
            os.close(fd)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    done = libc.syscall(
        ctypes.c_long(_SYS_FCHMODAT2), ctypes.c_int(parent_fd), os.fsencode(name),
        ctypes.c_uint(mode), ctypes.c_int(_AT_SYMLINK_NOFOLLOW),
    )  # fmt: skip
    if done != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"cannot restore u+rwx on {name!r}: {os.strerror(code)}")


def _walk(
    name: str, dir_fd: int, device: int | None, expect: os.stat_result | None = None
) -> Iterator[tuple[int, str, os.stat_result]]:
    """Post-order walk yielding (parent_fd, name, lstat) for every entry, *name* itself last.

    A yielded directory's children have all been yielded before it (so they may be removed).
    """
    top = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    if expect is not None and (top.st_dev, top.st_ino) != (expect.st_dev, expect.st_ino):
        raise OSError(errno.ESTALE, f"{name!r} was replaced")
    if device is not None and top.st_dev != device:
        raise LeftVolume(errno.EXDEV, f"{name!r} is on another file system")
    if not stat.S_ISDIR(top.st_mode):
        yield dir_fd, name, top
        return
    stack = [_Frame(_open_subdir(name, dir_fd, top), [], name)]
    stack[0].names = _names(stack[0].fd)
    stats = [top]
    try:
        while stack:
            frame = stack[-1]
            if not frame.names:
                stack.pop()
                os.close(frame.fd)
                parent = stack[-1].fd if stack else dir_fd
                yield parent, frame.name, stats.pop()
                continue
            child = frame.names.pop()
            try:
                st = os.stat(child, dir_fd=frame.fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if not stat.S_ISDIR(st.st_mode):
                yield frame.fd, child, st
                continue
            if st.st_dev != top.st_dev:
                raise LeftVolume(errno.EXDEV, f"{child!r} is a mount point")
            sub = _open_subdir(child, frame.fd, st)
            stack.append(_Frame(sub, _names(sub), child))
            stats.append(st)
    finally:
        for frame in stack:
            os.close(frame.fd)


def disk_usage(name: str, dir_fd: int, device: int | None = None) -> int:
    """Bytes allocated on disk by *name* (file, link or whole tree), links not followed.

    A tree changing under the walk is counted as far as it can be seen. Raises OSError if
    *name* itself cannot be read.
    """
    total = 0
    try:
        for _parent, _name, st in _walk(name, dir_fd, device):
            total += st.st_blocks * 512
    except (FileNotFoundError, NotADirectoryError):
        # Removed or swapped while we walked (a reservation released): count what we saw.
        pass
    return total


def remove_tree(
    name: str, dir_fd: int, device: int | None = None, expect: os.stat_result | None = None
) -> int:
    """Remove *name* (a file, a symlink itself, or a whole directory tree); bytes freed.

    Never follows a symlink and never crosses into another file system (raises LeftVolume
    before touching anything below a mount point). With *expect*, refuses (ESTALE) unless
    *name* is still that inode (the one the caller locked). Entries that vanish meanwhile
    are ignored. Raises OSError for anything else (permissions).
    """
    freed = 0
    for parent, entry, st in _walk(name, dir_fd, device, expect):
        try:
            if stat.S_ISDIR(st.st_mode):
                os.rmdir(entry, dir_fd=parent)
            else:
                os.unlink(entry, dir_fd=parent)
        except FileNotFoundError:
            continue
        freed += st.st_blocks * 512
    return freed
