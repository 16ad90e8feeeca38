"""A batch's lifetime (stagerd.gpu.batch): every way a batch ends gives back what it held,
once: its scratch reservation, its place in the in-flight count, its slot token, its lease.

First the lifetime object alone on a real scratch dir; then through the pipeline's steps
against the real servers, with each phase made to fail: staging (a corrupt archive),
``mark_processing`` (PostgreSQL refusing the call), processing (a processor that exits 1),
the commit (a refused and a deferred one), and the hand-back.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from stagerd.db import ledger as db
from stagerd.errors import ArchiveRejected, ResultsRejected, ServiceUnavailable
from stagerd.gpu.batch import Batch, InFlight, Staged
from stagerd.gpu.pipeline import BatchSteps, StepConfig
from stagerd.job import Job
from stagerd.processor.runner import Processor, make_processor
from stagerd.queue.errors import is_transient_redis
from stagerd.queue.keys import QueueKeys
from stagerd.queue.lease import Fence, LeaseBook
from stagerd.queue.redis_queue import Delivery, ReliableQueue
from stagerd.retry import Policies, RetryPolicy
from stagerd.scratch.space import Reservation, ScratchManager
from tests.worker_support import WAVINFO, make_tar, pending_ids, put_batch

FAST = RetryPolicy(attempts=3, base=0.01, max_delay=0.05, total=5.0)
MiB = 1 << 20


@pytest.fixture
def releases(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, bool]]:
    """Every call of Reservation.release: (batch id, remove)."""
    calls: list[tuple[str, bool]] = []
    original = Reservation.release

    def counting(self: Reservation, *, remove: bool = True) -> None:
        calls.append((self.batch_id, remove))
        original(self, remove=remove)

    monkeypatch.setattr(Reservation, "release", counting)
    return calls


def _token() -> threading.BoundedSemaphore:
    token = threading.BoundedSemaphore(1)
    assert token.acquire(blocking=False)
    return token


def _assert_token_released_once(token: threading.BoundedSemaphore) -> None:
    # A BoundedSemaphore refuses a release past its size: one more means it was given back.
    with pytest.raises(ValueError):
        token.release()


# --- the lifetime object alone --------------------------------------------------------


class Lone:
    """A batch's parts without services: a real scratch manager, a lease book, a count."""

    def __init__(self, root: Path) -> None:
        root.mkdir()
        self.scratch = ScratchManager(root, budget=8 * MiB, headroom=0)
        self.in_flight = InFlight()
        self.leases = LeaseBook()
        self.token = _token()
        self.requeued: list[tuple[str | None, str]] = []

    def batch(self, batch_id: str = "b-1") -> Batch:
        delivery = Delivery.parse(Job.new(batch_id).to_json().encode())
        assert delivery.batch_id == batch_id
        return Batch(
            delivery,
            in_flight=self.in_flight,
            leases=self.leases,
            requeue=lambda d, reason: self.requeued.append((d.batch_id, reason)),
            token=self.token,
        )

    def reserve(self, batch: Batch) -> Reservation:
        batch.hold(Fence(threading.Event()))
        return batch.own(self.scratch.reserve(batch.delivery.batch_id or "?", MiB))

    def assert_all_given_back(self) -> None:
        assert self.in_flight.count == 0
        assert self.leases.held() == []
        assert self.scratch.status().reservations == []
        _assert_token_released_once(self.token)


@pytest.fixture
def lone(tmp_path: Path, releases: list[tuple[str, bool]]) -> Lone:
    return Lone(tmp_path / "scratch")


def test_an_exception_inside_the_block_releases_everything_once(
    lone: Lone, releases: list[tuple[str, bool]]
) -> None:
    with pytest.raises(ArchiveRejected), lone.batch() as batch:
        lone.reserve(batch)
        assert lone.in_flight.count == 1 and len(lone.leases.held()) == 1
        raise ArchiveRejected("corrupt")
    assert releases == [("b-1", True)]
    assert not (lone.scratch.root / "b-1").exists()
    lone.assert_all_given_back()
    batch.close()  # a second close does nothing
    assert releases == [("b-1", True)]
    assert lone.in_flight.count == 0


def test_pass_on_leaves_it_held_until_the_other_threads_block_ends(
    lone: Lone, releases: list[tuple[str, bool]]
) -> None:
    with lone.batch() as batch:
        lone.reserve(batch)
        batch.pass_on()
    assert releases == [] and lone.in_flight.count == 1 and batch.reservation is not None

    crashed: list[BaseException] = []

    def processor_thread() -> None:
        try:
            with batch:
                raise RuntimeError("the processor thread crashed")
        except RuntimeError as exc:
            crashed.append(exc)

    thread = threading.Thread(target=processor_thread)
    thread.start()
    thread.join()
    assert len(crashed) == 1
    assert releases == [("b-1", True)]
    lone.assert_all_given_back()


def test_hand_back_requeues_and_releases_once(lone: Lone, releases: list[tuple[str, bool]]) -> None:
    with lone.batch() as batch:
        lone.reserve(batch)
        batch.keep = True  # a hand-back never keeps the dir
        batch.hand_back("worker shutting down (prefetched)")
    assert lone.requeued == [("b-1", "worker shutting down (prefetched)")]
    assert batch.outcome == "requeued"
    assert releases == [("b-1", True)]
    lone.assert_all_given_back()


def test_keep_leaves_the_dir_on_disk_unlocked_and_uncounted(
    lone: Lone, releases: list[tuple[str, bool]]
) -> None:
    with lone.batch() as batch:
        lone.reserve(batch)
        batch.keep = True
    assert releases == [("b-1", False)]
    assert (lone.scratch.root / "b-1").is_dir()
    assert not lone.scratch.is_locked(lone.scratch.root / "b-1")
    lone.assert_all_given_back()


def test_a_failing_release_still_restores_the_count_and_the_token(
    lone: Lone, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(self: Reservation, *, remove: bool = True) -> None:
        raise OSError("scratch volume gone")

    with pytest.raises(OSError, match="scratch volume gone"), lone.batch() as batch:
        lone.reserve(batch)
        monkeypatch.setattr(Reservation, "release", broken)
    assert lone.in_flight.count == 0
    assert lone.leases.held() == []
    _assert_token_released_once(lone.token)


def test_a_batch_that_ends_before_any_reservation_gives_back_the_count(lone: Lone) -> None:
    with lone.batch() as batch:
        batch.end("dead")
    assert batch.closed and batch.outcome == "dead"
    assert lone.in_flight.count == 0
    _assert_token_released_once(lone.token)


# --- through the pipeline's steps, real servers ----------------------------------------


class PostgresDown(db.Ledger):
    """The ledger with one call refused as an outage would (every other call is real)."""

    def __init__(self, url: str, fail: str, exc: Exception, on_fail: Any = None) -> None:
        super().__init__(url, policy=FAST)
        self._fail, self._exc, self._on_fail = fail, exc, on_fail

    def mark_processing(self, batch_id: str, **kw: Any) -> None:
        if self._fail == "mark_processing":
            raise self._exc
        super().mark_processing(batch_id, **kw)

    def commit_results(self, batch_id: str, results: Any, **kw: Any) -> bool:
        if self._fail == "commit_results":
            if self._on_fail is not None:
                self._on_fail()
            raise self._exc
        return super().commit_results(batch_id, results, **kw)


@dataclass
class Harness:
    steps: BatchSteps
    in_flight: InFlight
    token: threading.BoundedSemaphore
    keys: QueueKeys
    redis: Any

    def run(self, processor: Processor, *, before_process: Any = None) -> Batch:
        """One batch as a slot runs it: pop, stage in one block, process in another."""
        stop = threading.Event()
        delivery = self.steps.pop(stop)
        assert delivery is not None
        assert self.token.acquire(blocking=False)
        steps = self.steps
        batch = Batch(
            delivery,
            in_flight=self.in_flight,
            leases=steps.leases,
            requeue=steps.requeue,
            token=self.token,
        )
        staged: Staged | None
        with batch:
            staged = steps.stage(batch, stop, lambda: False)
            if staged is None:
                return batch
            batch.pass_on()
        with batch:
            if before_process is not None:
                before_process(batch)
                if batch.closed or batch.outcome is not None:
                    return batch
            steps.process(staged, processor, threading.Event())
        return batch

    def assert_all_given_back(self) -> None:
        assert self.in_flight.count == 0
        assert self.steps.leases.held() == []
        assert self.steps.scratch.status().reservations == []
        _assert_token_released_once(self.token)


@contextmanager
def _harness(
    settings: Any, database_url: str, ledger: db.Ledger | None = None, **policies: Any
) -> Iterator[Harness]:
    from stagerd.s3.boto import BotoStore

    db.migrate(database_url)
    queue = ReliableQueue.from_settings(settings)
    queue.register()
    config = StepConfig(
        worker_id=queue.worker_id,
        bucket=settings.require_s3().bucket,
        policies=Policies(
            redis=RetryPolicy(attempts=3, base=0.01, max_delay=0.05, classify=is_transient_redis),
            s3=FAST,
            **policies,
        ),
        reserve_timeout=5.0,
    )
    steps = BatchSteps(
        settings,
        config,
        queue=queue,
        ledger=ledger or db.Ledger(database_url, policy=FAST),
        scratch=ScratchManager.from_settings(settings),
        s3=BotoStore.from_settings(settings),
    )
    try:
        yield Harness(steps, InFlight(), threading.BoundedSemaphore(1), queue.keys, queue.client)
    finally:
        steps.ledger.close()
        queue.deregister()


@pytest.fixture
def world(s3_client: Any, s3_bucket: str, redis_client: Any, queue_name: str) -> Any:
    """Put a batch (``body``) in S3 and its job in the queue."""

    def put(batch_id: str, body: bytes | None = None) -> None:
        put_batch(s3_client, redis_client, s3_bucket, queue_name, batch_id, body or make_tar())

    return put


def _ok() -> Processor:
    return make_processor(WAVINFO, "oneshot")


def _failing_processor() -> Processor:
    return make_processor("false", "oneshot")


def _state(database_url: str, batch_id: str) -> str | None:
    ledger = db.Ledger(database_url)
    try:
        row = ledger.batch(batch_id)
        return row.state if row else None
    finally:
        ledger.close()


def test_done_releases_once(
    settings: Any, database_url: str, world: Any, releases: list[tuple[str, bool]]
) -> None:
    world("b-done")
    with _harness(settings, database_url) as h:
        processor = _ok()
        try:
            batch = h.run(processor)
        finally:
            processor.close()
        assert batch.outcome == "done"
        assert releases == [("b-done", True)]
        h.assert_all_given_back()
    assert _state(database_url, "b-done") == "done"


def test_a_staging_failure_releases_once(
    settings: Any, database_url: str, world: Any, releases: list[tuple[str, bool]]
) -> None:
    world("b-corrupt", b"not a tar archive at all " * 4000)
    with _harness(settings, database_url) as h:
        batch = h.run(_ok())
        assert batch.outcome == "dead"
        assert releases == [("b-corrupt", True)]
        h.assert_all_given_back()


def test_mark_processing_failing_releases_once(
    settings: Any, database_url: str, world: Any, releases: list[tuple[str, bool]]
) -> None:
    world("b-pg")
    down = PostgresDown(database_url, "mark_processing", ServiceUnavailable("PostgreSQL: down"))
    with _harness(settings, database_url, down) as h:
        batch = h.run(_ok())
        assert batch.outcome == "requeued"  # transient: back at the tail for another try
        assert releases == [("b-pg", True)]
        h.assert_all_given_back()
        assert pending_ids(h.redis, settings.queue) == ["b-pg"]


def test_a_processing_failure_releases_once(
    settings: Any, database_url: str, world: Any, releases: list[tuple[str, bool]]
) -> None:
    world("b-proc")
    with _harness(settings, database_url) as h:
        processor = _failing_processor()
        try:
            batch = h.run(processor)
        finally:
            processor.close()
        assert batch.outcome == "requeued"
        assert releases == [("b-proc", True)]
        h.assert_all_given_back()


def test_a_refused_commit_releases_once(
    settings: Any, database_url: str, world: Any, releases: list[tuple[str, bool]]
) -> None:
    world("b-refused")
    down = PostgresDown(database_url, "commit_results", ResultsRejected("refused"))
    with _harness(settings, database_url, down) as h:
        processor = _ok()
        try:
            batch = h.run(processor)
        finally:
            processor.close()
        assert batch.outcome == "dead"
        assert releases == [("b-refused", True)]
        h.assert_all_given_back()


def test_a_deferred_commit_keeps_the_results_and_releases_once(
    settings: Any, database_url: str, world: Any, releases: list[tuple[str, bool]]
) -> None:
    world("b-deferred")
    stopping = threading.Event()
    down = PostgresDown(
        database_url, "commit_results", ServiceUnavailable("PostgreSQL: down"), stopping.set
    )
    with _harness(settings, database_url, down, commit_retry=0.2) as h:
        h.steps.stop = stopping  # the worker is told to stop during the outage
        processor = _ok()
        try:
            batch = h.run(processor)
        finally:
            processor.close()
        assert batch.outcome is None  # still ours: the restart commits it
        assert releases == [("b-deferred", False)]
        assert (h.steps.scratch.root / "b-deferred" / "processed.json").is_file()
        h.assert_all_given_back()


def test_hand_back_releases_once_and_refunds_the_attempt(
    settings: Any, database_url: str, world: Any, releases: list[tuple[str, bool]]
) -> None:
    world("b-back")
    with _harness(settings, database_url) as h:
        batch = h.run(_ok(), before_process=lambda b: b.hand_back("worker shutting down"))
        assert batch.outcome == "requeued"
        assert releases == [("b-back", True)]
        h.assert_all_given_back()
        assert pending_ids(h.redis, settings.queue) == ["b-back"]
        attempts = h.redis.hget(h.keys.attempts, "b-back")
        assert attempts in (None, b"0")
    assert _state(database_url, "b-back") == "requeued"


def test_a_holder_letting_go_between_the_probes_still_has_its_results_adopted(
    settings: Any,
    database_url: str,
    s3_client: Any,
    s3_bucket: str,
    redis_client: Any,
    queue_name: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The batch's previous owner on this host (paused past its lease) holds the dir with
    its finished results and lets go just after the new owner's first adoption attempt
    found the dir locked. The new owner must still adopt them, not reserve afresh (which
    deletes them) and run the processor again: a release is only ever seen after the
    marker was written, so the adoption is asked again once nobody holds the dir."""
    import hashlib

    import stagerd.gpu.commit as commit_mod
    from stagerd.gpu.resume import ProcessedMarker

    body = make_tar()
    put_batch(s3_client, redis_client, s3_bucket, queue_name, "b-held", body)
    holder = ScratchManager.from_settings(settings).reserve("b-held", MiB)
    (holder.path / "results.jsonl").write_text('{"item": "a.wav"}\n{"item": "b.wav"}\n')
    digest = hashlib.sha256(body).hexdigest()
    ProcessedMarker("b-held", "w-paused", digest, 1.0, len(body), 100, 2, 0.5).write(holder.path)

    real = commit_mod.find_processed
    calls: list[bool] = []

    def racing(*args: Any, **kwargs: Any) -> Any:
        found = real(*args, **kwargs)
        calls.append(found is not None)
        if len(calls) == 1:
            holder.release(remove=False)  # the paused owner resumes, is fenced, lets go
        return found

    monkeypatch.setattr(commit_mod, "find_processed", racing)
    with _harness(settings, database_url) as h:
        processor = _failing_processor()  # a second run would fail the batch
        try:
            batch = h.run(processor)
        finally:
            processor.close()
        assert calls[0] is False  # the first attempt met the holder's lock
        assert batch.outcome == "done", batch.outcome
        h.assert_all_given_back()
    assert _state(database_url, "b-held") == "done"
    ledger = db.Ledger(database_url)
    try:
        assert len(ledger.results("b-held")) == 2
    finally:
        ledger.close()


def test_a_lease_lost_during_a_commit_outage_abandons_and_keeps_the_results(
    settings: Any, database_url: str, world: Any, releases: list[tuple[str, bool]]
) -> None:
    """PostgreSQL down at the commit and, while it retries, the heartbeat finds the lease
    lost (the worker stalled past it): the batch is another worker's now. It is abandoned
    with its finished results kept, like a LeaseLost at the commit, and the worker goes
    on: a lost lease is not the worker's failure (the error used to end the worker)."""
    world("b-fenced")
    held: list[Batch] = []

    def lose_the_lease() -> None:
        assert held[0].fence is not None
        held[0].fence.set()  # what LeaseBook.check does

    down = PostgresDown(
        database_url, "commit_results", ServiceUnavailable("PostgreSQL: down"), lose_the_lease
    )
    with _harness(settings, database_url, down, commit_retry=30.0) as h:
        processor = _ok()
        try:
            batch = h.run(processor, before_process=held.append)
        finally:
            processor.close()
        assert batch.outcome == "abandoned"
        assert releases == [("b-fenced", False)]
        # Only what the next owner adopts is kept: the input is not (outside any budget).
        kept = h.steps.scratch.root / "b-fenced"
        assert sorted(p.name for p in kept.iterdir()) == ["processed.json", "results.jsonl"]
        h.assert_all_given_back()
