"""``stagerd status`` against real services."""

from __future__ import annotations

import json

from stagerd.job import Job
from stagerd.queue.keys import QueueKeys
from stagerd.queue.redis_queue import ReliableQueue, connect


def test_status_json_shape(run_cli, stagerd_env, redis_client) -> None:
    keys = QueueKeys(stagerd_env["STAGERD_QUEUE"])
    for batch_id in ("s1", "s2", "s3"):
        redis_client.rpush(keys.pending, Job.new(batch_id).to_json())
    q = ReliableQueue(connect(stagerd_env["REDIS_URL"]), keys, "w-status", heartbeat_ttl=30)
    q.register()
    d = q.pop(0.1)
    assert d is not None
    q.set_phase(d, "processing")
    dead = q.pop(0.1)
    assert dead is not None
    q.dead_letter(dead, "bad archive")

    result = run_cli(["status", "--json"], env=stagerd_env)
    data = json.loads(result.stdout)
    assert data["queue"] == {"name": keys.pending, "pending": 1, "dead": 1}
    (worker,) = data["workers"]
    assert worker["id"] == "w-status" and worker["alive"] is True
    (job,) = worker["in_flight"]
    assert job["batch_id"] == "s1" and job["phase"] == "processing" and job["attempt"] == 1
    assert job["age_seconds"] >= 0
    assert set(data) >= {"queue", "workers", "scratch", "recent_failures", "errors"}

    human = run_cli(["status"], env=stagerd_env)
    assert "w-status" in human.stdout and "processing" in human.stdout


def test_status_reports_unreachable_redis(run_cli, stagerd_env) -> None:
    env = {**stagerd_env, "REDIS_URL": "redis://:pw-secret-1@127.0.0.1:9/0"}
    result = run_cli(["status", "--json"], env=env, timeout=120)
    assert result.returncode == 1
    data = json.loads(result.stdout)
    assert data["queue"] is None and data["errors"][0].startswith(
        "redis at redis://:***@127.0.0.1:9/0"
    )
    assert "pw-secret-1" not in result.stdout + result.stderr


def test_status_shows_scratch_reservations(run_cli, stagerd_env, settings) -> None:
    from stagerd.scratch.space import ScratchManager

    manager = ScratchManager.from_settings(settings)
    with manager.reserve("held-batch", 10 * 1024 * 1024) as reservation:
        (reservation.path / "x").write_bytes(b"0" * 4096)
        data = json.loads(run_cli(["status", "--json"], env=stagerd_env).stdout)
        scratch = data["scratch"]
        assert scratch["budget"] == 2 * 1024**3
        assert scratch["reserved"] == 10 * 1024 * 1024
        assert [r["batch_id"] for r in scratch["reservations"]] == ["held-batch"]
    after = json.loads(run_cli(["status", "--json"], env=stagerd_env).stdout)
    assert after["scratch"]["reserved"] == 0 and after["scratch"]["reservations"] == []
