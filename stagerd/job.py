"""The job payload: the seed's JSON, typed.

The seed's producers push ``{"batch_id", "s3_key", "file_count", "transferred_at"}``;
stagerd adds the optional ``size`` and ``sha256`` so the GPU side can verify the bytes.
Unknown keys are kept (``extra``) and written back, so a newer producer's fields survive a
round trip through an older worker's requeue.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from stagerd.errors import InvalidBatchId, InvalidJob
from stagerd.ids import archive_key, validate_batch_id
from stagerd.retry import brief

_SHA256 = re.compile(r"[0-9a-f]{64}")
_KNOWN = ("batch_id", "s3_key", "file_count", "transferred_at", "size", "sha256")
MAX_PAYLOAD_BYTES = 64 * 1024
# The seed's payload is flat; a little nesting in producers' extra fields is fine, but
# the C decoder recurses per level, so depth is bounded before decoding (a 64 KiB payload
# of brackets would otherwise raise RecursionError, which escaped as a worker crash).
MAX_PAYLOAD_DEPTH = 32


def utc_now_iso() -> str:
    """ISO 8601 UTC timestamp with an explicit offset (the seed's ``transferred_at``)."""
    return datetime.now(timezone.utc).isoformat()


@dataclass(frozen=True)
class Job:
    """One batch to stage. Build with :meth:`new` (producers) or :meth:`from_json` (consumers)."""

    batch_id: str
    s3_key: str
    file_count: int | None = None
    transferred_at: str | None = None
    size: int | None = None
    sha256: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def new(
        cls,
        batch_id: str,
        *,
        file_count: int | None = None,
        size: int | None = None,
        sha256: str | None = None,
    ) -> Job:
        """A fresh job for *batch_id* with the seed's key format and the current time."""
        return cls(
            batch_id=validate_batch_id(batch_id),
            s3_key=archive_key(batch_id),
            file_count=file_count,
            transferred_at=utc_now_iso(),
            size=size,
            sha256=sha256.lower() if sha256 else None,
        )

    @classmethod
    def from_json(cls, raw: str | bytes) -> Job:
        """Parse and validate a payload. Raises :class:`InvalidJob` with the reason."""
        if len(raw) > MAX_PAYLOAD_BYTES:
            raise InvalidJob(f"payload is {len(raw)} bytes (at most {MAX_PAYLOAD_BYTES})")
        depth = json_depth(raw)
        if depth > MAX_PAYLOAD_DEPTH:
            raise InvalidJob(f"payload nests {depth} levels deep (at most {MAX_PAYLOAD_DEPTH})")
        try:
            data = json.loads(raw)
        except Exception as exc:  # RecursionError too: every decoder failure is the payload's
            raise InvalidJob(f"payload is not JSON: {brief(exc, limit=200)}") from exc
        if not isinstance(data, dict):
            raise InvalidJob(f"payload must be a JSON object, got {type(data).__name__}")
        try:
            return cls.from_dict(data)
        except InvalidJob:
            raise
        except Exception as exc:  # a payload must never crash its consumer
            raise InvalidJob(f"payload rejected: {brief(exc, limit=200)}") from exc

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Job:
        """Validate a decoded payload. Raises :class:`InvalidJob`."""
        for name in ("batch_id", "s3_key"):
            if name not in data:
                raise InvalidJob(f"payload lacks required field {name!r}")
        try:
            batch_id = validate_batch_id(data["batch_id"])
        except InvalidBatchId as exc:
            raise InvalidJob(str(exc)) from exc
        s3_key = data["s3_key"]
        if s3_key != archive_key(batch_id):
            raise InvalidJob(
                f"s3_key {s3_key!r} does not match batch id {batch_id!r} "
                f"(expected {archive_key(batch_id)!r})"
            )
        return cls(
            batch_id=batch_id,
            s3_key=s3_key,
            file_count=_optional_int(data, "file_count"),
            transferred_at=_optional_str(data, "transferred_at"),
            size=_optional_int(data, "size"),
            sha256=_optional_sha256(data),
            extra={k: v for k, v in data.items() if k not in _KNOWN},
        )

    def to_dict(self) -> dict[str, Any]:
        """The payload as a dict: the seed's fields always, ours when known, extras kept."""
        data: dict[str, Any] = {
            **self.extra,
            "batch_id": self.batch_id,
            "s3_key": self.s3_key,
            "file_count": self.file_count,
            "transferred_at": self.transferred_at,
        }
        if self.size is not None:
            data["size"] = self.size
        if self.sha256 is not None:
            data["sha256"] = self.sha256
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"), sort_keys=True)


def loads_untrusted(raw: str | bytes) -> Any:
    """``json.loads`` for queue data others wrote (pending, processing and dead lists):
    raises ValueError, and only ValueError, for anything that is not JSON, including
    nesting deeper than MAX_PAYLOAD_DEPTH (the decoder recurses: RecursionError)."""
    depth = json_depth(raw)
    if depth > MAX_PAYLOAD_DEPTH:
        raise ValueError(f"nests {depth} levels deep (at most {MAX_PAYLOAD_DEPTH})")
    try:
        return json.loads(raw)
    except ValueError:
        raise
    except Exception as exc:  # RecursionError, MemoryError: still just "not JSON"
        raise ValueError(brief(exc, limit=200)) from exc


def json_depth(raw: str | bytes) -> int:
    """The deepest nesting of ``[``/``{`` outside strings; linear, never recursive."""
    text = raw if isinstance(raw, bytes) else raw.encode("utf-8", "surrogatepass")
    if text.count(b"[") + text.count(b"{") <= MAX_PAYLOAD_DEPTH:
        return 0  # the common flat payload: cannot exceed the bound, skip the scan
    depth = deepest = 0
    in_string = escaped = False
    for byte in text:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):
            depth += 1
            deepest = max(deepest, depth)
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return deepest


def _optional_int(data: dict[str, Any], name: str) -> int | None:
    value = data.get(name)
    if value is None:
        return None
    # bool is an int subclass; a producer sending true is a bug worth refusing.
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidJob(f"field {name!r} must be a non-negative integer or null, got {value!r}")
    return value


def _optional_str(data: dict[str, Any], name: str) -> str | None:
    value = data.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidJob(f"field {name!r} must be a string or null")
    return value


def _optional_sha256(data: dict[str, Any]) -> str | None:
    value = data.get("sha256")
    if value is None:
        return None
    if not isinstance(value, str) or not _SHA256.fullmatch(value.lower()):
        raise InvalidJob("field 'sha256' must be 64 hex digits")
    return value.lower()
