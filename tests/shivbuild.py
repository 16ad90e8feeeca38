"""Build dist/stagerd once per test session and share it between test modules.

A build takes 10-30 s, so the artifact is cached on disk by its build id (a digest of every
input: sources, lock, build scripts, target), under ``build/work/test-artifacts/<id>/``.
An unchanged tree reuses the previous session's artifact; any change builds afresh.
"""

from __future__ import annotations

import atexit
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHIV_SH = ROOT / "build" / "shiv.sh"
CACHE = ROOT / "build" / "work" / "test-artifacts"


@dataclass(frozen=True)
class Artifact:
    """A built zipapp and what the build said about it."""

    path: Path
    build_id: str
    sha256: str


_session: dict[str, Artifact] = {}


def run_shiv_sh(
    args: list[str], *, env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    """Run build/shiv.sh with this interpreter as the build Python."""
    full_env = {**os.environ, "BUILD_PYTHON": sys.executable, **(env or {})}
    return subprocess.run(
        ["bash", str(SHIV_SH), *args],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def current_build_id(extra: list[str] | None = None) -> str:
    done = run_shiv_sh(["--print-build-id", *(extra or [])], timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"shiv.sh --print-build-id failed:\n{done.stderr}")
    return done.stdout.strip()


def build(output: Path, *, work: Path, extra: list[str] | None = None) -> Artifact:
    """Run a full build into *output*; raise with shiv.sh's stderr if it fails."""
    done = run_shiv_sh(["--output", str(output), "--work", str(work), *(extra or [])])
    if done.returncode != 0:
        raise RuntimeError(f"build/shiv.sh failed ({done.returncode}):\n{done.stderr}")
    build_id = current_build_id(extra)
    return Artifact(output, build_id, sha256_of(output))


def session_artifact() -> Artifact:
    """The artifact of the current tree, built at most once per session (and per tree)."""
    build_id = current_build_id()
    if build_id in _session:
        return _session[build_id]
    out = CACHE / build_id / "stagerd"
    checksum = out.with_name("stagerd.sha256")
    CACHE.mkdir(parents=True, exist_ok=True)
    # Parallel test workers (pytest -n) share the cache: one builds, the others wait.
    with open(CACHE.parent / "test-artifacts.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        fresh = (
            out.is_file()
            and checksum.is_file()
            and checksum.read_text().split()[0] == sha256_of(out)
        )
        if not fresh:
            # Keep one cached artifact: older trees' builds are 27 MB each.
            for old in CACHE.iterdir():
                if old.name != build_id:
                    shutil.rmtree(old, ignore_errors=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            build(out, work=ROOT / "build" / "work")
    artifact = Artifact(out, build_id, sha256_of(out))
    _session[build_id] = artifact
    return artifact


_roots: list[Path] = []


def session_shiv_root() -> Path:
    """One SHIV_ROOT for the whole session, so the artifact unpacks and compiles once."""
    if not _roots:
        path = Path(tempfile.mkdtemp(prefix="stagerd-shiv-root-"))
        atexit.register(shutil.rmtree, path, ignore_errors=True)
        _roots.append(path)
    return _roots[0]
