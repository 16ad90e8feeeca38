"""Batch id validation: the one rule every edge (CLI, payload, scratch path) applies."""

from __future__ import annotations

import re

from stagerd.errors import InvalidBatchId

# Leading alphanumeric stops "-rf"-style ids and dotfiles; the charset keeps ids safe as
# S3 keys, Redis keys and directory names alike.
BATCH_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def validate_batch_id(batch_id: object) -> str:
    """Return *batch_id* if valid, else raise :class:`InvalidBatchId` saying why."""
    if not isinstance(batch_id, str):
        raise InvalidBatchId(f"batch id must be a string, got {type(batch_id).__name__}")
    if not batch_id:
        raise InvalidBatchId("batch id is empty")
    if len(batch_id) > 128:
        raise InvalidBatchId(f"batch id is {len(batch_id)} characters long (at most 128)")
    if ".." in batch_id:
        raise InvalidBatchId(f"batch id {batch_id!r} contains '..'")
    if not BATCH_ID_PATTERN.fullmatch(batch_id):
        raise InvalidBatchId(
            f"batch id {batch_id!r} is invalid: use letters, digits, '.', '_' and '-', "
            "starting with a letter or digit"
        )
    return batch_id


def archive_key(batch_id: str) -> str:
    """The seed's object key for a batch: ``archives/{batch_id}.tar``."""
    return f"archives/{validate_batch_id(batch_id)}.tar"


# Where stagerd keeps each archive's size and SHA-256 next to it in the bucket: outside
# ``archives/`` (whose keys are the seed's contract), and in S3 so it survives a Redis
# data loss (``stagerd reconcile`` re-enqueues with it).
DIGEST_PREFIX = "stagerd/digests/"


def digest_key(batch_id: str) -> str:
    """``stagerd/digests/{batch_id}.json``: ``{"batch_id", "size", "sha256", "etag",
    "file_count", "enqueued"}``, written by ``transfer upload`` after the enqueue."""
    return f"{DIGEST_PREFIX}{validate_batch_id(batch_id)}.json"
