"""queue_snapshot against a real Redis: what ``stagerd status`` renders."""

from __future__ import annotations

from stagerd.job import Job
from stagerd.queue.keys import QueueKeys
from stagerd.queue.redis_queue import ReliableQueue, connect
from stagerd.queue.snapshot import InFlightJob, queue_snapshot


def test_snapshot_sees_live_dead_and_unregistered_workers(
    redis_url, redis_client, queue_name
) -> None:
    keys = QueueKeys(queue_name)
    redis_client.rpush(keys.pending, Job.new("p1").to_json(), Job.new("p2").to_json())
    q = ReliableQueue(connect(redis_url), keys, "w-live", heartbeat_ttl=30)
    q.register()
    d = q.pop(0.1)
    assert d is not None
    q.set_phase(d, "extracting")
    # A worker that fell out of the workers set but still holds a job without a batch id.
    redis_client.rpush(keys.processing("w-gone"), b"garbage")

    snap = queue_snapshot(redis_client, keys)

    assert (snap.name, snap.pending, snap.dead) == (keys.pending, 1, 0)
    assert [w.id for w in snap.workers] == ["w-gone", "w-live"]
    gone, live = snap.workers
    assert not gone.alive and gone.in_flight == (InFlightJob(None, "queued", None, None),)
    assert live.alive and live.heartbeat_ttl_ms is not None and live.heartbeat_ttl_ms > 0
    (job,) = live.in_flight
    assert job.batch_id == "p1" and job.phase == "extracting" and job.attempt == 1
    assert job.since is not None
