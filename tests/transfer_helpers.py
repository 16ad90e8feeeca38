"""Helpers for the transfer tests: streamed tar archives.

``write_tar`` writes a valid archive of random members without holding it in memory. Faults
and slow links come from tests/faultproxy.py (``throttle_up``, ``fail_first``).
"""

from __future__ import annotations

import os
import tarfile
from pathlib import Path


def write_tar(path: Path, total: int, *, members: int = 4) -> Path:
    """A tar of *members* random files adding up to about *total* bytes."""
    each = max(1, total // members)
    with open(path, "wb") as out:
        for i in range(members):
            info = tarfile.TarInfo(f"batch/item-{i:04d}.wav")
            info.size = each
            out.write(info.tobuf(format=tarfile.GNU_FORMAT))
            left = each
            while left:
                n = min(left, 8 * 1024 * 1024)
                out.write(os.urandom(n))
                left -= n
            out.write(bytes(-each % 512))
        out.write(bytes(1024))
    return path
