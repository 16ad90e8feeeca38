"""The janitor's scratch sweep: remove what dead owners left behind, never live work.

The rule is the one ``systemd-tmpfiles`` applies: an entry whose exclusive ``flock`` can be
taken without waiting has no owner. Such an entry older than the minimum age is removed
*while we hold its lock*, so a worker cannot start reusing it mid-removal (the scratch
manager must take the same lock first). Locked entries cost one ``lstat``, one ``open``
and one failed ``flock``; their trees are never walked.

Symlinks, FIFOs and device nodes are never opened (opening can follow or have side
effects): they cannot carry a lock, so they are simply unlinked when old. Nothing below a
mount point or outside the root is ever touched (see :mod:`stagerd.scratch.fstree`).
"""

from __future__ import annotations

import errno
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from stagerd.config.settings import Settings
from stagerd.errors import ConfigError
from stagerd.log import get_logger
from stagerd.scratch import fstree
from stagerd.scratch.dirs import PROCESSED_MARKER, STATE_DIR
from stagerd.scratch.locks import try_lock_entry

log = get_logger(__name__)

REMOVE = "remove"
KEEP_LOCKED = "keep-locked"
KEEP_YOUNG = "keep-young"
_ROOT_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True)
class EntryFacts:
    """What the sweep knows about one entry of the scratch root."""

    name: str
    kind: str  # "dir", "file", "symlink" or "other"
    locked: bool
    age: float
    # Holds processed results not yet committed (resume.py): its worker's restart needs it.
    processed: bool = False


# Processed-but-uncommitted results outlive a PostgreSQL outage and the restarts during it.
PROCESSED_MIN_AGE = 24 * 3600.0


def decide(facts: EntryFacts, min_age: float) -> str:
    """REMOVE, KEEP_LOCKED or KEEP_YOUNG for one entry (pure)."""
    if facts.locked:
        return KEEP_LOCKED
    if facts.age < (max(min_age, PROCESSED_MIN_AGE) if facts.processed else min_age):
        # Unlocked but recent: maybe a tool that does not lock (a hand-run download).
        return KEEP_YOUNG
    return REMOVE


@dataclass(frozen=True)
class SweepResult:
    removed: list[str] = field(default_factory=list)
    freed_bytes: int = 0
    kept_locked: list[str] = field(default_factory=list)
    kept_young: int = 0
    errors: list[str] = field(default_factory=list)


def check_scratch_root(root: Path, configured: Path) -> bool:
    """Whether the sweep may run on *root*; False when the default root simply does not
    exist (a transfer host). Raises ConfigError for a root that must never be swept."""
    if not root.is_absolute():
        raise ConfigError(f"scratch root {root}: must be an absolute path")
    if Path(os.path.abspath(root)) != Path(os.path.abspath(configured)):
        raise ConfigError(
            f"scratch root {root} is not the configured one ({configured}, STAGERD_SCRATCH_DIR)"
        )
    if os.path.realpath(root) == "/" or Path(os.path.abspath(root)) == Path("/"):
        raise ConfigError("scratch root is '/': refusing to sweep it")
    if not os.path.lexists(root) and root == Settings().scratch_dir:
        return False
    if root.is_symlink():
        raise ConfigError(
            f"scratch root {root} is a symlink to {os.path.realpath(root)}, not the configured "
            "directory itself; set STAGERD_SCRATCH_DIR to the real path"
        )
    if not root.is_dir():
        raise ConfigError(f"scratch root {root} is not a directory (STAGERD_SCRATCH_DIR)")
    return True


def sweep_scratch(
    root: Path,
    *,
    min_age: float,
    dry_run: bool = False,
    now: float | None = None,
    settled: Callable[[str], bool] | None = None,
) -> SweepResult:
    """Remove (or, dry, list) every unlocked entry of *root* older than *min_age* seconds.

    A directory holding processed-but-uncommitted results is kept for a day, unless
    *settled* (the ledger) says its batch is done or dead already: another worker then
    redid it, and the results can never be committed. Never raises for one bad entry: it
    lands in ``errors`` and the sweep goes on.
    """
    root_fd = os.open(root, _ROOT_FLAGS)
    try:
        sweep = _Sweep(
            root=str(root),
            root_fd=root_fd,
            device=os.fstat(root_fd).st_dev,
            min_age=min_age,
            dry_run=dry_run,
            now=time.time() if now is None else now,
            settled=settled or (lambda _name: False),
        )
        with os.scandir(root_fd) as it:
            entries = [e for e in it if e.name != STATE_DIR]
        for entry in entries:
            try:
                sweep.entry(entry)
            except OSError as exc:
                if exc.errno in (errno.ESTALE, errno.ENOENT):
                    # Replaced or removed under us (its owner released it meanwhile): an
                    # entry that is gone needs no sweeping; a replaced one waits a run.
                    continue
                sweep.errors.append(f"scratch {sweep.root}/{entry.name}: {exc.strerror or exc}")
    finally:
        os.close(root_fd)
    return SweepResult(sweep.removed, sweep.freed, sweep.kept_locked, sweep.young, sweep.errors)


def _kind(st: os.stat_result) -> str:
    if stat.S_ISDIR(st.st_mode):
        return "dir"
    if stat.S_ISREG(st.st_mode):
        return "file"
    if stat.S_ISLNK(st.st_mode):
        return "symlink"
    return "other"


@dataclass
class _Sweep:
    """One sweep's fixed inputs and running tally."""

    root: str
    root_fd: int
    device: int
    min_age: float
    dry_run: bool
    now: float
    settled: Callable[[str], bool]
    removed: list[str] = field(default_factory=list)
    kept_locked: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    freed: int = 0
    young: int = 0

    def entry(self, entry: os.DirEntry[str]) -> None:
        name = entry.name
        fd = None
        # d_type from readdir, no syscall: only directories and regular files are opened
        # (opening a device node can have side effects; a symlink cannot carry a lock).
        if entry.is_dir(follow_symlinks=False) or entry.is_file(follow_symlinks=False):
            try:
                fd = try_lock_entry(name, self.root_fd)
            except (FileNotFoundError, NotADirectoryError):
                return  # released by its owner meanwhile
            if fd is None:
                self.kept_locked.append(f"{self.root}/{name}")
                return
        try:
            self._judge(name, fd)
        finally:
            if fd is not None:
                os.close(fd)

    def _judge(self, name: str, fd: int | None) -> None:
        """Decide on an unlocked entry (its lock held in *fd* when it has one) and act."""
        st = os.stat(name, dir_fd=self.root_fd, follow_symlinks=False)
        if fd is not None:
            held = os.fstat(fd)
            if (held.st_dev, held.st_ino) != (st.st_dev, st.st_ino):
                return  # replaced since we opened it: judge it next run
        path = f"{self.root}/{name}"
        if st.st_dev != self.device:
            self.errors.append(f"scratch {path}: a mount point; not touching it")
            return
        age = self.now - max(st.st_mtime, st.st_ctime)
        processed = _processed(name, self.root_fd, st) and not self.settled(name)
        facts = EntryFacts(name, _kind(st), False, age, processed)
        if decide(facts, self.min_age) == KEEP_YOUNG:
            self.young += 1
            return
        if self.dry_run:
            freed = fstree.disk_usage(name, self.root_fd, self.device)
        else:
            freed = fstree.remove_tree(name, self.root_fd, self.device, expect=st)
            log.info("removed stale scratch entry", extra={"path": path})
        self.removed.append(path)
        self.freed += freed


def _processed(name: str, root_fd: int, st: os.stat_result) -> bool:
    """Whether the directory *name* holds a processed-results marker (gpu/resume.py)."""
    if not stat.S_ISDIR(st.st_mode):
        return False
    try:
        marker = os.stat(f"{name}/{PROCESSED_MARKER}", dir_fd=root_fd, follow_symlinks=False)
    except OSError:
        return False
    return stat.S_ISREG(marker.st_mode)
