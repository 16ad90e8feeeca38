"""Processor stdout/stderr into the worker's log: tagged with the batch id, capped, rate-limited.

A processor that prints 100 MiB must not become 100 MiB of journal. Per batch, lines are
logged as they come while both hold: the batch has logged less than ``head_bytes`` and the
token bucket (``rate`` lines/s, bursts of ``burst``) has a token. Every other line is
dropped, but the last ``tail_bytes`` of each stream are kept and logged when the batch's output
ends, followed by one line counting what was dropped. The output is always read in full
(so the processor never blocks on a full pipe); only logging is bounded.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

from stagerd.log import get_logger

log = get_logger("stagerd.processor.runner")

HEAD_BYTES = 64 * 1024
TAIL_BYTES = 16 * 1024
RATE = 50.0
BURST = 500


class OutputCap:
    """The logging budget of one batch's processor output (thread-safe: two pumps feed it)."""

    def __init__(
        self,
        batch_id: str = "-",
        *,
        head_bytes: int = HEAD_BYTES,
        tail_bytes: int = TAIL_BYTES,
        rate: float = RATE,
        burst: int = BURST,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._head, self._tail_cap = head_bytes, tail_bytes
        self._rate, self._burst, self._clock = rate, burst, clock
        self._lock = threading.Lock()
        self.begin(batch_id)

    def begin(self, batch_id: str) -> None:
        """Start a fresh budget for *batch_id* (persistent mode: one per batch)."""
        with self._lock:
            self.batch_id = batch_id
            self.logged = 0
            self.dropped_lines = 0
            self.dropped_bytes = 0
            self._tokens = float(self._burst)
            self._refilled = self._clock()
            # One tail per stream: a flood on stdout must not push out stderr's last words.
            self._tails: dict[str, deque[str]] = {}
            self._tail_bytes: dict[str, int] = {}

    def line(self, stream: str, text: str) -> None:
        """Log *text* (one line of *stream*) now, or keep it for the tail."""
        size = len(text) + 1
        with self._lock:
            if self.logged + size <= self._head and self._take_token():
                self.logged += size
                batch_id = self.batch_id
            else:
                self._drop(stream, text, size)
                return
        _emit(stream, batch_id, text)

    def finish(self) -> None:
        """Log the kept tail and the count of dropped output; the budget stays spent."""
        with self._lock:
            tail = [(stream, text) for stream, kept in self._tails.items() for text in kept]
            self._tails, self._tail_bytes = {}, {}
            batch_id, lines, nbytes = self.batch_id, self.dropped_lines, self.dropped_bytes
        if not lines:
            return
        for stream, text in tail:
            _emit(stream, batch_id, text)
        log.warning(
            "processor output of batch %s: %d line(s), %d byte(s) not logged "
            "(cap %d bytes and %g lines/s per batch; the last %d lines are shown above)",
            batch_id, lines, nbytes - sum(len(t) + 1 for _, t in tail),
            self._head, self._rate, len(tail),
            extra={"batch_id": batch_id, "dropped_bytes": nbytes, "dropped_lines": lines},
        )  # fmt: skip

    def _take_token(self) -> bool:
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._refilled) * self._rate)
        self._refilled = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True

    def _drop(self, stream: str, text: str, size: int) -> None:
        self.dropped_lines += 1
        self.dropped_bytes += size
        text = text[-self._tail_cap :]
        kept = self._tails.setdefault(stream, deque())
        kept.append(text)
        self._tail_bytes[stream] = self._tail_bytes.get(stream, 0) + len(text) + 1
        while self._tail_bytes[stream] > self._tail_cap and len(kept) > 1:
            self._tail_bytes[stream] -= len(kept.popleft()) + 1


def _emit(stream: str, batch_id: str, text: str) -> None:
    log.info("processor %s [%s]: %s", stream, batch_id, text,
             extra={"batch_id": batch_id, "stream": stream})  # fmt: skip
