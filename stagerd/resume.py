"""Processed-but-uncommitted batches: results that outlive a PostgreSQL outage.

After the processor succeeds the worker writes ``root/{batch_id}/processed.json`` next to
the results file, before it commits. If the commit cannot reach PostgreSQL the worker
retries (``STAGERD_COMMIT_RETRY``) with the directory locked and the reservation held; if
it exits first (retry budget spent, shutdown, crash) the directory stays on scratch and
its job stays in the worker's processing list. The restarted worker with the same
identity takes the job back, finds the marker (same batch, same archive digest, same
worker id) and commits the results without running the processor again.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from stagerd.log import get_logger

log = get_logger(__name__)
MARKER = "processed.json"


@dataclass(frozen=True)
class ProcessedMarker:
    """What the processing step left for a commit that may happen in a later process."""

    batch_id: str
    worker: str
    sha256: str
    process_seconds: float
    archive_bytes: int
    extracted_bytes: int
    file_count: int
    stage_seconds: float

    def write(self, batch_dir: Path) -> None:
        """Atomically (rename), so a crash never leaves half a marker."""
        temp = batch_dir / f".{MARKER}.tmp"
        temp.write_text(json.dumps(asdict(self), sort_keys=True), encoding="utf-8")
        os.replace(temp, batch_dir / MARKER)

    @classmethod
    def read(cls, batch_dir: Path) -> ProcessedMarker | None:
        """The marker, or None if absent or unreadable (then the batch is staged afresh)."""
        path = batch_dir / MARKER
        try:
            if path.is_symlink():
                return None
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls(**{name: data[name] for name in cls.__dataclass_fields__})
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def matches(self, batch_id: str, worker: str, sha256: str | None) -> bool:
        """Ours to commit: same batch, our identity, and the job names the same archive."""
        return (
            self.batch_id == batch_id
            and self.worker == worker
            and (sha256 is None or sha256 == self.sha256)
        )
