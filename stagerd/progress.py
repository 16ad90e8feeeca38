"""Byte progress for long transfers: a bar for people, JSON lines for machines.

One small interface, :class:`Progress` (``advance(nbytes)``, ``close()``), with three
implementations picked by :func:`make_progress`: a rich bar when the stream is a terminal,
periodic JSON lines (bytes, total, rate, ETA) otherwise, and a null sink. ``advance`` is
thread-safe because parts finish on worker threads. Progress goes to stderr by default:
stdout carries the command's one JSON result.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, Protocol, TextIO


class Progress(Protocol):
    """Receives byte counts as work completes; ``close`` reports the final state."""

    def advance(self, nbytes: int) -> None: ...

    def close(self) -> None: ...


class NullProgress:
    """Discards progress (library calls, tests)."""

    def advance(self, nbytes: int) -> None:
        pass

    def close(self) -> None:
        pass


class _Counter:
    """Shared bookkeeping: bytes done, rate since start, ETA."""

    def __init__(self, total: int, done: int, clock: Callable[[], float]) -> None:
        self.total = total
        self.done = done
        self.start_done = done
        self.clock = clock
        self.started = clock()
        self.lock = threading.Lock()

    def snapshot(self) -> dict[str, Any]:
        elapsed = max(self.clock() - self.started, 1e-9)
        rate = (self.done - self.start_done) / elapsed
        remaining = max(self.total - self.done, 0)
        eta = remaining / rate if rate > 0 else None
        return {
            "bytes": self.done,
            "total": self.total,
            "percent": round(100.0 * self.done / self.total, 1) if self.total else 100.0,
            "rate": round(rate),
            "eta": round(eta, 1) if eta is not None else None,
            "elapsed": round(elapsed, 1),
        }


class JsonProgress:
    """Writes ``{"event": "progress", ...}`` lines at most every *interval* seconds."""

    def __init__(
        self,
        label: str,
        total: int,
        *,
        done: int = 0,
        stream: TextIO | None = None,
        interval: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.interval = interval
        self.counter = _Counter(total, done, clock)
        self.last_emit = self.counter.started
        self.closed = False

    def advance(self, nbytes: int) -> None:
        with self.counter.lock:
            self.counter.done += nbytes
            now = self.counter.clock()
            if now - self.last_emit >= self.interval:
                self.last_emit = now
                self._emit(final=False)

    def close(self) -> None:
        with self.counter.lock:
            if not self.closed:
                self.closed = True
                self._emit(final=True)

    def _emit(self, *, final: bool) -> None:
        line = {"event": "progress", "label": self.label, **self.counter.snapshot()}
        if final:
            line["final"] = True
        self.stream.write(json.dumps(line) + "\n")
        self.stream.flush()

    def __enter__(self) -> JsonProgress:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class BarProgress:
    """A rich progress bar with transfer speed and time remaining."""

    def __init__(
        self, label: str, total: int, *, done: int = 0, stream: TextIO | None = None
    ) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )
        from rich.progress import Progress as RichProgress

        console = Console(file=stream if stream is not None else sys.stderr)
        self._bar = RichProgress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self._task = self._bar.add_task(label, total=total, completed=done)
        self._lock = threading.Lock()
        self._bar.start()

    def advance(self, nbytes: int) -> None:
        with self._lock:
            self._bar.advance(self._task, nbytes)

    def close(self) -> None:
        with self._lock:
            self._bar.stop()


def make_progress(
    label: str,
    total: int,
    *,
    done: int = 0,
    stream: TextIO | None = None,
    interval: float = 5.0,
    mode: str = "auto",
) -> Progress:
    """A progress sink for *total* bytes, *done* of them already accounted for.

    *mode*: ``"auto"`` (bar on a terminal, else JSON lines), ``"bar"``, ``"json"`` or
    ``"none"``.
    """
    out = stream if stream is not None else sys.stderr
    if mode == "auto":
        mode = "bar" if out.isatty() else "json"
    if mode == "bar":
        return BarProgress(label, total, done=done, stream=out)
    if mode == "json":
        return JsonProgress(label, total, done=done, stream=out, interval=interval)
    if mode == "none":
        return NullProgress()
    raise ValueError(f"unknown progress mode {mode!r} (auto, bar, json, none)")
