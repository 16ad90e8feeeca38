"""The filesystem every contender extracts onto: a fresh journaled ext4, like the GPU VM's.

Why: this machine's ``/`` is ext4 *without a journal*. In that mode ext4 checks each new inode
against its recently-deleted list (``recently_deleted()`` in fs/ext4/ialloc.c, taken only when
there is no journal), and after a round has deleted 10,000 files the next round's 10,000
creates cost 2-3 s of system CPU instead of 0.15-0.2 s, for whichever contender comes next
(perf evidence in bench/analysis.md). That noise swamped the small-file scenarios. The GPU
VM's scratch is a default (journaled) ext4 volume, so the bench's per-run scratch
(``work/runs``) is a sparse ext4 image mounted over loop for the run, trimmed between
scenarios and deleted afterwards.

Falls back to the host filesystem (and says so in the report) when not root, when
``mkfs.ext4``/loop devices are missing, in ``--quick`` runs, or with ``BENCH_SCRATCH=host``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

GiB = 1 << 30


def _mount_of(path: Path) -> tuple[str, str, str]:
    """(device, fstype, options) of the mount holding ``path`` (from /proc/self/mounts)."""
    best, found = "", ("?", "unknown", "")
    target = str(path.resolve())
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                dev, mnt, fstype, opts, *_ = line.split()
                inside = target == mnt or target.startswith(mnt.rstrip("/") + "/")
                if inside and len(mnt) > len(best):
                    best, found = mnt, (dev, fstype, opts)
    except OSError:
        pass
    return found


def _fstype(path: Path) -> str:
    _dev, fstype, opts = _mount_of(path)
    return f"{fstype} ({opts})"


def host_description(path: Path) -> str:
    dev, fstype, opts = _mount_of(path)
    if fstype != "ext4":
        return f"host filesystem {fstype} ({opts})"
    return f"host filesystem ext4 ({opts}), {'no journal' if _no_journal(dev) else 'journaled'}"


def _no_journal(dev: str) -> bool:
    """An ext4 with a journal has a jbd2 entry named after its device (``vda-8``)."""
    name = os.path.basename(os.path.realpath(dev))
    jbd2 = Path("/proc/fs/jbd2")
    return not (jbd2.is_dir() and any(p.name.startswith(name + "-") for p in jbd2.iterdir()))


def _image_size(work: Path, wanted: int) -> int:
    """Sparse, but ext4 may touch any block: never promise more than 3/4 of the free space."""
    free = shutil.disk_usage(work).free
    return min(wanted, free * 3 // 4) // GiB * GiB


def _usable(quick: bool) -> str | None:
    """Why a loop-mounted ext4 cannot be used here (None: it can)."""
    if quick:
        return "--quick"
    if os.environ.get("BENCH_SCRATCH", "") == "host":
        return "BENCH_SCRATCH=host"
    if os.geteuid() != 0:
        return "not root"
    for tool in ("mkfs.ext4", "mount", "umount", "losetup"):
        if shutil.which(tool) is None:
            return f"no {tool}"
    if not Path("/dev/loop-control").exists():
        return "no loop devices"
    return None


@contextmanager
def scratch_filesystem(work: Path, quick: bool, wanted: int = 48 * GiB) -> Iterator[str]:
    """Mount a fresh journaled ext4 at ``work/runs`` for the block; yield its description."""
    runs = work / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    why_not = _usable(quick)
    size = _image_size(work, wanted) if why_not is None else 0
    if why_not is None and size < 8 * GiB:
        why_not = f"only {size // GiB} GiB free for an image"
    if why_not is not None:
        yield f"{host_description(runs)} (no fresh ext4: {why_not})"
        return
    image = work / "scratch-ext4.img"
    _unmount_stale(runs, image)
    with open(image, "wb") as f:
        f.truncate(size)
    try:
        # Defaults as mkfs.ext4 gives a fresh Debian data volume (journal on); lazy init
        # would have a kernel thread zeroing inode tables during the first scenarios.
        subprocess.run(
            ["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", str(image)],
            check=True,
            capture_output=True,
        )
        subprocess.run(["mount", "-o", "loop", str(image), str(runs)], check=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        image.unlink(missing_ok=True)
        yield f"{host_description(runs)} (no fresh ext4: mount failed: {exc})"
        return
    try:
        yield f"fresh ext4 (journaled, {size // GiB} GiB sparse loop image): {_fstype(runs)}"
    finally:
        subprocess.run(["umount", str(runs)], check=False)
        image.unlink(missing_ok=True)


def _unmount_stale(runs: Path, image: Path) -> None:
    """A killed earlier run may have left its image mounted: take it down first."""
    if os.path.ismount(runs):
        subprocess.run(["umount", str(runs)], check=False)
    image.unlink(missing_ok=True)


def clear(runs: Path) -> None:
    """Empty ``runs`` (it may be a mount point) and give freed blocks back to the host."""
    if not runs.exists():
        return
    for child in runs.iterdir():
        if child.name == "lost+found":
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)
    if os.path.ismount(runs):
        # Why: without a trim the sparse image keeps every block ever written.
        subprocess.run(["fstrim", str(runs)], check=False, capture_output=True)
