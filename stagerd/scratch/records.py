"""Reservation records: one small JSON file per reservation under ``root/.stagerd/``.

A record only carries data (size, start time, owner pid for people reading it); whether it
still counts is decided by the lock on the batch directory, never by the pid. Writes are
atomic (temp file + rename) and happen under the admission lock.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from stagerd.errors import InvalidBatchId
from stagerd.ids import validate_batch_id
from stagerd.log import get_logger

log = get_logger(__name__)
SUFFIX = ".json"


@dataclass(frozen=True)
class Record:
    """What one reservation promised."""

    batch_id: str
    nbytes: int
    created: float
    pid: int

    @classmethod
    def new(cls, batch_id: str, nbytes: int, created: float | None = None) -> Record:
        return cls(batch_id, nbytes, time.time() if created is None else created, os.getpid())


class RecordStore:
    """The directory of reservation records."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, record: Record) -> None:
        final = self.path / f"{record.batch_id}{SUFFIX}"
        temp = self.path / f".{record.batch_id}.{os.getpid()}.tmp"
        temp.write_text(
            json.dumps(
                {
                    "batch_id": record.batch_id,
                    "nbytes": record.nbytes,
                    "created": record.created,
                    "pid": record.pid,
                }
            ),
            encoding="utf-8",
        )
        os.replace(temp, final)

    def delete(self, batch_id: str) -> None:
        (self.path / f"{batch_id}{SUFFIX}").unlink(missing_ok=True)

    def clear_temps(self) -> None:
        """Remove temp files of writes that crashed before their rename."""
        for name in os.listdir(self.path):
            if name.startswith(".") and name.endswith(".tmp"):
                (self.path / name).unlink(missing_ok=True)

    def load(self) -> list[Record]:
        """Every readable record; unreadable ones are removed (a crash mid-write)."""
        records = []
        try:
            names = os.listdir(self.path)
        except FileNotFoundError:
            return []
        for name in names:
            if not name.endswith(SUFFIX) or name.startswith("."):
                continue
            record = self._read(self.path / name)
            if record is not None:
                records.append(record)
        return records

    def _read(self, path: Path) -> Record | None:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            record = Record(
                batch_id=validate_batch_id(data["batch_id"]),
                nbytes=int(data["nbytes"]),
                created=float(data["created"]),
                pid=int(data.get("pid", 0)),
            )
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, InvalidBatchId) as exc:
            # Only a crash between write and rename or a hand edit gets here: such a
            # record cannot count for anyone, so it must not block admission forever.
            log.warning("dropping unreadable reservation record", extra={"path": str(path)})
            log.debug("unreadable record: %s", exc)
            path.unlink(missing_ok=True)
            return None
        if path.name != f"{record.batch_id}{SUFFIX}":
            path.unlink(missing_ok=True)
            return None
        return record
