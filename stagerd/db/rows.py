"""The ledger's rows as frozen dataclasses, in the column order of their tables."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

STATES = ("queued", "staging", "processing", "done", "failed", "dead", "requeued")


@dataclass(frozen=True)
class BatchRow:
    batch_id: str
    s3_key: str
    state: str
    attempts: int
    worker: str | None
    archive_bytes: int | None
    extracted_bytes: int | None
    file_count: int | None
    sha256: str | None
    stage_seconds: float | None
    process_seconds: float | None
    commit_seconds: float | None
    error: str | None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    lease: int | None = None
    archive_size: int | None = None


@dataclass(frozen=True)
class FailureRow:
    batch_id: str | None
    attempt: int | None
    worker: str | None
    phase: str | None
    outcome: str
    error: str
    failed_at: datetime


BATCH_COLUMNS = ", ".join(BatchRow.__dataclass_fields__)
