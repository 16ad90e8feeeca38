"""Prefetch (issue 11): staging the next batch while the current one is processed.

Staging is made slow for real by a throttling proxy in front of S3 (a slow link), the
processing by the sample processor's ``--sleep``. Wall time is taken from the ledger
(first batch started -> last batch finished), so process start-up does not blur the ratio.
"""

from __future__ import annotations

import itertools
import threading
from pathlib import Path
from typing import Any

import pytest

from stagerd.db import ledger as db
from stagerd.queue.keys import QueueKeys
from tests.faultproxy import FaultProxy
from tests.worker_support import (
    WAVINFO,
    make_tar,
    put_batch,
    scratch_leftovers,
    start_worker,
    wait_for,
)

BATCHES = 6
RATE = 1_000_000  # bytes/s: a ~1.3 MB batch stages in ~1.3-2 s


def _run_burst(env: dict[str, str], *args: str) -> None:
    proc = start_worker(env, "--burst", *args)
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]


def _span(ledger: db.Ledger, batches: list[str]) -> float:
    rows = [ledger.batch(b) for b in batches]
    assert all(r is not None and r.state == "done" for r in rows), rows
    started = min(r.started_at for r in rows if r and r.started_at)
    finished = max(r.finished_at for r in rows if r and r.finished_at)
    return (finished - started).total_seconds()


def _overlaps(rows: list[Any]) -> list[bool]:
    """For each consecutive pair: did the next batch's claim come before this one's end?"""
    assert all(r is not None and r.started_at and r.finished_at for r in rows), rows
    return [nxt.started_at < cur.finished_at for cur, nxt in itertools.pairwise(rows)]


def test_prefetch_stages_the_next_batch_during_processing_and_keeps_fifo(
    stagerd_env: dict[str, str],
    s3_server: Any,
    s3_client: Any,
    s3_bucket: str,
    redis_client: Any,
    queue_name: str,
    database_url: str,
    scratch_dir: Path,
) -> None:
    body = make_tar(files=3, seconds=20)
    runs = {mode: [f"{mode}-{i}" for i in range(BATCHES)] for mode in ("p0", "p1")}
    ledger = db.Ledger(database_url)
    spans: dict[str, float] = {}
    with FaultProxy(s3_server.endpoint, throttle_down=RATE) as proxy:
        env = {
            **stagerd_env,
            "S3_ENDPOINT": proxy.endpoint,
            "STAGERD_PROCESSOR": f"{WAVINFO} --sleep 1.5",
        }
        for mode, batches in runs.items():
            for batch in batches:
                put_batch(s3_client, redis_client, s3_bucket, queue_name, batch, body)
            _run_burst(env, "--prefetch", mode[1])
            spans[mode] = _span(ledger, batches)
    try:
        rows = {mode: [ledger.batch(b) for b in batches] for mode, batches in runs.items()}
    finally:
        ledger.close()
    order = rows["p1"]
    finished = [r.finished_at for r in order if r is not None]
    assert finished == sorted(finished), "prefetch broke FIFO order"
    stage_times = [r.stage_seconds for r in order if r is not None and r.stage_seconds]
    ratio = spans["p1"] / spans["p0"]
    print(f"prefetch 0: {spans['p0']:.1f}s, prefetch 1: {spans['p1']:.1f}s, ratio {ratio:.2f}")
    assert min(stage_times) > 0.8, stage_times  # staging really was slow
    # The structure, not a speed: with prefetch every next batch was claimed (its staging
    # began) before the one before it was done; without, never.
    assert _overlaps(rows["p1"]) == [True] * (BATCHES - 1), rows["p1"]
    assert _overlaps(rows["p0"]) == [False] * (BATCHES - 1), rows["p0"]
    assert scratch_leftovers(scratch_dir) == []


def test_budget_for_one_batch_makes_prefetch_wait(
    stagerd_env: dict[str, str],
    s3_client: Any,
    s3_bucket: str,
    redis_client: Any,
    queue_name: str,
    database_url: str,
    scratch_dir: Path,
) -> None:
    body = make_tar(files=4, seconds=5)
    batches = [f"w{i}" for i in range(3)]
    for batch in batches:
        put_batch(s3_client, redis_client, s3_bucket, queue_name, batch, body)
    env = {
        **stagerd_env,
        "STAGERD_SCRATCH_BUDGET": str(int(len(body) * 1.5)),
        "STAGERD_PROCESSOR": f"{WAVINFO} --sleep 1.5",
    }
    most_dirs = 0
    seen_waiting = threading.Event()
    proc = start_worker(env, "--burst", "--prefetch", "1")
    processing = QueueKeys(queue_name).processing(stagerd_env["STAGERD_WORKER_ID"])

    def watch() -> bool:
        nonlocal most_dirs
        most_dirs = max(most_dirs, len(scratch_leftovers(scratch_dir)))
        # Two jobs in flight with one dir: the prefetched one is popped and waiting.
        if redis_client.llen(processing) == 2 and len(scratch_leftovers(scratch_dir)) == 1:
            seen_waiting.set()
        return proc.poll() is not None

    wait_for(watch, 90, "the worker to finish", interval=0.02)
    assert proc.returncode == 0, proc.stderr.read()[-3000:]  # type: ignore[union-attr]
    assert most_dirs == 1, "prefetch overran a budget that fits one batch"
    assert seen_waiting.is_set(), "prefetch never popped the next batch"
    ledger = db.Ledger(database_url)
    try:
        assert ledger.count_by_state() == {"done": 3}
    finally:
        ledger.close()
    assert scratch_leftovers(scratch_dir) == []


@pytest.mark.parametrize("prefetch", ["0", "2"])
def test_prefetch_settings_all_finish(
    prefetch: str,
    stagerd_env: dict[str, str],
    s3_client: Any,
    s3_bucket: str,
    redis_client: Any,
    queue_name: str,
    database_url: str,
    scratch_dir: Path,
) -> None:
    for i in range(4):
        put_batch(s3_client, redis_client, s3_bucket, queue_name, f"q{i}", make_tar())
    _run_burst({**stagerd_env, "STAGERD_PROCESSOR": WAVINFO}, "--prefetch", prefetch)
    ledger = db.Ledger(database_url)
    try:
        assert ledger.count_by_state() == {"done": 4}
    finally:
        ledger.close()
    assert scratch_leftovers(scratch_dir) == []


def test_a_done_batch_is_released_once_the_next_staged_one_is_processing(
    settings: Any,
    s3_client: Any,
    s3_bucket: str,
    redis_client: Any,
    queue_name: str,
    database_url: str,
    scratch_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Released first, the done batch gave its token back and the stager's threads slowed
    the next processor's start-up (issue 19). Now the next staged batch's processor is
    spawned first; a batch with nothing staged behind it is released at once."""
    from stagerd.gpu.worker import WorkerOptions, run
    from stagerd.processor import runner
    from stagerd.scratch.space import Reservation

    events: list[str] = []
    spawn, release = runner._Child.__init__, Reservation.release

    def spawned(self: Any, argv: list[str], **kw: Any) -> None:
        spawn(self, argv, **kw)
        events.append(f"spawned {kw['env']['STAGERD_BATCH_ID']}")

    def released(self: Reservation, *, remove: bool = True) -> None:
        events.append(f"released {self.batch_id}")
        release(self, remove=remove)

    monkeypatch.setattr(runner._Child, "__init__", spawned)
    monkeypatch.setattr(Reservation, "release", released)
    batches = [f"r{i}" for i in range(3)]
    for batch in batches:
        put_batch(s3_client, redis_client, s3_bucket, queue_name, batch, make_tar(files=1))
    db.migrate(database_url)
    # Staging a one-file batch from loopback S3 takes far less than the 3 s of processing:
    # each next batch is staged by the time the one before it ends.
    opts = WorkerOptions(burst=True, processor=f"{WAVINFO} --sleep 3", prefetch=1, tick=0.1)
    run(settings, opts, threading.Event())
    assert events == [
        "spawned r0",
        "spawned r1",
        "released r0",
        "spawned r2",
        "released r1",
        "released r2",
    ]
    ledger = db.Ledger(database_url)
    try:
        assert ledger.count_by_state() == {"done": 3}
    finally:
        ledger.close()
    assert scratch_leftovers(scratch_dir) == []


def test_a_deferred_release_runs_once_and_its_error_surfaces_after_processing() -> None:
    from stagerd.gpu.prefetch import _Release

    class Held:  # pure logic: what _Release does with the batch it holds
        closes = 0

        def close(self) -> None:
            self.closes += 1
            raise OSError("scratch record could not be removed")

    held = Held()
    release = _Release(held)  # type: ignore[arg-type]
    release()  # as the runner calls it: must not raise into the processor's start
    release()
    assert held.closes == 1
    with pytest.raises(OSError, match="could not be removed"):
        release.finish()  # after processing: the slot ends, as a failed close always did
    assert held.closes == 1
    _Release(None).finish()  # nothing held: nothing to do
