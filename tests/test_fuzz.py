"""Property-based tests of stagerd's edges (issue 16): whatever the input, the only outcomes
are a parsed value or stagerd's own error type, never another exception.

Seeds come from tests/corpus (every hostile case found so far); hypothesis mutates them.
Examples per property are bounded so the suite stays fast on a loaded machine; the
counts are ``FUZZ_EXAMPLES`` (raise ``STAGERD_FUZZ_EXAMPLES`` for a longer run).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stagerd.archive.extract import extract_tar
from stagerd.archive.tarcheck import check_tar
from stagerd.config.envfile import parse_env_text
from stagerd.errors import ArchiveRejected, ConfigError, InvalidJob, StagerdError
from stagerd.job import Job
from stagerd.s3.fetch import FileSource
from tests.corpus import HERE as CORPUS
from tests.corpus import good_tar

FUZZ_EXAMPLES = int(os.environ.get("STAGERD_FUZZ_EXAMPLES", "300"))
FUZZ = settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,  # a loaded 2-core machine: never fail on wall-clock time
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)


def _corpus(kind: str) -> list[bytes]:
    folder = CORPUS / kind
    return [p.read_bytes() for p in sorted(folder.iterdir()) if p.name != "MANIFEST.json"]


ARCHIVE_SEEDS = [good_tar(1), good_tar(3), *_corpus("archives")]
PAYLOAD_SEEDS = [
    json.dumps({"batch_id": "b1", "s3_key": "archives/b1.tar", "size": 10}).encode(),
    *_corpus("payloads"),
]


@st.composite
def mutated(draw: st.DrawFn, seeds: list[bytes]) -> bytes:
    """A seed with a few bytes overwritten, a slice cut out or repeated, or truncated."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(0, 6))):
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        action = draw(st.sampled_from(["byte", "digit", "cut", "repeat", "truncate"]))
        if action == "byte":
            data[at] = draw(st.integers(0, 255))
        elif action == "digit":  # header fields are digits: swap in lookalikes
            data[at : at + 1] = draw(st.sampled_from([b"9", b" ", b"\x00", "٣".encode(), b"8"]))
        elif action == "cut":
            del data[at : at + draw(st.integers(1, 600))]
        elif action == "repeat":
            data[at:at] = data[at : at + draw(st.integers(1, 600))]
        else:
            del data[at:]
    return bytes(data)


# --- job payloads -----------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


def _parse_payload(raw: bytes | str) -> None:
    try:
        job = Job.from_json(raw)
    except InvalidJob:
        return
    assert Job.from_json(job.to_json()) == job  # what we accept survives a round trip


@FUZZ
@given(mutated(PAYLOAD_SEEDS))
def test_payload_parser_on_mutated_payloads(raw: bytes) -> None:
    _parse_payload(raw)


@FUZZ
@given(st.binary(max_size=2048))
def test_payload_parser_on_random_bytes(raw: bytes) -> None:
    _parse_payload(raw)


@FUZZ
@given(
    st.dictionaries(
        st.sampled_from(["batch_id", "s3_key", "size", "sha256", "file_count", "x"]),
        json_values,
    ),
    st.integers(0, 40),
)
def test_payload_parser_on_json_shaped_payloads(fields: dict[str, object], depth: int) -> None:
    text = json.dumps(fields)
    _parse_payload(text)
    _parse_payload(text[:-1] + ', "deep": ' + "[" * depth + "]" * depth + "}")


# --- tar headers: the upload check and extraction agree ---------------------------------

# Differences that are the file system's, not the header parser's (the check cannot see
# them without writing): a duplicate name, a file where a directory is needed.
FS_ONLY = ("duplicates an earlier member", "cannot be extracted safely")


def _check(data: bytes, workdir: Path) -> StagerdError | None:
    path = workdir / "a.tar"
    path.write_bytes(data)
    try:
        check_tar(path)
    except StagerdError as exc:
        return exc
    return None


def _extract(data: bytes, workdir: Path) -> StagerdError | None:
    path = workdir / "a.tar"
    path.write_bytes(data)
    dest = workdir / "out"
    fd = os.open(path, os.O_RDONLY)
    try:
        extract_tar(FileSource(fd), dest, charge=lambda _n: None)
    except StagerdError as exc:
        return exc
    finally:
        os.close(fd)
        shutil.rmtree(dest, ignore_errors=True)
    return None


@FUZZ
@given(mutated(ARCHIVE_SEEDS))
def test_tar_parser_on_mutated_archives(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        checked = _check(data, workdir) if data else ArchiveRejected("empty")
        extracted = _extract(data, workdir)
    assert checked is None or isinstance(checked, ArchiveRejected), checked
    assert extracted is None or isinstance(extracted, ArchiveRejected), extracted
    if checked is None and extracted is not None:
        # What the upload accepted, the worker accepts: only file-system conflicts differ.
        assert any(why in str(extracted) for why in FS_ONLY), extracted


@pytest.mark.parametrize("path", sorted((CORPUS / "archives").glob("*.tar")), ids=lambda p: p.stem)
def test_corpus_archives_are_refused_alike_with_their_reason(path: Path, tmp_path: Path) -> None:
    reason = json.loads((CORPUS / "archives" / "MANIFEST.json").read_text())[path.name]
    checked = _check(path.read_bytes(), tmp_path)
    extracted = _extract(path.read_bytes(), tmp_path)
    assert isinstance(checked, ArchiveRejected) and reason in str(checked), checked
    assert isinstance(extracted, ArchiveRejected) and reason in str(extracted), extracted


@pytest.mark.parametrize(
    "path",
    sorted(p for p in (CORPUS / "payloads").glob("*.json") if p.name != "MANIFEST.json"),
    ids=lambda p: p.stem,
)
def test_corpus_payloads_are_refused_with_their_reason(path: Path) -> None:
    reason = json.loads((CORPUS / "payloads" / "MANIFEST.json").read_text())[path.name]
    with pytest.raises(InvalidJob) as info:
        Job.from_json(path.read_bytes())
    assert reason in str(info.value)


# --- env files --------------------------------------------------------------------------

env_text = st.text(
    alphabet=st.sampled_from(list("AB_=\"'\\ \t\r\n#;$`x1é")) | st.characters(), max_size=200
)


@FUZZ
@given(env_text)
def test_env_file_parser_on_random_text(text: str) -> None:
    try:
        values = parse_env_text(text)
    except ConfigError:
        return
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in values.items())


@FUZZ
@given(
    st.dictionaries(
        st.from_regex(r"[A-Z_][A-Z0-9_]{0,10}", fullmatch=True),
        st.text(st.characters(blacklist_characters="\x00\r", blacklist_categories=["Cs"])),
        max_size=5,
    )
)
def test_env_file_single_quoted_values_round_trip(values: dict[str, str]) -> None:
    # Single quotes are verbatim in systemd's syntax: any value without a quote survives.
    values = {k: v for k, v in values.items() if "'" not in v}
    text = "".join(f"{k}='{v}'\n" for k, v in values.items())
    assert parse_env_text(text) == values
