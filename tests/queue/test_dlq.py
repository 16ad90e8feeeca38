"""``stagerd dlq`` against a real Redis, through the real CLI."""

from __future__ import annotations

import json

from stagerd.job import Job
from stagerd.queue.keys import QueueKeys
from stagerd.queue.redis_queue import ReliableQueue, connect


def _dead_letter(stagerd_env, *batch_ids: str, raw: bytes | None = None) -> None:
    keys = QueueKeys(stagerd_env["STAGERD_QUEUE"])
    q = ReliableQueue(connect(stagerd_env["REDIS_URL"]), keys, "w-dlq", heartbeat_ttl=5)
    q.register()
    client = q.client
    for batch_id in batch_ids:
        client.rpush(keys.pending, Job.new(batch_id).to_json())
    if raw is not None:
        client.rpush(keys.pending, raw)
    while (d := q.pop(0.1)) is not None:
        q.dead_letter(d, d.error or f"processor failed for {d.batch_id}")


def test_list_show_retry_purge(run_cli, stagerd_env, redis_client) -> None:
    _dead_letter(stagerd_env, "bad-1", "bad-2", raw=b"garbage")
    keys = QueueKeys(stagerd_env["STAGERD_QUEUE"])

    listed = run_cli(["dlq", "list", "--json"], env=stagerd_env)
    assert listed.returncode == 0, listed.stderr
    data = json.loads(listed.stdout)
    assert data["count"] == 3
    assert [e["batch_id"] for e in data["entries"]] == ["bad-1", "bad-2", None]
    assert "not JSON" in data["entries"][2]["error"]
    human = run_cli(["dlq", "list"], env=stagerd_env)
    assert "bad-1" in human.stdout and "(invalid)" in human.stdout

    entry_id = data["entries"][0]["id"]
    shown = run_cli(["dlq", "show", entry_id], env=stagerd_env)
    assert shown.returncode == 0
    assert json.loads(json.loads(shown.stdout)["payload"])["batch_id"] == "bad-1"
    by_batch = run_cli(["dlq", "show", "bad-2"], env=stagerd_env)
    assert json.loads(by_batch.stdout)["batch_id"] == "bad-2"
    missing = run_cli(["dlq", "show", "nope"], env=stagerd_env)
    assert (
        missing.returncode == 2 and "nope" in missing.stderr and "Traceback" not in missing.stderr
    )

    retried = run_cli(["dlq", "retry", "bad-1"], env=stagerd_env)
    assert retried.returncode == 0, retried.stderr
    assert json.loads(retried.stdout) == {"retried": 1, "batch_ids": ["bad-1"]}
    pending = [json.loads(r)["batch_id"] for r in redis_client.lrange(keys.pending, 0, -1)]
    assert pending == ["bad-1"]
    assert redis_client.hget(keys.attempts, "bad-1") is None

    young = run_cli(["dlq", "purge", "--older-than", "1h"], env=stagerd_env)
    assert json.loads(young.stdout) == {"purged": 0}
    everything = run_cli(["dlq", "purge"], env=stagerd_env)
    assert json.loads(everything.stdout) == {"purged": 2}
    assert redis_client.llen(keys.dead) == 0


def test_retry_all_and_usage_errors(run_cli, stagerd_env, redis_client) -> None:
    _dead_letter(stagerd_env, "r1", "r2")
    both = run_cli(["dlq", "retry", "r1", "--all"], env=stagerd_env)
    assert both.returncode == 2
    neither = run_cli(["dlq", "retry"], env=stagerd_env)
    assert neither.returncode == 2
    result = run_cli(["dlq", "retry", "--all"], env=stagerd_env)
    assert json.loads(result.stdout)["retried"] == 2
    assert redis_client.llen(QueueKeys(stagerd_env["STAGERD_QUEUE"]).pending) == 2
    bad_age = run_cli(["dlq", "purge", "--older-than", "soon"], env=stagerd_env)
    assert bad_age.returncode == 2 and "--older-than" in bad_age.stderr


def test_unreachable_redis_is_one_clear_error(run_cli, stagerd_env) -> None:
    env = {**stagerd_env, "REDIS_URL": "redis://:sekrit-pw@127.0.0.1:9/0"}
    result = run_cli(["dlq", "list"], env=env, timeout=120)
    assert result.returncode == 1
    assert "Redis unreachable" in result.stderr and "Traceback" not in result.stderr
    assert "sekrit-pw" not in result.stderr
