"""Generate the benchmark's archives: WAV-sized members, many small files, tiny batches.

Archives are cached under ``bench/work/data`` by their spec (name encodes sizes), with a
sidecar JSON holding size, SHA-256, member count and extracted bytes, so a second run does
not spend a minute writing 2 GiB again. Member payloads are slices of one random pool at
different offsets: incompressible like real audio, cheap to produce.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import struct
import tarfile
from dataclasses import asdict, dataclass
from pathlib import Path

POOL_BYTES = 64 * 1024 * 1024
WAV_HEADER = 44


@dataclass(frozen=True)
class Archive:
    path: Path
    size: int
    sha256: str
    members: int
    extracted_bytes: int


class _Pool:
    """A random byte pool; ``take(n, seed)`` returns n bytes starting at a seed-chosen offset."""

    def __init__(self, nbytes: int) -> None:
        self.data = os.urandom(nbytes)
        self.doubled = memoryview(self.data + self.data)

    def take(self, n: int, seed: int) -> bytes:
        out = bytearray()
        offset = (seed * 7_919 * 4096) % len(self.data)
        while len(out) < n:
            chunk = min(n - len(out), len(self.data))
            out += self.doubled[offset : offset + chunk]
            offset = 0
        return bytes(out)


def wav_bytes(total: int, pool: _Pool, seed: int) -> bytes:
    """A valid 16-bit stereo 48 kHz PCM WAV file of exactly *total* bytes."""
    data_len = total - WAV_HEADER
    header = b"RIFF" + struct.pack("<I", 36 + data_len) + b"WAVE"
    header += b"fmt " + struct.pack("<IHHIIHH", 16, 1, 2, 48_000, 48_000 * 4, 4, 16)
    header += b"data" + struct.pack("<I", data_len)
    return header + pool.take(data_len, seed)


def _write(path: Path, members: list[tuple[str, int]], pool: _Pool) -> Archive:
    """Write a tar of *members* (name, size) atomically, hashing it afterwards."""
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_suffix(".tar.part")
    with tarfile.open(part, "w", format=tarfile.GNU_FORMAT) as tar:
        for i, (name, size) in enumerate(members):
            info = tarfile.TarInfo(name)
            info.size = size
            info.mtime = 1_700_000_000
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(wav_bytes(size, pool, i)))
    digest = hashlib.sha256()
    with open(part, "rb") as f:
        while chunk := f.read(8 * 1024 * 1024):
            digest.update(chunk)
    os.replace(part, path)
    extracted = sum(s for _, s in members)
    meta = Archive(path, path.stat().st_size, digest.hexdigest(), len(members), extracted)
    sidecar = {**asdict(meta), "path": str(path)}
    path.with_suffix(".json").write_text(json.dumps(sidecar))
    return meta


def _cached(path: Path) -> Archive | None:
    sidecar = path.with_suffix(".json")
    if not (path.exists() and sidecar.exists()):
        return None
    meta = json.loads(sidecar.read_text())
    if path.stat().st_size != meta["size"]:
        return None
    return Archive(path, meta["size"], meta["sha256"], meta["members"], meta["extracted_bytes"])


@functools.cache
def _pool() -> _Pool:
    """One pool per process, made on first use (cached data needs none)."""
    return _Pool(POOL_BYTES)


def wav_archive(data_dir: Path, total: int, member: int) -> Archive:
    """An archive of about *total* bytes made of *member*-byte WAV files."""
    path = data_dir / f"wav-{total}-{member}.tar"
    if cached := _cached(path):
        return cached
    count = max(2, total // (member + 512))
    return _write(path, [(f"audio/clip_{i:05d}.wav", member) for i in range(count)], _pool())


def small_archive(data_dir: Path, count: int, size: int) -> Archive:
    """An archive of *count* small WAV files of *size* bytes each, in 100 subdirectories."""
    path = data_dir / f"small-{count}-{size}.tar"
    if cached := _cached(path):
        return cached
    names = [(f"small/d{i % 100:02d}/f_{i:05d}.wav", size) for i in range(count)]
    return _write(path, names, _pool())


def tiny_batches(data_dir: Path, count: int, size: int = 4096) -> list[Archive]:
    """*count* tiny archives of one small WAV each (the tiny-batch throughput scenario)."""
    out = []
    for i in range(count):
        path = data_dir / "tiny" / f"tiny-{i:04d}-{size}.tar"
        out.append(_cached(path) or _write(path, [(f"clip_{i:04d}.wav", size)], _pool()))
    return out


def sized_archive(data_dir: Path, total: int) -> Archive:
    """An archive of about *total* bytes in 4 members (prefetch: staging time by size)."""
    member = max(64 * 1024, total // 4)
    path = data_dir / f"sized-{total}.tar"
    if cached := _cached(path):
        return cached
    return _write(path, [(f"audio/part_{i}.wav", member) for i in range(4)], _pool())
