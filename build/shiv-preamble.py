"""shiv preamble of dist/stagerd: runs after shiv has unpacked site-packages, before stagerd.

shiv runs this file with three globals injected: ``archive`` (path of the zipapp), ``env``
(shiv's Environment, with ``build_id``) and ``site_packages`` (this build's extraction).

1. Refuse a Python minor version other than the one the artifact was built for: its binary
   wheels (psycopg-binary, pydantic-core) only load there, and a clear line beats an
   ImportError deep inside a job.
2. Refuse, in one line naming what is missing, when a locked dependency that the running
   micro release needs cannot be found (async-timeout below 3.11.3: the lock says which
   releases need what, and ``_build.REQUIRES`` carries that table into the artifact).
   Checked with ``find_spec``, which locates without importing: it costs milliseconds.
3. Keep a shared ``flock`` on this build's extraction for the life of the process, so a
   newer build never deletes files a running worker still imports lazily.
4. Prune the extractions of other builds that nobody holds: every upgrade unpacks a new
   ``stagerd_<build id>`` under SHIV_ROOT, and without this a VM's cache grows forever.

Pruning is best effort (any OSError leaves the old extraction for the next run) and can be
switched off with ``STAGERD_SHIV_PRUNE=0``.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
import shutil
import sys
from pathlib import Path

REEXEC_GUARD = "STAGERD_SHIV_REEXEC"


def check_python() -> None:
    try:
        from stagerd import _build
    except ImportError:
        return
    built_for = str(getattr(_build, "PYTHON_VERSION", ""))
    running = f"{sys.version_info[0]}.{sys.version_info[1]}"
    if built_for and built_for != running:
        sys.stderr.write(
            f"stagerd: error: this artifact was built for Python {built_for} but runs on "
            f"{running} ({sys.executable}); rebuild it with "
            f"build/shiv.sh --python-version {running}, or point its shebang at python{built_for}\n"
        )
        sys.exit(2)


def missing_requirements(table: list[list[object]], micro: int) -> list[str]:
    """The pins of *table* (``[requirement, import name, micros]``) that this micro
    release needs and cannot find, as ``"requirement (import name)"``."""
    missing = []
    for requirement, module, micros in table:
        if not isinstance(micros, list) or micro not in micros:
            continue
        try:
            found = importlib.util.find_spec(str(module)) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(f"{requirement} (import {module})")
    return missing


def check_requirements() -> None:
    try:
        from stagerd import _build
    except ImportError:
        return
    table = getattr(_build, "REQUIRES", None)
    if not isinstance(table, list):
        return
    missing = missing_requirements(table, sys.version_info[2])
    if missing:
        running = ".".join(str(part) for part in sys.version_info[:3])
        sys.stderr.write(
            f"stagerd: error: this artifact lacks {', '.join(missing)}, which Python "
            f"{running} needs; rebuild it with build/shiv.sh from the committed lock\n"
        )
        sys.exit(2)


def hold_extraction(current: Path) -> bool:
    """Take a shared lock on our extraction; False if a pruner removed it under us."""
    try:
        fd = os.open(current, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        return False
    except OSError:
        return True
    # The descriptor is deliberately never closed: the lock lasts as long as the process.
    # os.open descriptors are not inherited, so processors started by stagerd do not hold it.
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
    except OSError:
        os.close(fd)
    return True


def _try_lock(path: Path, flags: int) -> int | None:
    try:
        fd = os.open(path, flags)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def prune_build(root: Path, name: str, build_id: str) -> None:
    """Remove one other build's extraction if no process uses or extracts it."""
    lock_path = root / f".{name}_{build_id}_lock"
    # shiv holds this lock while it extracts; holding it ourselves keeps shiv out meanwhile.
    lock_fd = _try_lock(lock_path, os.O_RDWR | os.O_CREAT)
    if lock_fd is None:
        return
    try:
        target = root / f"{name}_{build_id}"
        if target.is_dir():
            dir_fd = _try_lock(target, os.O_RDONLY | os.O_DIRECTORY)
            if dir_fd is None:
                return  # a process of that build is running
            # Rename first: a process of that build starting now re-extracts instead of
            # importing from a half-deleted tree.
            doomed = root / f".{name}_{build_id}.prune-{os.getpid()}"
            os.rename(target, doomed)
            os.close(dir_fd)
            shutil.rmtree(doomed, ignore_errors=True)
        shutil.rmtree(root / f"{name}_{build_id}.tmp", ignore_errors=True)
        lock_path.unlink(missing_ok=True)
    finally:
        os.close(lock_fd)


def prune(current: Path, build_id: str) -> None:
    root = current.parent
    name = current.name[: -(len(build_id) + 1)]
    others = set()
    for entry in root.iterdir():
        if entry.is_symlink() or not entry.name.startswith(f"{name}_"):
            continue
        other = entry.name[len(name) + 1 :].removesuffix(".tmp")
        if other and other != build_id and "/" not in other:
            others.add(other)
    for other in sorted(others):
        try:
            prune_build(root, name, other)
        except OSError:
            continue


def main(site_packages: Path, build_id: str) -> None:
    check_python()
    check_requirements()
    current = site_packages.parent
    if not hold_extraction(current):
        # A pruner removed our extraction between shiv's check and now: start over once,
        # and shiv extracts again.
        if os.environ.get(REEXEC_GUARD) != "1":
            os.environ[REEXEC_GUARD] = "1"
            os.execv(sys.executable, sys.orig_argv)
        sys.stderr.write(f"stagerd: error: extraction {current} vanished; retry\n")
        sys.exit(1)
    os.environ.pop(REEXEC_GUARD, None)
    if os.environ.get("STAGERD_SHIV_PRUNE", "1") != "0":
        with contextlib.suppress(OSError):  # best effort: the next run tries again
            prune(current, build_id)


main(Path(globals()["site_packages"]), str(globals()["env"].build_id))
