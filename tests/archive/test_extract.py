"""Hostile-input tests for stagerd.archive.extract: crafted archives, byte-exact accounting."""

from __future__ import annotations

import errno
import io
import os
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from stagerd.archive.extract import FS_BLOCK, ExtractLimits, extract_tar
from stagerd.errors import ArchiveRejected, ScratchBudgetExceeded, TransientError
from stagerd.s3.fetch import FileSource


class BytesSource:
    """A ChunkSource over bytes in small odd chunks, to hit every boundary."""

    def __init__(self, data: bytes, chunk: int = 777) -> None:
        self._data = memoryview(data)
        self._pos = 0
        self._chunk = chunk

    def next_view(self, limit: int) -> memoryview:
        n = min(limit, self._chunk)
        view = self._data[self._pos : self._pos + n]
        self._pos += len(view)
        return view


class Meter:
    def __init__(self, limit: int | None = None) -> None:
        self.total = 0
        self.limit = limit

    def __call__(self, n: int) -> None:
        self.total += n
        if self.limit is not None and self.total > self.limit:
            raise ScratchBudgetExceeded(f"over {self.limit}")


def build(
    members: list[tuple[tarfile.TarInfo, bytes | None]], fmt: int = tarfile.PAX_FORMAT
) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info


def extract(data: bytes, dest: Path, **kw: object) -> tuple[object, Meter]:
    meter = kw.pop("meter", None) or Meter()
    stats = extract_tar(BytesSource(data), dest, charge=meter, **kw)  # type: ignore[arg-type]
    return stats, meter  # type: ignore[return-value]


def tree(root: Path) -> dict[str, bytes | None]:
    out: dict[str, bytes | None] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        out[rel] = path.read_bytes() if path.is_file() else None
    return out


def test_extracts_files_dirs_and_normalises_dot_paths(tmp_path: Path) -> None:
    data = build(
        [
            (member("./", tarfile.DIRTYPE), None),
            (member("./a", tarfile.DIRTYPE), None),
            (member("./a/one.wav"), b"1" * 1000),
            (member("b//c/./two.wav"), b"2" * 5000),
            (member("empty.wav"), b""),
        ]
    )
    stats, meter = extract(data, tmp_path / "in")
    assert tree(tmp_path / "in") == {
        "a": None,
        "a/one.wav": b"1" * 1000,
        "b": None,
        "b/c": None,
        "b/c/two.wav": b"2" * 5000,
        "empty.wav": b"",
    }
    assert (stats.files, stats.dirs, stats.bytes) == (3, 1, 6000)  # type: ignore[attr-defined]
    # Real bytes plus filesystem block rounding plus one block per directory member.
    assert meter.total == 6000 + (-1000 % FS_BLOCK) + (-5000 % FS_BLOCK) + FS_BLOCK
    assert stats.tar_bytes <= len(data)  # type: ignore[attr-defined]


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_long_names_via_gnu_and_pax_headers(tmp_path: Path, fmt: int) -> None:
    name = "/".join(["d" * 60] * 4) + "/" + "é" * 80 + ".wav"
    data = build([(member(name), b"x" * 10)], fmt=fmt)
    extract(data, tmp_path / "in")
    assert (tmp_path / "in" / name).read_bytes() == b"x" * 10


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("/etc/evil", "absolute"),
        ("../evil", "'..'"),
        ("a/../../evil", "'..'"),
        ("a/b/../../../evil", "'..'"),
    ],
)
def test_refuses_names_leaving_the_destination(tmp_path: Path, name: str, why: str) -> None:
    data = build([(member(name), b"pwned")])
    (tmp_path / "box").mkdir()
    with pytest.raises(ArchiveRejected, match=why):
        extract(data, tmp_path / "box" / "in")
    assert not (tmp_path / "evil").exists()
    assert not (tmp_path / "box" / "evil").exists()


@pytest.mark.parametrize(
    ("kind", "linkname", "what"),
    [
        (tarfile.SYMTYPE, "/etc", "symbolic link"),
        (tarfile.SYMTYPE, "inside.wav", "symbolic link"),
        (tarfile.LNKTYPE, "/etc/passwd", "hard link"),
        (tarfile.LNKTYPE, "ok.wav", "hard link"),
        (tarfile.CHRTYPE, "", "character device"),
        (tarfile.BLKTYPE, "", "block device"),
        (tarfile.FIFOTYPE, "", "fifo"),
    ],
)
def test_refuses_links_devices_and_fifos(
    tmp_path: Path, kind: bytes, linkname: str, what: str
) -> None:
    data = build([(member("ok.wav"), b"fine"), (member("link", kind, linkname), None)])
    with pytest.raises(ArchiveRejected, match=what):
        extract(data, tmp_path / "in")
    assert not (tmp_path / "in" / "link").exists()
    assert not (tmp_path / "in" / "link").is_symlink()


def test_symlink_then_write_through_it_never_escapes(tmp_path: Path) -> None:
    """The classic two-step escape: a symlink to outside, then a file "through" it."""
    outside = tmp_path / "outside"
    outside.mkdir()
    data = build(
        [(member("escape", tarfile.SYMTYPE, str(outside)), None), (member("escape/x"), b"pwn")]
    )
    with pytest.raises(ArchiveRejected, match="symbolic link"):
        extract(data, tmp_path / "in")
    assert list(outside.iterdir()) == []


def test_refuses_gnu_sparse_and_pax_sparse_members(tmp_path: Path) -> None:
    gnu = member("sparse.wav", tarfile.GNUTYPE_SPARSE)
    with pytest.raises(ArchiveRejected, match="sparse"):
        extract(build([(gnu, b"")], fmt=tarfile.GNU_FORMAT), tmp_path / "a")
    pax = member("sparse.wav")
    pax.pax_headers = {
        "GNU.sparse.major": "1",
        "GNU.sparse.minor": "0",
        "GNU.sparse.realsize": "9" * 12,
    }
    with pytest.raises(ArchiveRejected, match="sparse"):
        extract(build([(pax, b"")]), tmp_path / "b")


def test_member_count_is_capped(tmp_path: Path) -> None:
    data = build([(member(f"{i}.wav"), b"x") for i in range(6)])
    with pytest.raises(ArchiveRejected, match="more than 5 members"):
        extract(data, tmp_path / "in", limits=ExtractLimits(max_members=5))
    extract(data, tmp_path / "ok", limits=ExtractLimits(max_members=6))
    assert len(list((tmp_path / "ok").iterdir())) == 6


def test_lying_size_header_is_truncation_not_a_budget_blowout(tmp_path: Path) -> None:
    data = bytearray(build([(member("big.wav"), b"y" * 2048)]))
    header = tarfile.TarInfo("big.wav")
    header.size = 10 * 1024**3  # claims 10 GiB (base-256 size field), carries 2 KiB
    header.mode, header.mtime = 0o644, 0
    data[:512] = header.tobuf(tarfile.GNU_FORMAT)
    meter = Meter(limit=64 * 1024)
    with pytest.raises(ArchiveRejected, match="truncated"):
        extract(bytes(data), tmp_path / "in", meter=meter)
    assert meter.total <= len(data)


def test_budget_charge_failure_stops_extraction(tmp_path: Path) -> None:
    data = build([(member(f"{i}.wav"), b"z" * 100_000) for i in range(5)])
    meter = Meter(limit=250_000)
    with pytest.raises(ScratchBudgetExceeded):
        extract(data, tmp_path / "in", meter=meter)
    written = sum(p.stat().st_size for p in (tmp_path / "in").iterdir())
    assert written <= 250_000


def test_corrupt_header_and_garbage_are_rejected(tmp_path: Path) -> None:
    data = bytearray(build([(member("a.wav"), b"a" * 100)]))
    data[10] ^= 0xFF  # breaks the header checksum
    with pytest.raises(ArchiveRejected, match="corrupt tar header at byte 0"):
        extract(bytes(data), tmp_path / "a")
    with pytest.raises(ArchiveRejected, match=r"corrupt|truncated"):
        extract(os.urandom(4096), tmp_path / "b")


def test_truncated_archive_and_missing_end_marker(tmp_path: Path) -> None:
    data = build([(member("a.wav"), b"a" * 5000)])
    with pytest.raises(ArchiveRejected, match="truncated"):
        extract(data[:3000], tmp_path / "a")
    with pytest.raises(ArchiveRejected, match="truncated"):
        extract(data[: 512 + 5120], tmp_path / "b")  # data complete, no end-of-archive blocks
    with pytest.raises(ArchiveRejected, match="truncated"):
        extract(b"", tmp_path / "c")


def test_duplicate_member_and_file_dir_clash_are_rejected(tmp_path: Path) -> None:
    dup = build([(member("a.wav"), b"first"), (member("a.wav"), b"second")])
    with pytest.raises(ArchiveRejected, match="duplicates"):
        extract(dup, tmp_path / "a")
    assert (tmp_path / "a" / "a.wav").read_bytes() == b"first"
    clash = build([(member("d"), b"file"), (member("d/x.wav"), b"under a file")])
    with pytest.raises(ArchiveRejected, match="cannot be extracted safely"):
        extract(clash, tmp_path / "b")


def test_directory_member_with_data_is_rejected(tmp_path: Path) -> None:
    info = member("dir", tarfile.DIRTYPE)
    raw = bytearray(build([(info, None)]))
    fake = tarfile.TarInfo("dir")
    fake.type, fake.size = tarfile.DIRTYPE, 512
    raw[:512] = fake.tobuf(tarfile.USTAR_FORMAT)
    with pytest.raises(ArchiveRejected, match="carries data"):
        extract(bytes(raw), tmp_path / "a")


def _pax_block(payload: bytes) -> bytes:
    info = tarfile.TarInfo("././@PaxHeader")
    info.type, info.size = tarfile.XHDTYPE, len(payload)
    return info.tobuf(tarfile.USTAR_FORMAT) + payload + bytes(-len(payload) % 512)


def test_malformed_and_oversized_pax_headers_are_rejected(tmp_path: Path) -> None:
    body = build([(member("a.wav"), b"a")], fmt=tarfile.USTAR_FORMAT)
    for i, payload in enumerate([b"zz path=x\n", b"99 path=x\n", b"11 pathx\n\n", b"5 =\n"]):
        with pytest.raises(ArchiveRejected, match="malformed pax"):
            extract(_pax_block(payload) + body, tmp_path / f"m{i}")
    # The CVE-2024-6232 shape (many near-records) is capped by size and parsed linearly.
    huge = b"1 " + b"0" * (2 * 1024**2)
    with pytest.raises(ArchiveRejected, match="at most"):
        extract(_pax_block(huge) + body, tmp_path / "huge")
    ok = _pax_block(b"20 path=renamed.wav\n") + body
    extract(ok, tmp_path / "ok")
    assert (tmp_path / "ok" / "renamed.wav").read_bytes() == b"a"


def test_nul_in_pax_path_and_overlong_names_are_rejected(tmp_path: Path) -> None:
    body = build([(member("a.wav"), b"a")], fmt=tarfile.USTAR_FORMAT)
    with pytest.raises(ArchiveRejected, match="NUL"):
        extract(_pax_block(b"13 path=a\x00/b\n") + body, tmp_path / "a")
    deep = "/".join(["d"] * 100) + "/f.wav"
    with pytest.raises(ArchiveRejected, match="nested"):
        extract(build([(member(deep), b"x")]), tmp_path / "b")


def test_disk_errors_map_to_transient(tmp_path: Path) -> None:
    def full(_n: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    data = build([(member("a.wav"), b"a" * 100)])
    with pytest.raises(TransientError, match="scratch disk full"):
        extract_tar(BytesSource(data), tmp_path / "in", charge=full)


def test_file_source_and_no_symlink_following_in_destination(tmp_path: Path) -> None:
    data = build([(member("sub/a.wav"), b"a" * 3000)])
    archive = tmp_path / "a.tar"
    archive.write_bytes(data)
    fd = os.open(archive, os.O_RDONLY)
    try:
        extract_tar(FileSource(fd), tmp_path / "in", charge=Meter())
    finally:
        os.close(fd)
    assert (tmp_path / "in" / "sub" / "a.wav").read_bytes() == b"a" * 3000
    # A destination that already exists (e.g. planted as a symlink) is never written into.
    (tmp_path / "target").mkdir()
    (tmp_path / "planted").symlink_to(tmp_path / "target")
    with pytest.raises(TransientError, match="already exists"):
        extract_tar(BytesSource(data), tmp_path / "planted", charge=Meter())
    assert list((tmp_path / "target").iterdir()) == []


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A real 1 MiB tmpfs, for a real ENOSPC (needs root, as in CI and the dev container)."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_real_enospc_is_transient_with_a_clear_reason(tiny_fs: Path) -> None:
    data = build([(member(f"{i}.wav"), b"w" * 300_000) for i in range(5)])
    with pytest.raises(TransientError, match="scratch disk full while writing member"):
        extract_tar(BytesSource(data, chunk=65536), tiny_fs / "in", charge=Meter())
