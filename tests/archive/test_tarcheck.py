from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest

from stagerd.archive.tarcheck import check_tar
from stagerd.errors import ArchiveRejected


def make_tar(
    path: Path, files: int = 3, *, fmt: int = tarfile.PAX_FORMAT, size: int = 1000
) -> Path:
    with tarfile.open(path, "w", format=fmt) as tar:
        dirinfo = tarfile.TarInfo("batch")
        dirinfo.type = tarfile.DIRTYPE
        tar.addfile(dirinfo)
        for i in range(files):
            data = os.urandom(size + i)
            # Long names force pax/GNU long-name headers, which must not count as files.
            info = tarfile.TarInfo(f"batch/{'x' * 120}-{i}.wav")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_counts_regular_files_only(tmp_path: Path, fmt: int) -> None:
    if fmt == tarfile.USTAR_FORMAT:
        path = tmp_path / "a.tar"
        with tarfile.open(path, "w", format=fmt) as tar:
            for i in range(4):
                info = tarfile.TarInfo(f"f{i}")
                info.size = 10
                tar.addfile(info, io.BytesIO(b"0123456789"))
        assert check_tar(path).file_count == 4
        return
    summary = check_tar(make_tar(tmp_path / "a.tar", files=5, fmt=fmt))
    assert summary.file_count == 5
    assert summary.members == 6  # dir + 5 files


def test_pax_size_record_overrides_header(tmp_path: Path) -> None:
    path = tmp_path / "pax.tar"
    data = b"y" * 3000
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("f")
        info.size = len(data)
        info.pax_headers = {"size": str(len(data))}
        tar.addfile(info, io.BytesIO(data))
        info2 = tarfile.TarInfo("g")
        info2.size = 1
        tar.addfile(info2, io.BytesIO(b"z"))
    assert check_tar(path).file_count == 2


@pytest.mark.parametrize("cut", [100, 512, 1500, -1024, -1])
def test_truncated_archive_refused(tmp_path: Path, cut: int) -> None:
    full = make_tar(tmp_path / "full.tar", files=2, size=5000).read_bytes()
    # Python pads to a 10 KiB record; cut inside the content or the end marker itself.
    content_end = len(full.rstrip(b"\x00"))
    data = full[:cut] if cut > 0 else full[: content_end + 512 + cut]
    path = tmp_path / "cut.tar"
    path.write_bytes(data)
    with pytest.raises(ArchiveRejected, match=r"truncated|corrupt|not a tar"):
        check_tar(path)


def test_missing_second_end_block_is_truncated(tmp_path: Path) -> None:
    full = make_tar(tmp_path / "full.tar", files=1, size=512).read_bytes()
    content_end = len(full.rstrip(b"\x00"))
    content_end += -content_end % 512
    path = tmp_path / "one-zero.tar"
    path.write_bytes(full[: content_end + 512])
    with pytest.raises(ArchiveRejected, match="truncated"):
        check_tar(path)
    path.write_bytes(full[: content_end + 1024])
    assert check_tar(path).file_count == 1


def test_empty_file_refused(tmp_path: Path) -> None:
    path = tmp_path / "empty.tar"
    path.write_bytes(b"")
    with pytest.raises(ArchiveRejected, match="empty"):
        check_tar(path)


def test_archive_without_files_refused(tmp_path: Path) -> None:
    path = tmp_path / "nothing.tar"
    with tarfile.open(path, "w"):
        pass
    with pytest.raises(ArchiveRejected, match="no regular files"):
        check_tar(path)


@pytest.mark.parametrize("content", [b"hello world\n" * 100, os.urandom(4096), b"\x1f\x8b" * 600])
def test_non_tar_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "x.tar"
    path.write_bytes(content)
    with pytest.raises(ArchiveRejected, match="not a tar archive"):
        check_tar(path)


def test_corrupt_later_header(tmp_path: Path) -> None:
    data = bytearray(make_tar(tmp_path / "a.tar", files=3, fmt=tarfile.GNU_FORMAT).read_bytes())
    # Damage the name of the second header (after the dir header at 0).
    data[512 + 1] ^= 0xFF
    path = tmp_path / "bad.tar"
    path.write_bytes(bytes(data))
    with pytest.raises(ArchiveRejected, match="corrupt tar archive"):
        check_tar(path)


def test_base256_size_field(tmp_path: Path) -> None:
    data = b"q" * 700
    path = tmp_path / "b256.tar"
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        info = tarfile.TarInfo("f")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    raw = bytearray(path.read_bytes())
    field = bytearray(12)
    field[0] = 0x80
    field[1:] = len(data).to_bytes(11, "big")
    raw[124:136] = field
    raw[148:156] = b" " * 8
    checksum = sum(raw[:512])
    raw[148:156] = f"{checksum:06o}\x00 ".encode()
    path.write_bytes(bytes(raw))
    assert check_tar(path).file_count == 1


def test_missing_file_raises_oserror(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        check_tar(tmp_path / "nope.tar")


@pytest.mark.parametrize(
    ("kind", "why"),
    [
        (tarfile.SYMTYPE, "symbolic link"),
        (tarfile.LNKTYPE, "hard link"),
        (tarfile.FIFOTYPE, "fifo"),
    ],
)
def test_members_extraction_refuses_are_refused_before_upload(
    tmp_path: Path, kind: bytes, why: str
) -> None:
    # One parser on both sides: what the worker would refuse never gets uploaded.
    path = make_tar(tmp_path / "a.tar", files=1)
    with tarfile.open(path, "a") as tar:
        link = tarfile.TarInfo("batch/link")
        link.type = kind
        link.linkname = "batch/a.wav"
        tar.addfile(link)
    with pytest.raises(ArchiveRejected, match=why):
        check_tar(path)
