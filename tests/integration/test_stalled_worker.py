"""Issue 17 (a): a worker SIGSTOPped (whole process group, processor included) for longer
than twice the heartbeat TTL mid-processing is recovered by another worker; when it
resumes its heartbeat finds its registration gone, it stops its processor and abandons
the batch (nothing committed). SIGKILLed later during its next batch, that batch is still
recovered (its processing list is found although recovery once removed it from the
workers set). Both batches end done exactly once; status and the janitor tell the truth.

Real CLI processes, real Redis, PostgreSQL and S3.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

from stagerd.db import ledger as db
from stagerd.queue.keys import QueueKeys
from tests.reliability_support import (
    Proc,
    counting_processor,
    processor_runs,
    run_lines,
    start_end_processor,
    watching,
)
from tests.worker_support import make_tar, phases, put_batch, scratch_leftovers, wait_for

TTL = 3.0


def _row(database_url: str, batch: str) -> Any:
    ledger = db.Ledger(database_url)
    try:
        return ledger.batch(batch)
    finally:
        ledger.close()


def test_stalled_worker_is_fenced_then_its_next_batch_survives_sigkill(
    stagerd_env: dict[str, str],
    s3_client: Any,
    s3_bucket: str,
    redis_client: Any,
    queue_name: str,
    database_url: str,
    scratch_dir: Path,
    run_cli: Any,
    tmp_path: Path,
) -> None:
    keys = QueueKeys(queue_name)
    runs = tmp_path / "runs"
    env = {**stagerd_env, "STAGERD_HEARTBEAT_TTL": f"{TTL:g}s"}
    # Far longer than the test: the stalled worker's processor can only end by being stopped.
    slow = {**env, "STAGERD_PROCESSOR": counting_processor(runs, "--sleep", "300")}
    # The rescuer is another host: its own scratch (on one host it would wait for the
    # stalled worker's dir lock, which the kernel keeps while the process is stopped).
    other_scratch = tmp_path / "other-scratch"
    other_scratch.mkdir()
    fast = {
        **env,
        "STAGERD_PROCESSOR": counting_processor(runs),
        "STAGERD_SCRATCH_DIR": str(other_scratch),
    }
    put_batch(s3_client, redis_client, s3_bucket, queue_name, "s1", make_tar(files=2))

    stalled = Proc({**slow, "STAGERD_WORKER_ID": "w-stall"}, tmp_path / "stall.log", "gpu")
    with watching([stalled]) as procs:
        wait_for(
            lambda: phases(redis_client, queue_name, "w-stall").get("s1") == "processing",
            60,
            "s1 processing on w-stall",
        )
        # The phase is set before the processor starts: stall only once it has begun, so the
        # stalled worker's processor is really running (and must be stopped on resume).
        wait_for(lambda: processor_runs(runs).count("s1") == 1, 60, "s1's processor started")
        stalled.signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        rescuer = Proc({**fast, "STAGERD_WORKER_ID": "w-rescue"}, tmp_path / "rescue.log", "gpu")
        procs.append(rescuer)
        # Stalled at least 2 x TTL, and until the rescuer has committed s1.
        wait_for(
            lambda: getattr(_row(database_url, "s1"), "state", None) == "done",
            120,
            "s1 done by the rescuer",
            interval=0.5,
        )
        while time.monotonic() - stopped_at < 2 * TTL:
            time.sleep(0.2)
        assert _row(database_url, "s1").worker == "w-rescue"
        stalled.signal(signal.SIGCONT)
        # The stalled worker learns it lost the lease and abandons s1 before anything else.
        wait_for(lambda: stalled.has("lease_abandoned", "s1"), 60, "w-stall abandons s1")
        assert stalled.has("registration_lost")
        events = [r.get("event") for r in stalled.events()]
        assert events.index("registration_lost") < events.index("lease_lost")
        assert events.index("lease_lost") < events.index("lease_abandoned")
        assert not any(
            r.get("batch_id") == "s1" and str(r.get("msg", "")).startswith("batch s1 done")
            for r in stalled.events()
        ), stalled.tail()
        # Its processor was stopped (it would have slept 300 s): the scratch dir is gone.
        wait_for(lambda: not (scratch_dir / "s1").exists(), 30, "s1 scratch released")

        rescuer.signal(signal.SIGTERM)
        assert rescuer.popen.wait(60) == 0, rescuer.tail()
        put_batch(s3_client, redis_client, s3_bucket, queue_name, "s2", make_tar(files=2))
        wait_for(
            lambda: phases(redis_client, queue_name, "w-stall").get("s2") == "processing",
            60,
            "s2 processing on w-stall",
        )
        # The phase is set before the processor starts (under its reaper): kill only once
        # the processor has really begun, so "killed mid-processing" is what happens.
        wait_for(lambda: processor_runs(runs).count("s2") == 1, 60, "s2's processor started")
        stalled.kill()
        status = run_cli(["status", "--json"], env=env)
        assert status.returncode in (0, 1), status.stderr
        workers = {w["id"]: w for w in json.loads(status.stdout)["workers"]}
        assert [j["batch_id"] for j in workers["w-stall"]["in_flight"]] == ["s2"]

        wait_for(lambda: not redis_client.exists(keys.heartbeat("w-stall")), 30, "expiry")
        janitor = run_cli(["janitor", "--json", "--min-age", "0s"], env=env)
        assert janitor.returncode == 0, janitor.stderr
        assert json.loads(janitor.stdout)["requeued_jobs"] == ["s2"]

        rescuer = Proc(
            {**fast, "STAGERD_WORKER_ID": "w-rescue"}, tmp_path / "r2.log", "gpu", "--burst"
        )
        procs.append(rescuer)
        assert rescuer.popen.wait(120) == 0, rescuer.tail()

    for batch in ("s1", "s2"):
        row = _row(database_url, batch)
        assert row is not None and row.state == "done", (batch, row)
        assert row.worker == "w-rescue"
    ledger = db.Ledger(database_url)
    try:
        assert [len(ledger.results(b)) for b in ("s1", "s2")] == [2, 2]
    finally:
        ledger.close()
    # s1 ran on the stalled worker (stopped) and the rescuer, s2 likewise (killed).
    assert sorted(processor_runs(runs)) == ["s1", "s1", "s2", "s2"]
    assert redis_client.llen(keys.pending) == 0
    assert redis_client.llen(keys.processing("w-stall")) == 0
    assert scratch_leftovers(scratch_dir) == []
    assert scratch_leftovers(other_scratch) == []


def test_same_host_rescuer_adopts_the_results_a_stalled_worker_finished(
    stagerd_env: dict[str, str],
    s3_client: Any,
    s3_bucket: str,
    redis_client: Any,
    queue_name: str,
    database_url: str,
    scratch_dir: Path,
    tmp_path: Path,
) -> None:
    """A worker paused past its lease while its processor (in a session of its own) runs
    on and finishes. The worker that takes the batch over on the same host finds the dir
    still locked by the paused one and waits; resumed, the paused worker is fenced, keeps
    the finished results and lets go; the rescuer adopts and commits them. The processor
    ran once: no second GPU run for a pause."""
    keys = QueueKeys(queue_name)
    runs = tmp_path / "runs"
    env = {
        **stagerd_env,
        "STAGERD_HEARTBEAT_TTL": f"{TTL:g}s",
        "STAGERD_PROCESSOR": start_end_processor(runs, "--sleep", "1"),
    }
    put_batch(s3_client, redis_client, s3_bucket, queue_name, "s1", make_tar(files=2))
    stalled = Proc({**env, "STAGERD_WORKER_ID": "w-stall"}, tmp_path / "stall.log", "gpu")
    with watching([stalled]) as procs:
        wait_for(lambda: run_lines(runs, "start") == ["s1"], 60, "s1's processor started")
        stalled.signal(signal.SIGSTOP)
        # The processor is not in the worker's process group: it finishes meanwhile.
        wait_for(lambda: run_lines(runs, "end") == ["s1"], 60, "s1's processor finished")
        rescuer = Proc({**env, "STAGERD_WORKER_ID": "w-rescue"}, tmp_path / "rescue.log", "gpu")
        procs.append(rescuer)
        wait_for(lambda: rescuer.has("scratch_dir_held", "s1"), 60, "the rescuer waits")
        assert getattr(_row(database_url, "s1"), "state", None) != "done"
        stalled.signal(signal.SIGCONT)
        wait_for(lambda: stalled.has("lease_abandoned", "s1"), 60, "w-stall abandons s1")
        wait_for(lambda: rescuer.has("commit_resumed", "s1"), 60, "the rescuer adopts s1")
        wait_for(
            lambda: getattr(_row(database_url, "s1"), "state", None) == "done",
            60,
            "s1 done",
            interval=0.5,
        )
        for proc in (stalled, rescuer):
            proc.signal(signal.SIGTERM)
            assert proc.popen.wait(60) == 0, proc.tail()

    assert run_lines(runs, "start") == ["s1"] and run_lines(runs, "end") == ["s1"]
    row = _row(database_url, "s1")
    assert row.state == "done" and row.worker == "w-rescue", row
    ledger = db.Ledger(database_url)
    try:
        assert len(ledger.results("s1")) == 2
    finally:
        ledger.close()
    assert not any(str(r.get("msg", "")).startswith("batch s1 done") for r in stalled.events()), (
        stalled.tail()
    )
    assert redis_client.llen(keys.pending) == 0
    assert redis_client.llen(keys.processing("w-stall")) == 0
    assert redis_client.llen(keys.processing("w-rescue")) == 0
    assert scratch_leftovers(scratch_dir) == []
