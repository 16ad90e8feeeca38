"""Dead-letter records and the operations ``stagerd dlq`` needs: list, show, retry, purge.

Dead letters are JSON records built by :func:`dead_letter_record` (the one builder: the
worker's transitions store its output, orphan recovery's Lua script fills in a template it
built): ``{"id", "payload", "batch_id", "error", "attempts", "worker", "failed_at"}``, the
id 12 lowercase hex digits. An entry is named by its ``id`` or, for convenience, its batch
id. Retry and purge move exact entries with one Lua script each, so a concurrent worker
dead-lettering more jobs loses nothing.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, TypeVar, cast

from stagerd.errors import ServiceUnavailable, UsageError
from stagerd.job import loads_untrusted
from stagerd.queue.keys import QueueKeys

if TYPE_CHECKING:
    import redis

    from stagerd.config.settings import Settings

T = TypeVar("T")

# Ids are 12 hex digits. Orphan recovery numbers the n-th dead letter of a pass
# '%012x' % (base + n), so a base leaves room for this many per pass.
_ID_DIGITS = 12
_ID_SPAN = 1 << 24

_REMOVE = "return redis.call('LREM', KEYS[1], 1, ARGV[1])"

# KEYS: dead, pending, attempts. ARGV: raw envelope, payload, batch id
_RETRY = """
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then return 0 end
redis.call('RPUSH', KEYS[2], ARGV[2])
if ARGV[3] ~= '' then redis.call('HDEL', KEYS[3], ARGV[3]) end
return 1
"""


def new_record_id() -> str:
    """A fresh dead-letter id: 12 random lowercase hex digits."""
    return secrets.token_hex(_ID_DIGITS // 2)


def record_id_base() -> int:
    """A random base for the ids a Lua script numbers itself (``'%012x' % (base + n)``,
    n < 2**24): the ids keep the format of :func:`new_record_id`."""
    return secrets.randbelow(16**_ID_DIGITS - _ID_SPAN)


def dead_letter_record(
    *,
    payload: bytes,
    batch_id: str | None,
    error: str,
    attempts: int,
    worker: str,
    failed_at: str,
    record_id: str | None = None,
) -> str:
    """The JSON of one dead letter (keys sorted). *payload* is the job's exact bytes,
    stored as text (undecodable bytes replaced); *record_id* defaults to a new id."""
    return json.dumps(
        {
            "id": record_id if record_id is not None else new_record_id(),
            "payload": payload.decode("utf-8", errors="replace"),
            "batch_id": batch_id,
            "error": error,
            "attempts": attempts,
            "worker": worker,
            "failed_at": failed_at,
        },
        sort_keys=True,
    )


@dataclass(frozen=True)
class DeadLetter:
    """One dead-letter entry, with the exact stored bytes for atomic removal."""

    raw: bytes
    id: str
    batch_id: str | None
    error: str
    attempts: int
    worker: str | None
    failed_at: str | None
    payload: str

    @classmethod
    def parse(cls, raw: bytes) -> DeadLetter:
        try:
            data = loads_untrusted(raw)
            if not isinstance(data, dict):
                raise ValueError("not an object")
        except ValueError:
            # Something else pushed a raw payload here; still show and replay it.
            text = raw.decode("utf-8", errors="replace")
            return cls(raw, "", None, "(not a stagerd envelope)", 0, None, None, text)
        return cls(
            raw=raw,
            id=str(data.get("id") or ""),
            batch_id=data.get("batch_id"),
            error=str(data.get("error") or ""),
            attempts=int(data.get("attempts") or 0),
            worker=data.get("worker"),
            failed_at=data.get("failed_at"),
            payload=str(data.get("payload") or ""),
        )

    def age_seconds(self, now: datetime | None = None) -> float | None:
        if not self.failed_at:
            return None
        try:
            failed = datetime.fromisoformat(self.failed_at)
        except ValueError:
            return None
        if failed.tzinfo is None:
            failed = failed.replace(tzinfo=timezone.utc)
        return ((now or datetime.now(timezone.utc)) - failed).total_seconds()

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "batch_id": self.batch_id,
            "error": self.error,
            "attempts": self.attempts,
            "worker": self.worker,
            "failed_at": self.failed_at,
            "payload": self.payload,
        }


class DeadLetters:
    """The dead-letter list of one queue."""

    def __init__(self, client: redis.Redis, keys: QueueKeys) -> None:
        self.client = client
        self.keys = keys

    @classmethod
    def from_settings(cls, settings: Settings) -> DeadLetters:
        """The dead letters of STAGERD_QUEUE on REDIS_URL, through a client that retries a
        command once (an operator wants to hear at once that Redis is down). Raises
        ConfigError for an unparsable REDIS_URL."""
        from stagerd.queue.redis_queue import connect

        return cls(connect(settings.redis_url, retries=1), QueueKeys(settings.queue))

    def list(self) -> list[DeadLetter]:
        raws = cast(list[bytes], self.client.lrange(self.keys.dead, 0, -1))
        return [DeadLetter.parse(raw) for raw in raws]

    def count(self) -> int:
        return int(self.client.llen(self.keys.dead))

    def find(self, ref: str) -> DeadLetter:
        """The entry whose id (or else batch id) is *ref*. Raises UsageError if none."""
        entries = self.list()
        for entry in entries:
            if entry.id and entry.id == ref:
                return entry
        matches = [e for e in entries if e.batch_id == ref]
        if not matches:
            raise UsageError(f"no dead letter with id or batch id {ref!r} in {self.keys.dead}")
        return matches[-1]

    def retry(self, entry: DeadLetter) -> bool:
        """Put the original payload back on the queue (tail) with fresh attempts."""
        script = self.client.register_script(_RETRY)
        return bool(
            script(
                keys=[self.keys.dead, self.keys.pending, self.keys.attempts],
                args=[entry.raw, entry.payload, entry.batch_id or ""],
            )
        )

    def purge(self, older_than: float | None = None) -> int:
        """Delete entries (all, or those that failed more than *older_than* seconds ago)."""
        remove = self.client.register_script(_REMOVE)
        removed = 0
        for entry in self.list():
            age = entry.age_seconds()
            if older_than is not None and (age is None or age < older_than):
                continue
            removed += int(remove(keys=[self.keys.dead], args=[entry.raw]))
        return removed


def guard(fn: Callable[[], T]) -> T:
    """Run a dead-letter operation, turning any Redis error into one clear
    ServiceUnavailable ("Redis unreachable: ..."); stagerd's own errors pass through."""
    import redis

    try:
        return fn()
    except redis.RedisError as exc:
        raise ServiceUnavailable(f"Redis unreachable: {exc}") from None
