"""Byte streams between the edges: what staging reads from S3 and extraction consumes.

S3's fetch produces a :class:`ChunkSource`; the archive extractor consumes one. The protocol
lives here, below both, so neither edge imports the other.
"""

from __future__ import annotations

import os
from typing import Protocol

CHUNK = 1024**2  # the read size on both sides of a stream (1 MiB)


class ChunkSource(Protocol):
    """Sequential bytes as views: up to *limit* bytes, empty at end of data.

    A returned view is valid only until the next call.
    """

    def next_view(self, limit: int) -> memoryview: ...


def write_all(fd: int, view: memoryview) -> None:
    """os.write until every byte of *view* is written (short writes happen on signals)."""
    while view:
        n = os.write(fd, view)
        view = view[n:]
