"""``stagerd doctor`` against real services."""

from __future__ import annotations

import json
import sys


def test_transfer_role_passes_against_real_services(run_cli, stagerd_env) -> None:
    result = run_cli(["doctor", "--role", "transfer", "--json"], env=stagerd_env)
    data = json.loads(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    names = {c["name"]: c for c in data["checks"]}
    assert {"config", "s3.bucket", "s3.multipart", "s3.checksum", "redis"} <= set(names)
    assert all(c["ok"] for c in data["checks"])
    assert "using when_required" in names["s3.checksum"]["detail"]


def test_failures_are_reported_with_hints_and_exit_1(run_cli, stagerd_env, tmp_path) -> None:
    env = {
        **stagerd_env,
        "S3_SECRET_KEY": "definitely-wrong-secret",
        "REDIS_URL": "redis://127.0.0.1:9/0",
        "STAGERD_SCRATCH_DIR": str(tmp_path / "missing"),
        "STAGERD_PROCESSOR": "no-such-processor-binary --flag",
    }
    result = run_cli(["doctor"], env=env, timeout=180)
    assert result.returncode == 1
    out = result.stdout
    assert "FAIL  s3.bucket" in out and "access denied" in out
    assert "FAIL  redis" in out and "FAIL  scratch" in out and "FAIL  processor" in out
    assert "hint:" in out
    assert "definitely-wrong-secret" not in out + result.stderr
    assert "Traceback" not in result.stderr


def test_processor_and_scratch_pass(run_cli, stagerd_env) -> None:
    env = {**stagerd_env, "STAGERD_PROCESSOR": f"{sys.executable} -m stagerd.samples.wavinfo"}
    result = run_cli(["doctor", "--json"], env=env)
    checks = {c["name"]: c for c in json.loads(result.stdout)["checks"]}
    assert checks["processor"]["ok"], checks["processor"]
    assert checks["scratch"]["ok"], checks["scratch"]


def test_bad_role_is_usage_error(run_cli, stagerd_env) -> None:
    result = run_cli(["doctor", "--role", "orchestrator"], env=stagerd_env)
    assert result.returncode == 2 and "--role" in result.stderr


def test_postgres_check_wants_migrations(run_cli, stagerd_env) -> None:
    env = {**stagerd_env, "STAGERD_PROCESSOR": f"{sys.executable} -m stagerd.samples.wavinfo"}
    before = json.loads(run_cli(["doctor", "--json"], env=env).stdout)
    pg = {c["name"]: c for c in before["checks"]}["postgres"]
    assert not pg["ok"] and "not applied" in pg["detail"] and "stagerd db migrate" in pg["hint"]
    assert run_cli(["db", "migrate"], env=env).returncode == 0
    after = run_cli(["doctor", "--json"], env=env)
    data = json.loads(after.stdout)
    assert {c["name"]: c for c in data["checks"]}["postgres"]["ok"]
    assert after.returncode == 0 and data["ok"] is True, after.stdout


def test_redis_without_persistence_is_a_warning_not_a_failure(run_cli, stagerd_env, tmp_path):
    """Issue 17: a Redis that keeps nothing across a restart loses the queue with it."""
    from tests.restartable import RedisServer

    for durable, verdict in ((False, "WARN"), (True, "PASS")):
        with RedisServer(tmp_path / f"redis-{durable}", durable=durable) as server:
            env = {**stagerd_env, "REDIS_URL": server.url}
            result = run_cli(["doctor", "--role", "transfer"], env=env)
            assert result.returncode == 0, result.stdout + result.stderr
            line = next(x for x in result.stdout.splitlines() if "redis.persist" in x)
            assert line.startswith(verdict), result.stdout
            if not durable:
                assert "no persistence" in line and "appendonly yes" in result.stdout
