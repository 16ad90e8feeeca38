"""Issue 17 (d): PostgreSQL unreachable for 90 s at commit (a TCP proxy in front of it
stopped, every connection reset, then started again), once with the worker riding it out
once with the worker SIGKILLed and restarted (same identity) during the outage, and once
with the killed worker replaced by another worker on the same host (a new identity, which
recovers the dead worker's job and adopts its processed results): the processor ran once for
the batch and it ends done, its results committed once.

Set STAGERD_TEST_PG_OUTAGE (seconds) to shorten the outage locally.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from stagerd.queue.keys import QueueKeys
from tests.reliability_support import Proc, assert_done, counting_processor, processor_runs
from tests.tcpproxy import TcpProxy
from tests.worker_support import make_tar, phases, put_batch, scratch_leftovers, wait_for

OUTAGE = float(os.environ.get("STAGERD_TEST_PG_OUTAGE", "90"))


@pytest.mark.parametrize(
    "restart", [None, "same", "other"], ids=["ride-out", "restart", "another-worker"]
)
def test_results_outlive_a_postgres_outage_at_commit(
    restart: str | None,
    stagerd_env: dict[str, str],
    s3_client: Any,
    s3_bucket: str,
    redis_client: Any,
    queue_name: str,
    database_url: str,
    scratch_dir: Path,
    tmp_path: Path,
    run_cli: Any,
) -> None:
    assert "@127.0.0.1:5432/" in database_url
    runs = tmp_path / "runs"
    proxy = TcpProxy("127.0.0.1", 5432).start()
    env = {
        **stagerd_env,
        "DATABASE_URL": database_url.replace(":5432/", f":{proxy.port}/"),
        "STAGERD_PROCESSOR": counting_processor(runs, "--sleep", "3"),
    }
    worker = stagerd_env["STAGERD_WORKER_ID"]
    put_batch(s3_client, redis_client, s3_bucket, queue_name, "pg1", make_tar(files=2))
    procs = [Proc(env, tmp_path / "w1.log", "gpu", "--burst")]
    try:
        wait_for(
            lambda: phases(redis_client, queue_name, worker).get("pg1") == "processing",
            60,
            "pg1 processing",
        )
        proxy.stop()
        down_at = time.monotonic()
        wait_for(
            lambda: phases(redis_client, queue_name, worker).get("pg1") == "committing",
            60,
            "pg1 committing",
        )
        if restart:
            procs[0].kill()
            assert (scratch_dir / "pg1" / "processed.json").exists()
            successor = env
            if restart == "other":
                # Another worker on this host takes the dead one's job: once its heartbeat
                # has expired, the janitor's recovery (Redis only: PostgreSQL is still down)
                # puts it back on the queue.
                keys = QueueKeys(queue_name)
                wait_for(lambda: not redis_client.exists(keys.heartbeat(worker)), 30, "expiry")
                janitor = run_cli(["janitor", "--json", "--min-age", "0s"], env=env)
                assert json.loads(janitor.stdout)["requeued_jobs"] == ["pg1"], janitor.stderr
                successor = {**env, "STAGERD_WORKER_ID": f"{worker}-b"}
            procs.append(Proc(successor, tmp_path / "w2.log", "gpu", "--burst"))
        time.sleep(max(0.0, OUTAGE - (time.monotonic() - down_at)))
        proxy.start()
        assert procs[-1].popen.wait(300) == 0, procs[-1].tail()
        if restart:
            assert procs[-1].has("commit_resumed", "pg1"), procs[-1].tail()
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n" + "\n".join(p.tail() for p in procs)) from None
    finally:
        for proc in procs:
            proc.kill()
        proxy.stop()

    assert processor_runs(runs) == ["pg1"]
    assert_done(database_url, "pg1", 2)
    assert redis_client.llen(queue_name) == 0
    assert scratch_leftovers(scratch_dir) == []


def test_the_janitor_keeps_processed_results_that_wait_for_their_commit() -> None:
    from stagerd.scratch.sweep import KEEP_YOUNG, PROCESSED_MIN_AGE, REMOVE, EntryFacts, decide

    waiting = EntryFacts("b", "dir", locked=False, age=3600.0, processed=True)
    assert decide(waiting, min_age=0.0) == KEEP_YOUNG
    stale = EntryFacts("b", "dir", locked=False, age=PROCESSED_MIN_AGE + 1, processed=True)
    assert decide(stale, min_age=0.0) == REMOVE
    assert decide(EntryFacts("b", "dir", locked=False, age=3600.0), min_age=900.0) == REMOVE


def test_the_janitor_removes_processed_results_whose_batch_another_worker_finished(
    tmp_path: Path,
) -> None:
    """Found by the chaos run: a worker killed after processing, whose job another worker
    then redid, left its results dir for a day. Once the ledger says the batch is done or
    dead those results can never be committed, so the sweep treats them as any stale dir."""
    import time

    from stagerd.scratch.sweep import sweep_scratch

    root = tmp_path / "scratch"
    for name in ("finished", "waiting"):
        (root / name).mkdir(parents=True)
        (root / name / "processed.json").write_text("{}")
        (root / name / "results.jsonl").write_text('{"item": "a"}\n')
    # Two hours old (ctime cannot be set back, so the clock is moved on instead).
    later = time.time() + 7200
    swept = sweep_scratch(root, min_age=0.0, now=later, settled=lambda n: n == "finished")
    assert swept.removed == [str(root / "finished")]
    assert (root / "waiting" / "processed.json").exists()
