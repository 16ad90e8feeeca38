"""Prometheus metrics for node_exporter's textfile collector.

Each long-running role keeps one :class:`Metrics` and calls :meth:`Metrics.write` after
every batch (and the janitor at the end of its run). The file is written atomically
(``prometheus_client.write_to_textfile`` writes a temporary file and renames it), so the
collector never reads half a file.

Several roles may run on one host, and the textfile collector reads every ``*.prom`` in
its directory, so each role writes its own file next to ``STAGERD_METRICS_FILE``:
``/var/lib/node_exporter/textfile/stagerd.prom`` becomes ``stagerd-gpu.prom``,
``stagerd-janitor.prom`` and ``stagerd-transfer.prom``.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

PHASES = ("staging", "processing", "committing")


def role_path(path: Path, role: str) -> Path:
    """The per-role file for *path* (``stagerd.prom`` -> ``stagerd-gpu.prom``)."""
    suffix = path.suffix or ".prom"
    return path.with_name(f"{path.stem}-{role}{suffix}")


class Metrics:
    """The metrics of one process; a no-op writer when no path is configured."""

    def __init__(self, path: Path | None, role: str) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.path = role_path(path, role) if path else None
        self.role = role
        self.registry: CollectorRegistry = CollectorRegistry()
        self._lock = threading.Lock()
        r = self.registry
        self.batches = Counter(
            "stagerd_batches", "Batches finished, by outcome.", ["outcome"], registry=r
        )
        self.bytes = Counter(
            "stagerd_bytes", "Bytes moved: in = from S3, out = to S3.", ["direction"], registry=r
        )
        self.phase_seconds = Histogram(
            "stagerd_phase_seconds",
            "Time spent per batch in each phase.",
            ["phase"],
            buckets=(0.1, 0.5, 1, 5, 15, 60, 180, 600, 1800, 3600, 4 * 3600),
            registry=r,
        )
        self.queue_depth = Gauge("stagerd_queue_depth", "Jobs waiting in the queue.", registry=r)
        self.dead_letters = Gauge(
            "stagerd_dead_letters", "Jobs in the dead-letter list.", registry=r
        )
        self.scratch_reserved = Gauge(
            "stagerd_scratch_reserved_bytes", "Scratch bytes reserved by live batches.", registry=r
        )
        self.scratch_free = Gauge(
            "stagerd_scratch_free_bytes", "Free bytes on the scratch file system.", registry=r
        )
        self.scratch_budget = Gauge(
            "stagerd_scratch_budget_bytes", "Configured scratch budget.", registry=r
        )
        self.janitor_actions = Counter(
            "stagerd_janitor_actions", "Janitor actions, by kind.", ["action"], registry=r
        )
        self.last_run = Gauge(
            "stagerd_last_write_timestamp_seconds",
            "When this role last wrote its metrics.",
            registry=r,
        )
        for outcome in ("done", "failed", "dead"):
            self.batches.labels(outcome)
        for direction in ("in", "out"):
            self.bytes.labels(direction)

    def write(self) -> None:
        """Write the textfile atomically; a no-op without a configured path."""
        if self.path is None:
            return
        from prometheus_client import write_to_textfile

        with self._lock:
            self.last_run.set(time.time())
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_to_textfile(str(self.path), self.registry)
