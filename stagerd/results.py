"""The processor's results file, checked and streamed row by row into the commit.

A results file is JSON lines, each an object with a non-empty string ``item``. An optional
last line ``{"stagerd": "end", "count": N}`` (the *trailer*) says the processor finished
writing N rows: it makes a truncated file detectable, and ``count: 0`` is how a processor
says "no results" for a non-empty input (without it, zero results from a non-empty input
fail the batch, because that is what a processor that silently lost its output looks like).

Nothing here holds more than one row in memory: :func:`scan_results` counts the lines and
checks the trailer (bytes only, no JSON), then :meth:`ResultsFile.rows` re-reads the file
inside the commit transaction and validates each row as it is sent. Validation is what
PostgreSQL ``text`` and ``jsonb`` can hold: no NUL (raw or ``\\u0000``), no lone surrogate,
no NaN/Infinity, valid UTF-8, bounded item and line length, bounded nesting. A violation
raises :class:`ResultsRejected` (permanent: the same file fails every attempt).
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stagerd.errors import ProcessorFailed, ResultsRejected

# The (batch_id, item) btree index holds at most ~2704 bytes per entry; batch ids are at
# most 128 bytes, so 2048 bytes of item always fits and PostgreSQL never refuses the row.
MAX_ITEM_BYTES = 2048
DEFAULT_MAX_RESULTS = 1_000_000
DEFAULT_MAX_ROW_BYTES = 16 * 1024**2
TRAILER_KEY = "stagerd"
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


@dataclass(frozen=True)
class ResultLimits:
    """Caps on one batch's results (``STAGERD_MAX_RESULTS``, ``STAGERD_MAX_RESULT_BYTES``)."""

    max_results: int = DEFAULT_MAX_RESULTS
    max_row_bytes: int = DEFAULT_MAX_ROW_BYTES
    max_item_bytes: int = MAX_ITEM_BYTES


DEFAULT_LIMITS = ResultLimits()


@dataclass(frozen=True)
class RawJson:
    """A validated row's JSON text, passed to PostgreSQL as is (no re-encoding)."""

    text: str


@dataclass(frozen=True)
class ResultsFile:
    """A scanned results file: how many rows it holds; :meth:`rows` streams them."""

    path: Path | None  # None: no file and nothing expected
    count: int
    identity: tuple[int, int, int] = (0, 0, 0)  # (st_dev, st_ino, st_size) at scan time
    limits: ResultLimits = DEFAULT_LIMITS

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[tuple[str, RawJson]]:
        return self.rows()

    def rows(self) -> Iterator[tuple[str, RawJson]]:
        """Validated ``(item, RawJson)`` rows. Raises ResultsRejected on the first bad row,
        ProcessorFailed if the file changed since it was scanned."""
        if self.path is None:
            return
        with _open_results(self.path) as f:
            if _identity(os.fstat(f.fileno())) != self.identity:
                raise ResultsRejected(f"results file {self.path.name} changed after the processor")
            sent = 0
            for lineno, raw in _lines(f, self.limits.max_row_bytes):
                obj = parse_line(raw, lineno, self.limits)
                if _is_trailer(obj):
                    continue
                sent += 1
                if sent > self.count:
                    raise ResultsRejected(f"results file {self.path.name} grew while committing")
                yield obj["item"], RawJson(raw.decode("utf-8").strip())


def scan_results(path: Path, limits: ResultLimits, *, input_empty: bool) -> ResultsFile:
    """Count the rows of *path* and check its trailer and the zero-results rule.

    Raises ProcessorFailed for a missing, unreadable or truncated file and for zero rows
    from a non-empty input without an explicit ``count: 0``; ResultsRejected for more than
    ``max_results`` rows or an over-long line.
    """
    try:
        f = _open_results(path)
    except FileNotFoundError:
        if input_empty:
            return ResultsFile(None, 0, limits=limits)
        raise ProcessorFailed("processor exited 0 but wrote no results file") from None
    with f:
        identity = _identity(os.fstat(f.fileno()))
        count, last = 0, b""
        for _lineno, raw in _lines(f, limits.max_row_bytes):
            count += 1
            last = raw
            if count > limits.max_results + 1:  # +1: the trailer does not count
                break
    trailer = _trailer(last)
    rows = count - (trailer is not None)
    if rows > limits.max_results:
        raise ResultsRejected(f"more than {limits.max_results} results (STAGERD_MAX_RESULTS)")
    if trailer is not None and trailer != rows:
        raise ProcessorFailed(
            f"results file truncated: the trailer says {trailer} rows, the file holds {rows}"
        )
    if rows == 0 and trailer is None and not input_empty:
        raise ProcessorFailed(
            "processor wrote no results for a non-empty input (write the trailer "
            '{"stagerd": "end", "count": 0} to mean "no results")'
        )
    return ResultsFile(path, rows, identity, limits)


def parse_line(raw: bytes, lineno: int, limits: ResultLimits) -> dict[str, Any]:
    """One results line as a validated object (a row or the trailer). Raises ResultsRejected."""
    try:
        text = raw.decode("utf-8")
        obj = json.loads(text, parse_constant=_no_constant)
    except UnicodeDecodeError:
        raise ResultsRejected(f"results line {lineno} is not UTF-8") from None
    except RecursionError:
        raise ResultsRejected(f"results line {lineno} is nested too deeply") from None
    except ValueError as exc:
        raise ResultsRejected(f"results line {lineno} is not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ResultsRejected(f"results line {lineno} is not a JSON object")
    # Only an escape can smuggle in NUL or a lone surrogate; most lines have none, so the
    # walk over every string is skipped for them.
    if "\\u" in text:
        _check_strings(obj, lineno)
    if _is_trailer(obj):
        return obj
    item = obj.get("item")
    if not isinstance(item, str) or not item:
        raise ResultsRejected(f"results line {lineno} lacks a non-empty string 'item'")
    if len(item.encode("utf-8")) > limits.max_item_bytes:
        raise ResultsRejected(
            f"results line {lineno}: item is longer than {limits.max_item_bytes} bytes"
        )
    return obj


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON (PostgreSQL jsonb refuses it)")


def _check_strings(value: Any, lineno: int) -> None:
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for key, child in node.items():
                _check_string(key, lineno)
                stack.append(child)
        elif isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, str):
            _check_string(node, lineno)


def _check_string(text: str, lineno: int) -> None:
    if "\x00" in text:
        raise ResultsRejected(f"results line {lineno} holds a NUL character (\\u0000)")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ResultsRejected(f"results line {lineno} holds a lone UTF-16 surrogate") from None


def _is_trailer(obj: dict[str, Any]) -> bool:
    return obj.get(TRAILER_KEY) == "end" and "item" not in obj


def _trailer(raw: bytes) -> int | None:
    """The trailer's count if *raw* (the last line) is the trailer, else None."""
    if TRAILER_KEY.encode() not in raw:
        return None
    try:
        obj = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not _is_trailer(obj):
        return None
    count = obj.get("count")
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        raise ProcessorFailed("results trailer lacks a non-negative integer 'count'")
    return count


def _open_results(path: Path) -> Any:
    """*path* opened for binary reading, refusing a symlink, FIFO or device (a planted link
    must not make the worker read, and commit, a file the processor could not)."""
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise ProcessorFailed(f"results file {path.name} unreadable: {exc.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ProcessorFailed(f"results file {path.name} is not a regular file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def _identity(st: os.stat_result) -> tuple[int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size)


def _lines(f: Any, max_bytes: int) -> Iterator[tuple[int, bytes]]:
    """Non-blank lines of *f* with their numbers, never reading more than *max_bytes*."""
    lineno = 0
    while True:
        raw = f.readline(max_bytes + 1)
        if not raw:
            return
        lineno += 1
        if len(raw) > max_bytes:
            raise ResultsRejected(
                f"results line {lineno} is longer than {max_bytes} bytes (STAGERD_MAX_RESULT_BYTES)"
            )
        if raw.strip():
            yield lineno, raw
