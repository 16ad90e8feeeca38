"""The hostile corpus (issue 16): archives and payloads each found to break something once.

``hostile_archives()`` and ``hostile_payloads()`` build every case from code, so a case
is readable and reviewable here rather than an opaque blob; ``write_corpus()`` saves them
under ``tests/corpus/archives`` and ``tests/corpus/payloads`` (what the fuzzers seed
from). Grow it with each new class found: add a builder, give the reason a substring the
error must contain, rerun ``python -m tests.corpus``.
"""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
BLOCK = 512


@dataclass(frozen=True)
class Case:
    name: str
    data: bytes
    reason: str  # a substring of the error stagerd must give


def header(
    name: bytes, size_field: bytes, typeflag: bytes = b"0", magic: bytes = b"ustar\x0000"
) -> bytes:
    """One raw ustar header with an arbitrary size field and a correct checksum."""
    block = bytearray(BLOCK)
    block[0 : len(name)] = name[:100]
    block[100:108] = b"0000644\x00"
    block[108:116] = b"0000000\x00"
    block[116:124] = b"0000000\x00"
    block[124:136] = size_field[:12].ljust(12, b"\x00")
    block[136:148] = b"00000000000\x00"
    block[156:157] = typeflag
    block[257:265] = magic
    block[148:156] = b" " * 8
    block[148:156] = f"{sum(block):06o}\x00 ".encode()
    return bytes(block)


def pax(records: dict[bytes, bytes]) -> bytes:
    """A pax extended header (typeflag x) carrying *records*, padded."""
    body = b""
    for key, value in records.items():
        line = b" " + key + b"=" + value + b"\n"
        length = len(line) + 1
        while len(str(length).encode()) + len(line) != length:
            length += 1
        body += str(length).encode() + line
    return header(b"PaxHeader", f"{len(body):011o}".encode()) + _pad(body)


def raw_record(data: bytes) -> bytes:
    """A pax header whose body is exactly *data* (for malformed records)."""
    return header(b"PaxHeader", f"{len(data):011o}".encode(), b"x") + _pad(data)


def _pad(data: bytes) -> bytes:
    return data + bytes(-len(data) % BLOCK)


def member(name: bytes, data: bytes) -> bytes:
    return header(name, f"{len(data):011o}".encode()) + _pad(data)


END = bytes(2 * BLOCK)


def good_tar(files: int = 2) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for i in range(files):
            data = b"RIFF" + bytes(60)
            info = tarfile.TarInfo(f"clip-{i:03d}.wav")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _pax_header(records: dict[bytes, bytes]) -> bytes:
    return _typed(pax(records), b"x")


def _typed(blob: bytes, typeflag: bytes) -> bytes:
    """*blob* with its first header's typeflag replaced (checksum recomputed)."""
    block = bytearray(blob[:BLOCK])
    block[156:157] = typeflag
    block[148:156] = b" " * 8
    block[148:156] = f"{sum(block):06o}\x00 ".encode()
    return bytes(block) + blob[BLOCK:]


def hostile_archives() -> list[Case]:
    ok = member(b"ok.wav", b"x" * 10)
    return [
        Case("pax-size-unicode-digits",
             _pax_header({b"size": "١٢".encode()}) + ok + END, "malformed pax size"),
        Case("pax-size-superscript", _pax_header({b"size": "²".encode()}) + ok + END,
             "malformed pax size"),
        Case("pax-size-5000-digits", _pax_header({b"size": b"9" * 5000}) + ok + END,
             "malformed pax size"),
        Case("pax-size-signed", _pax_header({b"size": b"+10"}) + ok + END, "malformed pax size"),
        Case("pax-size-underscore", _pax_header({b"size": b"1_0"}) + ok + END,
             "malformed pax size"),
        Case("pax-length-unicode-digits", _typed(raw_record("١٢ size=1\n".encode()), b"x")
             + ok + END, "malformed pax header"),
        Case("pax-length-huge", _typed(raw_record(b"9" * 30 + b" size=1\n"), b"x") + ok + END,
             "malformed pax header"),
        Case("pax-sparse", _pax_header({b"GNU.sparse.map": b"0,10"}) + ok + END, "sparse"),
        Case("size-field-not-octal", header(b"a.wav", b"0000000001x\x00") + END, "bad size"),
        Case("size-field-negative-base256", header(b"a.wav", b"\xff" * 12) + END, "bad size"),
        Case("size-field-huge-base256", header(b"a.wav", b"\x80" + b"\xff" * 11) + END,
             "exceeds"),
        Case("name-not-utf8", member(b"clip-\xff\xfe.wav", b"x") + END, "not valid UTF-8"),
        Case("pax-path-not-utf8", _pax_header({b"path": b"a\xc3(.wav"}) + ok + END,
             "not valid UTF-8"),
        Case("gnu-longname-not-utf8",
             _typed(member(b"././@LongLink", b"\xe9t\xe9.wav\x00"), b"L") + ok + END,
             "not valid UTF-8"),
        Case("name-dotdot", member(b"../evil.wav", b"x") + END, "'..' component"),
        Case("name-absolute", member(b"/etc/evil.wav", b"x") + END, "absolute path"),
        Case("symlink", header(b"link", b"0" * 11, b"2") + END, "symbolic link"),
        Case("extended-headers-chain", _pax_header({b"comment": b"x"}) * 20 + ok + END,
             "too many extended headers"),
        Case("bad-checksum", b"\x01" * BLOCK + END, "tar"),
    ]  # fmt: skip


def hostile_payloads() -> list[Case]:
    job = {"batch_id": "p1", "s3_key": "archives/p1.tar"}
    return [
        Case("deep-nesting-list", b"[" * 30_000 + b"]" * 30_000, "levels deep"),
        Case("deep-nesting-object", b"{\"a\":" * 10_000 + b"1" + b"}" * 10_000, "levels deep"),
        Case("deep-nesting-in-extra",
             json.dumps({**job, "x": 1}).encode()[:-1] + b',"deep":' + b"[" * 40 + b"]" * 40
             + b"}", "levels deep"),
        Case("not-utf8", b'{"batch_id": "\xff\xfe"}', "not JSON"),
        Case("lone-surrogate-batch-id",
             b'{"batch_id": "\\ud800", "s3_key": "archives/x.tar"}', "batch id"),
        Case("huge-int", b'{"batch_id": "p1", "s3_key": "archives/p1.tar", "size": 1'
             + b"0" * 5000 + b"}", "not JSON"),
        Case("nan-size", b'{"batch_id": "p1", "s3_key": "archives/p1.tar", "size": NaN}',
             "size"),
        Case("size-float", json.dumps({**job, "size": 1.5}).encode(), "size"),
        Case("bool-file-count", json.dumps({**job, "file_count": True}).encode(), "file_count"),
        Case("nul-in-batch-id", json.dumps({**job, "batch_id": "p\u00001"}).encode(),
             "batch id"),
        Case("empty", b"", "not JSON"),
        Case("whitespace", b"   ", "not JSON"),
        Case("array", b"[]", "JSON object"),
        Case("string", b'"archives/x.tar"', "JSON object"),
    ]  # fmt: skip


def write_corpus(root: Path = HERE) -> None:
    """Save every case as a file plus a manifest of the reasons (``python -m tests.corpus``)."""
    for kind, cases, suffix in (
        ("archives", hostile_archives(), ".tar"),
        ("payloads", hostile_payloads(), ".json"),
    ):
        folder = root / kind
        folder.mkdir(exist_ok=True)
        for case in cases:
            (folder / f"{case.name}{suffix}").write_bytes(case.data)
        manifest = {case.name + suffix: case.reason for case in cases}
        (folder / "MANIFEST.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
