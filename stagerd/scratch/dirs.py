"""The batch directories of a scratch root: created locked, probed, measured, removed.

Everything goes through fds opened with ``O_NOFOLLOW`` relative to the root, so a batch id
(validated before it gets here) or a hostile entry cannot make us touch anything else.
The methods that create or clear directories must run under the admission lock.
"""

from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from stagerd.errors import ScratchUnavailable
from stagerd.log import get_logger
from stagerd.scratch import fstree
from stagerd.scratch.locks import open_nofollow, try_flock, try_lock_entry

log = get_logger(__name__)
# A batch dir holding processed results not yet committed (written by stagerd.gpu.resume);
# the sweep keeps such dirs for the restarted worker, so the name is scratch's to define.
PROCESSED_MARKER = "processed.json"

STATE_DIR = ".stagerd"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


class DirBusy(ScratchUnavailable):
    """``root/{batch_id}`` is locked by another live process."""


@contextmanager
def _dir_fd(path: Path) -> Iterator[int]:
    fd = os.open(path, _DIR_FLAGS)
    try:
        yield fd
    finally:
        os.close(fd)


class BatchDirs:
    """``root/{batch_id}`` directories and the ``root/.stagerd/tmp`` they are born in."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tmp = root / STATE_DIR / "tmp"

    def alive(self, batch_id: str) -> bool:
        """Someone holds the directory's lock (the one liveness rule for reservations)."""
        try:
            fd = try_lock_entry(self.root / batch_id)
        except OSError:
            return False  # gone, or replaced by a symlink/file: nobody can be holding it
        if fd is None:
            return True
        os.close(fd)
        return False

    def written(self, batch_id: str) -> int:
        """Bytes on disk under ``root/{batch_id}`` (0 if it is gone)."""
        with _dir_fd(self.root) as root_fd:
            try:
                return fstree.disk_usage(batch_id, root_fd, os.fstat(root_fd).st_dev)
            except OSError:
                return 0

    def used(self) -> int:
        """Bytes on disk under the root, bookkeeping excluded."""
        with _dir_fd(self.root) as root_fd:
            device = os.fstat(root_fd).st_dev
            return sum(
                fstree.disk_usage(name, root_fd, device)
                for name in os.listdir(root_fd)
                if name != STATE_DIR
            )

    def create_locked(self, batch_id: str) -> int:
        """Create ``root/{batch_id}`` already locked and return the locked fd.

        Whatever a dead owner left there is removed first; raises DirBusy if a live process
        holds it.
        """
        with _dir_fd(self.root) as root_fd, _dir_fd(self.tmp) as tmp_fd:
            self._clear_stale(batch_id, root_fd)
            temp = f"{batch_id}.{secrets.token_hex(4)}"
            os.mkdir(temp, 0o755, dir_fd=tmp_fd)
            fd = open_nofollow(temp, tmp_fd)
            try:
                if not try_flock(fd):
                    raise ScratchUnavailable(f"fresh scratch dir for {batch_id} already locked")
                # The lock belongs to the inode, so it survives the rename into place: the
                # directory is never visible under its real name without its lock.
                os.rename(temp, batch_id, src_dir_fd=tmp_fd, dst_dir_fd=root_fd)
            except BaseException:
                os.close(fd)
                fstree.remove_tree(temp, tmp_fd)
                raise
            return fd

    def remove(self, batch_id: str) -> int:
        """Remove ``root/{batch_id}`` (the caller holds its lock); bytes freed."""
        with _dir_fd(self.root) as root_fd:
            try:
                return fstree.remove_tree(batch_id, root_fd, os.fstat(root_fd).st_dev)
            except FileNotFoundError:
                return 0

    def clear_tmp(self) -> None:
        """Remove unlocked temp dirs (a crash between mkdir and rename)."""
        with _dir_fd(self.tmp) as tmp_fd:
            for name in os.listdir(tmp_fd):
                fd = try_lock_entry(name, tmp_fd)
                if fd is not None:
                    try:
                        fstree.remove_tree(name, tmp_fd)
                    finally:
                        os.close(fd)

    def _clear_stale(self, batch_id: str, root_fd: int) -> None:
        try:
            st = os.stat(batch_id, dir_fd=root_fd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if not stat.S_ISDIR(st.st_mode):
            os.unlink(batch_id, dir_fd=root_fd)
            return
        fd = try_lock_entry(batch_id, root_fd)
        if fd is None:
            raise DirBusy(f"scratch dir for batch {batch_id} is in use by another live process")
        try:
            log.warning("removing scratch dir left by a dead owner", extra={"batch_id": batch_id})
            fstree.remove_tree(batch_id, root_fd, os.fstat(root_fd).st_dev)
        finally:
            os.close(fd)
