"""The phase trail on real Redis: a death is reported once, for the right attempt only."""

from __future__ import annotations

from typing import Any

from stagerd.queue import trail
from stagerd.queue.keys import QueueKeys


def test_an_unfinished_attempt_is_reported_once_at_the_next_attempt(
    redis_client: Any, queue_name: str
) -> None:
    keys = QueueKeys(queue_name)
    trail.mark(redis_client, keys, "b1", "staging", 1, "w1")
    trail.mark(redis_client, keys, "b1", "processing", 1, "w1")
    died = trail.take_died(redis_client, keys, "b1", 2)
    assert died == trail.Died("processing", 1, "w1")
    assert died.describe() == "attempt 1 died during processing on worker w1"
    assert trail.take_died(redis_client, keys, "b1", 2) is None  # read and cleared


def test_orderly_endings_and_stale_entries_report_nothing(
    redis_client: Any, queue_name: str
) -> None:
    keys = QueueKeys(queue_name)
    trail.mark(redis_client, keys, "b1", "processing", 1, "w1")
    trail.clear(redis_client, keys, "b1")  # done, failed or handed back
    assert trail.take_died(redis_client, keys, "b1", 2) is None
    # Dead-lettered by orphan recovery at attempt 3, enqueued again: attempt 1 is fresh.
    trail.mark(redis_client, keys, "b2", "committing", 3, "w2")
    assert trail.take_died(redis_client, keys, "b2", 1) is None
    assert not redis_client.hexists(trail.trail_key(keys), "b2")
