"""Batch-scoped failures end that batch, never the worker (issue 16), through the real CLI
against real Redis, PostgreSQL and S3.

- poison the decoders choked on, hostile headers that reach S3 without ``transfer
  upload``, results PostgreSQL refuses: each ends its batch on the first attempt with the
  real reason, the worker goes on and the good batch behind them is done;
- worker-scoped trouble never burns attempts: a missing scratch root refuses to start, a
  scratch root that vanishes mid-run pauses the worker and the job survives;
- a SIGKILLed attempt is reported at the next pickup with the phase it died in.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Any

import pytest

from stagerd.db import ledger as db
from stagerd.queue.keys import QueueKeys
from tests.corpus import hostile_archives, hostile_payloads
from tests.worker_support import (
    WAVINFO,
    dead_letters,
    make_tar,
    phases,
    put_batch,
    scratch_leftovers,
    start_worker,
    wait_for,
)

ARCHIVES = {case.name: case for case in hostile_archives()}
PAYLOADS = {case.name: case for case in hostile_payloads()}


def _results_processor(tmp_path: Path, lines: list[str]) -> str:
    """A processor writing *lines* (raw JSON text) as its results file."""
    script = tmp_path / "bad_results.py"
    script.write_text(
        "import os, sys\n"
        f"lines = {lines!r}\n"
        "with open(os.environ['STAGERD_RESULTS'], 'w', encoding='utf-8') as out:\n"
        "    out.write('\\n'.join(lines) + '\\n')\n"
    )
    return f"{sys.executable} {script}"


def _failures(database_url: str, batch_id: str) -> list[db.FailureRow]:
    ledger = db.Ledger(database_url)
    try:
        return [f for f in ledger.recent_failures(1000) if f.batch_id == batch_id]
    finally:
        ledger.close()


def test_poison_payloads_and_hostile_headers_end_their_batch_on_attempt_one(
    run_cli: Any, stagerd_env: dict[str, str], s3_client: Any, s3_bucket: str,
    redis_client: Any, queue_name: str, database_url: str, scratch_dir: Path, tmp_path: Path,
) -> None:  # fmt: skip
    deep = PAYLOADS["deep-nesting-list"].data
    redis_client.rpush(queue_name, deep)
    # Others' raw payloads land in the dead and processing lists too.
    redis_client.rpush(QueueKeys(queue_name).dead, deep)
    redis_client.rpush(QueueKeys(queue_name).processing("gone-worker"), deep)
    # The operator tools read the queue too; the payload that crashed them must not.
    for args in (["status"], ["janitor", "--dry-run"], ["dlq", "list"]):
        result = run_cli(["--log-json", *args], env=stagerd_env, timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]
        assert "Traceback" not in result.stderr
    redis_client.delete(QueueKeys(queue_name).dead, QueueKeys(queue_name).processing("gone-worker"))
    # Straight to S3 and the queue: what an older producer or a bypassed check leaves.
    for name in ("pax-size-unicode-digits", "pax-size-5000-digits", "name-not-utf8"):
        put_batch(s3_client, redis_client, s3_bucket, queue_name, f"h-{name}",
                  ARCHIVES[name].data)  # fmt: skip
    put_batch(s3_client, redis_client, s3_bucket, queue_name, "good-after", make_tar(files=2))

    env = {**stagerd_env, "STAGERD_PROCESSOR": WAVINFO}
    result = run_cli(["--log-json", "gpu", "--burst", "--prefetch", "0"], env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "internal error" not in result.stderr and "Traceback" not in result.stderr

    dead = {entry["batch_id"]: entry for entry in dead_letters(redis_client, queue_name)}
    assert "levels deep" in dead[None]["error"]
    for name in ("pax-size-unicode-digits", "pax-size-5000-digits", "name-not-utf8"):
        entry = dead[f"h-{name}"]
        assert entry["attempts"] == 1 and ARCHIVES[name].reason in entry["error"], entry
        assert "exceeds" not in entry["error"].split(":", 1)[0]
    assert scratch_leftovers(scratch_dir) == []
    ledger = db.Ledger(database_url)
    try:
        row = ledger.batch("good-after")
        assert row is not None and row.state == "done"
    finally:
        ledger.close()


@pytest.mark.parametrize(
    ("lines", "why"),
    [
        (['{"item": "a\\u0000b", "v": 1}'], ("NUL",)),
        # Refused by stagerd's results validation, or by PostgreSQL if it gets that far.
        (['{"item": "a", "v": "x\\u0000y"}'], ("NUL", "Unicode escape")),
    ],
    ids=["nul-in-item", "escaped-nul-in-value"],
)
def test_results_postgres_refuses_end_the_batch_not_the_worker(
    run_cli: Any, stagerd_env: dict[str, str], s3_client: Any, s3_bucket: str,
    redis_client: Any, queue_name: str, database_url: str, scratch_dir: Path, tmp_path: Path,
    lines: list[str], why: tuple[str, ...],
) -> None:  # fmt: skip
    put_batch(s3_client, redis_client, s3_bucket, queue_name, "bad-results", make_tar(files=1))
    env = {**stagerd_env, "STAGERD_PROCESSOR": _results_processor(tmp_path, lines)}
    result = run_cli(["--log-json", "gpu", "--burst", "--prefetch", "0"], env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "internal error" not in result.stderr
    (entry,) = dead_letters(redis_client, queue_name)
    assert entry["batch_id"] == "bad-results" and entry["attempts"] == 1, entry
    assert any(w in entry["error"] for w in why) and "exceeds" not in entry["error"], entry
    failures = _failures(database_url, "bad-results")
    assert [f.outcome for f in failures] == ["dead"]
    assert any(w in failures[0].error for w in why)
    assert scratch_leftovers(scratch_dir) == []


def test_missing_scratch_root_refuses_to_start_and_burns_no_attempt(
    run_cli: Any, stagerd_env: dict[str, str], s3_client: Any, s3_bucket: str,
    redis_client: Any, queue_name: str, tmp_path: Path,
) -> None:  # fmt: skip
    put_batch(s3_client, redis_client, s3_bucket, queue_name, "waits", make_tar(files=1))
    missing = tmp_path / "not-mounted"
    env = {**stagerd_env, "STAGERD_PROCESSOR": WAVINFO, "STAGERD_SCRATCH_DIR": str(missing)}
    result = run_cli(["--log-json", "gpu", "--burst"], env=env, timeout=120)
    assert result.returncode == 1, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert "STAGERD_SCRATCH_DIR" in line and str(missing) in line, line
    assert redis_client.llen(queue_name) == 1  # still pending, untouched
    assert redis_client.hget(QueueKeys(queue_name).attempts, "waits") is None
    assert not missing.exists()  # never created on the root file system


def test_scratch_root_vanishing_mid_run_pauses_the_worker_and_loses_nothing(
    stagerd_env: dict[str, str], s3_client: Any, s3_bucket: str, redis_client: Any,
    queue_name: str, database_url: str, scratch_dir: Path,
) -> None:  # fmt: skip
    env = {**stagerd_env, "STAGERD_PROCESSOR": WAVINFO}
    worker = start_worker(env, "--prefetch", "0")
    try:
        wait_for(lambda: redis_client.exists(
            QueueKeys(queue_name).heartbeat(stagerd_env["STAGERD_WORKER_ID"])), 120,
            "the worker's heartbeat")  # fmt: skip
        hidden = scratch_dir.with_name("scratch.unmounted")
        scratch_dir.rename(hidden)  # what an unmounted volume looks like to the worker
        put_batch(s3_client, redis_client, s3_bucket, queue_name, "survives", make_tar(files=1))
        # Taken, failed on the missing root, handed back with its attempt refunded (0).
        wait_for(lambda: redis_client.hget(QueueKeys(queue_name).attempts, "survives") == b"0"
                 and redis_client.llen(queue_name) == 1, 120, "the job handed back")  # fmt: skip
        hidden.rename(scratch_dir)  # the volume is back
        wait_for(lambda: (r := _batch(database_url, "survives")) and r.state == "done", 180,
                 "the batch to be done after the pause")  # fmt: skip
    finally:
        worker.send_signal(signal.SIGTERM)
        _, err = worker.communicate(timeout=120)
    assert worker.returncode == 0, err[-3000:]
    assert "worker paused: scratch" in err and "worker resumed" in err, err[-3000:]
    assert dead_letters(redis_client, queue_name) == []
    assert [f.outcome for f in _failures(database_url, "survives")] == []


def _batch(database_url: str, batch_id: str) -> Any:
    ledger = db.Ledger(database_url)
    try:
        return ledger.batch(batch_id)
    finally:
        ledger.close()


def test_sigkilled_attempt_is_reported_with_its_phase_at_the_next_pickup(
    stagerd_env: dict[str, str], s3_client: Any, s3_bucket: str, redis_client: Any,
    queue_name: str, database_url: str,
) -> None:  # fmt: skip
    worker_id = stagerd_env["STAGERD_WORKER_ID"]
    put_batch(s3_client, redis_client, s3_bucket, queue_name, "killed", make_tar(files=1))
    env = {**stagerd_env, "STAGERD_PROCESSOR": "sleep 600", "STAGERD_MAX_ATTEMPTS": "1"}
    first = start_worker(env, "--prefetch", "0")
    try:
        wait_for(lambda: phases(redis_client, queue_name, worker_id).get("killed")
                 == "processing", 120, "processing")  # fmt: skip
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=60)
    # The same worker id restarts (systemd): it takes the job back and counts attempt 2.
    env["STAGERD_PROCESSOR"] = WAVINFO
    second = start_worker(env, "--prefetch", "0", "--burst")
    _, err = second.communicate(timeout=300)
    assert second.returncode == 0, err[-3000:]
    (entry,) = dead_letters(redis_client, queue_name)
    assert entry["batch_id"] == "killed"
    assert "attempt 1 died during processing" in entry["error"], entry
    assert "STAGERD_MAX_ATTEMPTS=1" in entry["error"]
    outcomes = {(f.outcome, f.phase) for f in _failures(database_url, "killed")}
    assert ("died", "processing") in outcomes and ("dead", "processing") in outcomes
    assert "attempt 1 died during processing" in err
