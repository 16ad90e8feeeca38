"""Walking and removing trees: links are never followed, deep trees are fine."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from stagerd.scratch.fstree import disk_usage, remove_tree
from stagerd.scratch.locks import FileLock


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    models = tmp_path / "models"
    (models / "gemma").mkdir(parents=True)
    (models / "gemma" / "weights.bin").write_bytes(b"w" * 50_000)
    return models


def _root_fd(path: Path) -> int:
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY)


def test_remove_tree_unlinks_links_and_never_follows_them(tmp_path: Path, outside: Path) -> None:
    root = tmp_path / "scratch"
    batch = root / "b1" / "input"
    batch.mkdir(parents=True)
    (batch / "a.wav").write_bytes(b"a" * 20_000)
    (batch / "models").symlink_to(outside)
    (batch / "weights").symlink_to(outside / "gemma" / "weights.bin")
    (root / "link-to-models").symlink_to(outside)
    fd = _root_fd(root)
    try:
        usage = disk_usage("b1", fd)
        assert usage >= 20_000 and usage < 50_000  # the link target is not counted
        assert remove_tree("b1", fd) == usage
        assert remove_tree("link-to-models", fd) >= 0
    finally:
        os.close(fd)
    assert os.listdir(root) == []
    assert (outside / "gemma" / "weights.bin").stat().st_size == 50_000


def test_remove_tree_handles_nesting_deeper_than_the_recursion_limit(tmp_path: Path) -> None:
    root = tmp_path / "scratch"
    root.mkdir()
    fd = _root_fd(root)
    try:
        os.mkdir("deep", dir_fd=fd)
        cur = os.open("deep", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        for _ in range(1200):
            os.mkdir("d", dir_fd=cur)
            nxt = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=cur)
            os.close(cur)
            cur = nxt
        with open(os.open("f", os.O_WRONLY | os.O_CREAT, dir_fd=cur), "wb") as f:
            f.write(b"x")
        os.close(cur)
        assert remove_tree("deep", fd) > 0
    finally:
        os.close(fd)
    assert os.listdir(root) == []


def test_remove_tree_of_a_plain_file_and_a_missing_one(tmp_path: Path) -> None:
    (tmp_path / "stray.tar").write_bytes(b"t" * 9000)
    fd = _root_fd(tmp_path)
    try:
        assert remove_tree("stray.tar", fd) >= 9000
        with pytest.raises(FileNotFoundError):
            remove_tree("stray.tar", fd)
    finally:
        os.close(fd)


def test_file_lock_non_blocking_and_timeout(tmp_path: Path) -> None:
    from stagerd.errors import ScratchUnavailable

    first, second = FileLock(tmp_path / "l"), FileLock(tmp_path / "l")
    assert first.acquire(blocking=False) and first.held
    assert not second.acquire(blocking=False)
    with pytest.raises(ScratchUnavailable):
        second.acquire(timeout=0.05)
    first.release()
    with second:
        assert second.held
    assert not second.held


UNPRIV_REMOVE = """
import os, stat, sys
from stagerd.scratch import fstree
base = sys.argv[1]
outside = os.path.join(base, "outside")
os.makedirs(os.path.join(outside, "keep"))
os.chmod(outside, 0o555)
tree = os.path.join(base, "tree")
os.makedirs(os.path.join(tree, "ro/deeper"))
open(os.path.join(tree, "ro/deeper/f"), "w").write("x")
os.makedirs(os.path.join(tree, "zero/inner"))
os.makedirs(os.path.join(tree, "wx"))
os.symlink(outside, os.path.join(tree, "ro/link-out"))
os.chmod(os.path.join(tree, "ro/deeper"), 0o555)
os.chmod(os.path.join(tree, "ro"), 0o555)
os.chmod(os.path.join(tree, "zero/inner"), 0)
os.chmod(os.path.join(tree, "zero"), 0)
os.chmod(os.path.join(tree, "wx"), 0o333)
os.chmod(tree, 0o555)
fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY)
fstree.remove_tree("tree", fd)
print(oct(stat.S_IMODE(os.stat(outside).st_mode)), os.path.exists(tree),
      os.path.isdir(os.path.join(outside, "keep")))
"""


def test_remove_tree_as_an_unprivileged_user_restores_owner_rights_never_through_links() -> None:
    """Root's DAC override would hide this: run as the unprivileged user (tests/unpriv.py)."""
    import shutil
    import subprocess

    from tests.conftest import ROOT
    from tests.unpriv import as_user, remove_user_dir, user_dir

    # stdlib + stagerd only: the system python3 is one the user can always run.
    python = shutil.which("python3", path="/usr/bin:/bin") or "python3"
    base = user_dir("stagerd-fstree-")
    try:
        done = subprocess.run(
            as_user(["env", f"PYTHONPATH={ROOT}", python, "-c", UNPRIV_REMOVE, str(base)]),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        # The link's target kept its 0555: chmod never went through the symlink.
        assert done.stdout.split() == ["0o555", "False", "True"]
    finally:
        remove_user_dir(base)
