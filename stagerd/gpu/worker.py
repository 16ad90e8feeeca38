"""The GPU worker: ``run(settings, options, stop)``.

Connects (PostgreSQL migrated, Redis registered: our own in-flight jobs of a previous run
go back to the head of the queue), then runs ``--concurrency`` slots over one scratch
budget, each the pipeline pop -> validate -> ledger 'staging' -> reserve -> stage ->
'processing' -> process -> commit results + 'done' -> ack -> cleanup
(:mod:`stagerd.gpu.pipeline`, :mod:`stagerd.gpu.prefetch`). A heartbeat thread keeps this worker
alive in Redis and recovers the jobs of workers whose heartbeat expired.

Shutdown is the *stop* event (signals are handled by the command only): slots stop taking
jobs, staging and prefetched batches are requeued at once, a batch in processing gets
``drain_timeout`` seconds, then ``kill`` is set, the processor is killed and the batch
requeued. ``run`` returns normally on a clean shutdown and re-raises a slot's crash.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from stagerd.errors import ConfigError, WorkerIdInUse
from stagerd.gpu.batch import InFlight
from stagerd.gpu.pipeline import BatchSteps, StepConfig
from stagerd.gpu.prefetch import Slot
from stagerd.log import get_logger
from stagerd.queue.errors import is_transient_redis
from stagerd.queue.lease import LeaseBook
from stagerd.retry import Policies, RetryPolicy
from stagerd.scratch.locks import FileLock
from stagerd.shutdown import LeftForRecovery, ShutdownGuard

if TYPE_CHECKING:
    from stagerd.config.settings import Settings
    from stagerd.gpu.health import WorkerHealth
    from stagerd.queue.redis_queue import ReliableQueue

log = get_logger(__name__)
PROCESSOR_MODES = ("oneshot", "persistent")


@dataclass(frozen=True)
class WorkerOptions:
    """The command-line knobs of ``stagerd gpu`` (settings come from the environment)."""

    concurrency: int = 1
    prefetch: int = 1
    burst: bool = False
    keep_archive: bool = False
    keep_failed: bool = False
    processor: str | None = None  # default: settings.processor (STAGERD_PROCESSOR)
    processor_mode: str = "oneshot"
    drain_timeout: float = 60.0
    # A slot thread without progress this long stops the watchdog being fed (systemd's
    # WatchdogSec=2min then restarts the worker): a hung slot never hangs silently.
    stall_limit: float = 90.0
    worker_id: str | None = None  # default: settings.worker_id (STAGERD_WORKER_ID)
    reserve_timeout: float = 600.0
    tick: float = 1.0
    on_ready: Callable[[], object] | None = None  # systemd READY=1
    on_tick: Callable[[], object] | None = None  # systemd WATCHDOG=1, from this loop
    stage_policy: RetryPolicy = field(default_factory=RetryPolicy)


def run(settings: Settings, options: WorkerOptions, stop: threading.Event) -> None:
    """Work until *stop* is set, or (``burst``) until the queue is empty and nothing is in
    flight. Raises ConfigError on missing configuration, ServiceUnavailable when a backing
    service stays unreachable, and re-raises an unexpected error of a slot after shutdown."""
    _check(options)
    identity = _claim_identity(settings, options.worker_id or settings.worker_id)
    try:
        _run(settings, options, stop)
    finally:
        if identity is not None:
            identity.release()


def _claim_identity(settings: Settings, worker_id: str) -> FileLock | None:
    """Refuse at once a second process with our worker id on this host: a lock file under
    the scratch root, held for the process's life (the kernel drops it if we die). None
    when the scratch root does not exist (the scratch check reports that)."""
    import re

    state = settings.scratch_dir / ".stagerd"
    if not settings.scratch_dir.is_dir():
        return None
    state.mkdir(mode=0o755, exist_ok=True)
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", worker_id)
    lock = FileLock(state / f"worker-{safe}.lock")
    if not lock.acquire(blocking=False):
        pid = lock.holder()
        raise WorkerIdInUse(
            f"worker id {worker_id!r} is already running on this host"
            f"{f' (pid {pid})' if pid else ''}; give each process its own STAGERD_WORKER_ID"
        )
    return lock


def _run(settings: Settings, options: WorkerOptions, stop: threading.Event) -> None:
    guard = ShutdownGuard(stop)
    # Every retry policy of this process, built here once and passed down.
    policies = Policies.from_settings(
        settings, classify_redis=is_transient_redis, s3=options.stage_policy
    )
    steps, queue = _connect(settings, options, policies, guard, stop)
    worker_id = queue.worker_id
    kill = threading.Event()
    heartbeat = Heartbeat(queue, settings.database_url, stop, steps.leases, policy=policies.redis)
    heartbeat.start()
    slots = _start_slots(steps, settings, options, stop, kill)
    log.info(
        "worker %s ready: concurrency %d, prefetch %d%s",
        worker_id,
        options.concurrency,
        options.prefetch,
        ", burst" if options.burst else "",
        extra={"worker": worker_id},
    )
    if options.on_ready is not None:
        options.on_ready()
    try:
        _supervise(slots, options, stop, kill)
    finally:
        heartbeat.stop()
        steps.ledger.close()
        _deregister(queue, guard, policies.redis)
    errors = [exc for slot in slots for exc in slot.errors] + heartbeat.errors
    if errors:
        raise errors[0]
    log.info("worker %s stopped cleanly", worker_id, extra={"worker": worker_id})


def _deregister(queue: ReliableQueue, guard: ShutdownGuard, policy: RetryPolicy) -> None:
    """Drop our heartbeat, bounded: a stop must never wait on an unreachable Redis."""
    try:
        guard.final(policy, queue.deregister, what="queue deregister", service="Redis")
    except LeftForRecovery as exc:
        log.warning(
            "stopping without deregistering: %s; jobs still in %s are taken back when this "
            "worker starts again, or by another worker once the heartbeat expires",
            exc,
            queue.processing,
            extra={"worker": queue.worker_id},
        )


def _check(options: WorkerOptions) -> None:
    if options.concurrency < 1:
        raise ConfigError(f"--concurrency must be at least 1, got {options.concurrency}")
    if options.prefetch < 0:
        raise ConfigError(f"--prefetch must be 0 or more, got {options.prefetch}")
    if options.processor_mode not in PROCESSOR_MODES:
        raise ConfigError(
            f"--processor-mode must be oneshot or persistent, got {options.processor_mode!r}"
        )
    if options.drain_timeout < 0:
        raise ConfigError(f"--drain-timeout must not be negative, got {options.drain_timeout}")


def _connect(
    settings: Settings,
    options: WorkerOptions,
    policies: Policies,
    guard: ShutdownGuard,
    stop: threading.Event,
) -> tuple[BatchSteps, ReliableQueue]:
    """Every IO edge, connected: migrate, register in Redis, open scratch and S3.

    Refuses to start (before any job is taken) when the scratch root is missing."""
    from stagerd.db.ledger import Ledger, migrate
    from stagerd.gpu.health import check_scratch_root
    from stagerd.metrics import Metrics
    from stagerd.queue.redis_queue import ReliableQueue
    from stagerd.s3.boto import BotoStore
    from stagerd.scratch.space import ScratchManager

    s3 = settings.require_s3()
    database_url = settings.require_database()
    if not (options.processor or settings.processor):
        raise ConfigError("STAGERD_PROCESSOR: not set (or pass --processor CMD)")
    check_scratch_root(settings.scratch_dir)
    migrate(database_url, policy=policies.postgres_startup)
    queue = ReliableQueue.from_settings(settings, options.worker_id)
    taken = policies.redis.call(queue.register, what="queue register")
    if taken:
        log.info("took back %d job(s) of this worker's previous run", taken)
    config = _step_config(settings, options, policies, queue.worker_id, s3.bucket)
    name = f"stagerd-{queue.worker_id}"
    client = BotoStore.from_settings(settings)
    steps = BatchSteps(
        settings,
        config,
        queue=queue,
        ledger=Ledger(database_url, policy=policies.postgres, application_name=name, guard=guard),
        scratch=ScratchManager.from_settings(settings),
        s3=client,
        metrics=Metrics(settings.metrics_file, "gpu"),
        guard=guard,
        health=worker_health(settings, queue, client, s3.bucket),
        stop=stop,
    )
    return steps, queue


def _step_config(
    settings: Settings, options: WorkerOptions, policies: Policies, worker_id: str, bucket: str
) -> StepConfig:
    return StepConfig(
        worker_id=worker_id,
        bucket=bucket,
        keep_archive=options.keep_archive,
        keep_failed=options.keep_failed,
        process_timeout=settings.process_timeout,
        reserve_timeout=options.reserve_timeout,
        policies=policies,
    )


def worker_health(settings: Settings, queue: ReliableQueue, s3: Any, bucket: str) -> WorkerHealth:
    """The probes that tell a worker-scoped failure from a batch's own (see health)."""
    from stagerd.db.pg import connect
    from stagerd.gpu.health import WorkerHealth, check_scratch_root
    from stagerd.retry import RetryPolicy

    once = RetryPolicy(attempts=1)

    def postgres() -> None:
        with connect(settings.require_database(), policy=once) as conn:
            conn.execute("SELECT 1")

    return WorkerHealth(
        probes=(
            ("scratch", lambda: check_scratch_root(settings.scratch_dir)),
            ("Redis", queue.client.ping),
            ("PostgreSQL", postgres),
            ("S3", lambda: s3.head_bucket(bucket)),
        )
    )


def _start_slots(
    steps: BatchSteps,
    settings: Settings,
    options: WorkerOptions,
    stop: threading.Event,
    kill: threading.Event,
) -> list[Slot]:
    from stagerd.processor.runner import Processor, make_processor
    from stagerd.results import ResultLimits

    command = options.processor or settings.processor
    assert command is not None  # checked in _connect
    limits = ResultLimits(settings.max_results, settings.max_result_bytes)

    def new_processor() -> Processor:
        return make_processor(command, options.processor_mode, limits=limits)

    in_flight = InFlight()
    slots = [
        Slot(
            i,
            steps,
            new_processor,
            prefetch=options.prefetch,
            burst=options.burst,
            stop=stop,
            kill=kill,
            in_flight=in_flight,
        )
        for i in range(options.concurrency)
    ]
    for slot in slots:
        slot.start()
    return slots


def _supervise(
    slots: list[Slot], options: WorkerOptions, stop: threading.Event, kill: threading.Event
) -> None:
    """The main loop: watchdog ticks (only while every slot makes progress), and the
    drain deadline once *stop* is set."""
    drain_deadline: float | None = None
    starved = False
    while any(slot.alive() for slot in slots):
        if not stop.is_set():
            stop.wait(options.tick)
        else:
            time.sleep(min(0.1, options.tick))
            if drain_deadline is None:
                drain_deadline = time.monotonic() + options.drain_timeout
                log.info("stopping: draining for up to %.0fs", options.drain_timeout)
            if time.monotonic() >= drain_deadline and not kill.is_set():
                log.warning("drain timeout reached: killing the processor, requeueing")
                kill.set()
        stalled = [name for slot in slots for name in slot.stalled(options.stall_limit)]
        if stalled and not starved:
            log.error(
                "no progress in %s: not feeding the watchdog (systemd restarts the worker)",
                ", ".join(stalled),
                extra={"event": "watchdog_starved"},
            )
        starved = bool(stalled)
        if options.on_tick is not None and not stalled:
            options.on_tick()
    for slot in slots:
        slot.join()


class Heartbeat:
    """Keeps this worker's heartbeat fresh and its registration asserted (every TTL/3)
    and, every TTL, recovers the in-flight jobs of workers whose heartbeat expired (any
    live worker may do it). A beat that finds the registration gone (this worker was
    recovered while it stalled) fences every batch recovery took away (:mod:`stagerd.queue.lease`)."""

    def __init__(
        self,
        queue: ReliableQueue,
        database_url: str | None,
        stop: threading.Event,
        leases: LeaseBook | None = None,
        *,
        policy: RetryPolicy,
    ) -> None:
        self._queue = queue
        # The worker's Redis policy, only to tell an outage (retried next beat) from a bug.
        self._classify = policy.classify
        self._database_url = database_url
        self._stop = stop
        self._leases = leases or LeaseBook()
        self._twin_reported: str | None = None
        self.errors: list[BaseException] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._done.set()
        self._thread.join(10)

    def _loop(self) -> None:
        interval = max(0.05, self._queue.heartbeat_ttl / 3)
        beats = 0
        while not self._done.wait(0 if beats == 0 else interval):
            try:
                self._beat()
                if beats % 3 == 0:
                    self._recover()
            except Exception as exc:
                # Redis/PostgreSQL outages are retried next beat; anything else is a bug.
                if not self._classify(exc):
                    log.exception("heartbeat thread failed; stopping the worker")
                    self.errors.append(exc)
                    self._stop.set()
                    return
                log.warning("heartbeat failed (will retry): %s", exc)
            beats += 1

    def _beat(self) -> None:
        beat = self._queue.heartbeat()
        worker = self._queue.worker_id
        if beat.twin and beat.twin != self._twin_reported:
            # Our key held another process's token: a second process runs with our id
            # (on another host: the local lock refuses twins on this one).
            self._twin_reported = beat.twin
            log.error(
                "worker id %s is also used by another process (registration token %s): "
                "give each process its own STAGERD_WORKER_ID",
                worker,
                beat.twin,
                extra={"worker": worker, "event": "duplicate_worker_id"},
            )
        if beat.lost:
            log.warning(
                "worker %s was not registered (recovered while stalled, or Redis lost its "
                "data): registered again",
                worker,
                extra={"worker": worker, "event": "registration_lost"},
            )
            self._leases.check(self._queue)

    def _recover(self) -> None:
        from stagerd.db.ledger import requeue_stale_batches
        from stagerd.queue.orphans import recover_orphans

        report = recover_orphans(
            self._queue.client, self._queue.keys, max_attempts=self._queue.max_attempts
        )
        if self._database_url and (report.requeued or report.dead_lettered):
            stale = requeue_stale_batches(
                self._database_url, report.dead_workers, report.dead_lettered
            )
            log.info("ledger: %d batch(es) of dead workers marked requeued", len(stale))
