"""Generate a batch archive of N valid PCM WAV files, byte-for-byte deterministic per seed.

``python -m stagerd.samples.makebatch OUT.tar --files N [--seed S] [--file-bytes 16MiB]``
prints one JSON line ``{"path", "files", "size", "sha256"}`` (the ``size``/``sha256`` a
producer puts in the job payload).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import random
import struct
import sys
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from stagerd.units import parse_size

_HEADER_BYTES = 44
_NOISE_BLOCK = 1024**2  # random bytes generated per file, tiled beyond (fast for big files)
_MTIME = 1_700_000_000  # fixed, so the archive bytes depend on the seed alone


@dataclass(frozen=True)
class BatchInfo:
    """The archive written: path, member count, byte size and SHA-256 hex."""

    path: Path
    files: int
    size: int
    sha256: str


def wav_bytes(
    rng: random.Random, data_bytes: int, *, rate: int = 16000, channels: int = 1
) -> bytes:
    """A 16-bit PCM WAV file whose data chunk holds *data_bytes* of noise (frame-aligned)."""
    frame = 2 * channels
    data_bytes -= data_bytes % frame
    noise = rng.randbytes(min(data_bytes, _NOISE_BLOCK))
    if noise:
        noise = (noise * (data_bytes // len(noise) + 1))[:data_bytes]
    header = b"RIFF" + struct.pack("<I", 36 + data_bytes) + b"WAVE"
    header += b"fmt " + struct.pack("<IHHIIHH", 16, 1, channels, rate, rate * frame, frame, 16)
    header += b"data" + struct.pack("<I", data_bytes)
    return header + noise


def make_batch(
    out: Path,
    files: int,
    *,
    seed: int = 0,
    file_bytes: int = 32044,
    rate: int = 16000,
    channels: int = 1,
) -> BatchInfo:
    """Write *files* WAVs of about *file_bytes* each (``000001.wav``...) into the tar *out*."""
    rng = random.Random(seed)
    data_bytes = max(file_bytes - _HEADER_BYTES, 0)
    with tarfile.open(out, "w", format=tarfile.USTAR_FORMAT) as tar:
        for index in range(1, files + 1):
            payload = wav_bytes(rng, data_bytes, rate=rate, channels=channels)
            info = tarfile.TarInfo(f"{index:06d}.wav")
            info.size = len(payload)
            info.mtime = _MTIME
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(payload))
    digest = hashlib.sha256()
    with out.open("rb") as fh:
        while chunk := fh.read(1024**2):
            digest.update(chunk)
    return BatchInfo(path=out, files=files, size=out.stat().st_size, sha256=digest.hexdigest())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stagerd.samples.makebatch")
    parser.add_argument("out", type=Path, help="archive to write (OUT.tar)")
    parser.add_argument("--files", type=int, required=True, help="number of WAV files")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--file-bytes", default="32044", help="bytes per file (e.g. 16MiB)")
    parser.add_argument("--rate", type=int, default=16000, help="sample rate (Hz)")
    parser.add_argument("--channels", type=int, default=1)
    args = parser.parse_args(argv)
    try:
        file_bytes = parse_size(args.file_bytes)
    except ValueError as exc:
        parser.error(str(exc))
    if args.files < 0 or args.rate <= 0 or args.channels <= 0:
        parser.error("--files, --rate and --channels must be positive")
    info = make_batch(
        args.out, args.files, seed=args.seed, file_bytes=file_bytes, rate=args.rate,
        channels=args.channels,
    )  # fmt: skip
    out = {"path": str(info.path), "files": info.files, "size": info.size, "sha256": info.sha256}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
