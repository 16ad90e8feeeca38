"""Play N live workers: create N batch dirs under a scratch root and hold a flock on each.

``python -m bench.lockholder ROOT N PREFIX``: creates ROOT/PREFIX-00000..., takes an
exclusive ``flock`` on every directory (the scratch manager's liveness rule), backdates them
so only the lock protects them, prints ``ready`` and holds until stdin closes.
"""

from __future__ import annotations

import fcntl
import os
import resource
import sys
import time
from pathlib import Path

OLD = time.time() - 3 * 3600


def main(root: str, count: int, prefix: str) -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < count + 64:
        raise SystemExit(f"need {count + 64} open files, the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    fds = []
    for i in range(count):
        path = Path(root) / f"{prefix}-{i:05d}"
        path.mkdir()
        (path / "input.wav").write_bytes(b"RIFF" + bytes(60))
        os.utime(path / "input.wav", (OLD, OLD))
        os.utime(path, (OLD, OLD))
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(fd, fcntl.LOCK_EX)
        fds.append(fd)
    print("ready", flush=True)
    sys.stdin.read()  # hold every lock until the harness closes our stdin


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
