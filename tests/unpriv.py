"""Running stagerd as an unprivileged user, as the unit's ``User=stagerd`` does.

Root's DAC override hides permission bugs (a 0555 dir is removable by root), so tests
where permissions matter run the worker or the janitor as ``stagerd-test``:

- :func:`ensure_user` creates that system user when the tests run as root (``useradd``);
  run as any other user, the tests run as that user instead, unchanged;
- :func:`as_user` prefixes a command with ``setpriv --reuid/--regid --init-groups``;
- :func:`user_dir` makes a fresh directory under ``/tmp`` owned by the user (pytest's own
  ``tmp_path`` is root-only). The venv and this checkout only need to be world-readable,
  which they are (``build/venv.sh`` creates them 0755/0644).

On a host whose venv points at a Python under ``/root`` (pyenv), the user cannot exec that
link; the hostile tests then run the worker on the system's python3 of the same minor
version with this checkout and the venv's site-packages on ``PYTHONPATH``. On a 3.11 older
than 3.11.3 redis-py wants ``async-timeout`` (``.venv/bin/python -m pip install
async-timeout``). :func:`require_usable_venv` checks and says so instead of failing oddly.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

USER = "stagerd-test"


def ensure_user() -> tuple[int, int]:
    """(uid, gid) the unprivileged runs use; creates ``stagerd-test`` if root."""
    if os.geteuid() != 0:
        return os.geteuid(), os.getegid()
    try:
        entry = pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", USER],
            check=False,
            capture_output=True,
        )
        entry = pwd.getpwnam(USER)
    return entry.pw_uid, entry.pw_gid


def require_usable_venv(python: str, pythonpath: str) -> None:
    """Fail the test, saying how to fix it, if the user cannot import stagerd's deps."""
    probe = subprocess.run(
        as_user(
            ["env", f"PYTHONPATH={pythonpath}", python, "-c", "import redis, psycopg, stagerd"]
        ),
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["?"])[-1]
        raise AssertionError(
            f"{USER} cannot run this venv ({last}); see tests/unpriv.py for the fix"
        )


def as_user(argv: list[str]) -> list[str]:
    """*argv* run as the unprivileged user (as is when not root)."""
    if os.geteuid() != 0:
        return argv
    setpriv = shutil.which("setpriv") or "setpriv"
    return [setpriv, f"--reuid={USER}", f"--regid={USER}", "--init-groups", "--", *argv]


def user_dir(prefix: str) -> Path:
    """A fresh directory owned by the user (remove it with :func:`remove_user_dir`)."""
    uid, gid = ensure_user()
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    os.chown(path, uid, gid)
    return path


def remove_user_dir(path: Path) -> None:
    """Best-effort teardown, as root (a failed test may leave 0000 dirs behind)."""
    for root, dirs, _files in os.walk(path):
        for name in dirs:
            full = os.path.join(root, name)
            if not os.path.islink(full):
                os.chmod(full, 0o700)
    shutil.rmtree(path, ignore_errors=True)
