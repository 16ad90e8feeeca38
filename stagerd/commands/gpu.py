"""``stagerd gpu``: the GPU VM's worker (issue 5, prefetch issue 11).

Signals are handled here and only here: SIGTERM/SIGINT set the stop event the worker
polls. Under systemd ``Type=notify`` the command sends READY=1 once connected, WATCHDOG=1
from the worker's main loop and STOPPING=1 when shutdown begins.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Annotated

import typer

from stagerd.commands import duration_flag, state

# The options, one alias each, so the command's signature reads as its list of flags.
Concurrency = Annotated[
    int, typer.Option("--concurrency", min=1, help="Job slots sharing one scratch budget.")
]
Prefetch = Annotated[
    int,
    typer.Option(
        "--prefetch",
        min=0,
        help="Batches staged ahead per slot while one is processed (0: off).",
    ),
]
Burst = Annotated[
    bool, typer.Option("--burst", help="Exit when the queue is empty and nothing is in flight.")
]
KeepArchive = Annotated[
    bool,
    typer.Option("--keep-archive", help="Download archive.tar first, then extract (2x scratch)."),
]
KeepFailed = Annotated[
    bool, typer.Option("--keep-failed", help="Keep the scratch dir of dead-lettered batches.")
]
ProcessorCmd = Annotated[
    str | None,
    typer.Option(
        "--processor",
        help="Processor command (default: $STAGERD_PROCESSOR).",
        show_default=False,
    ),
]
ProcessorMode = Annotated[
    str, typer.Option("--processor-mode", help="oneshot (a process per batch) or persistent.")
]
DrainTimeout = Annotated[
    str,
    typer.Option("--drain-timeout", help="On SIGTERM, how long the processing batch may finish."),
]
WorkerId = Annotated[
    str | None,
    typer.Option(
        "--worker-id",
        help="Worker id (default: $STAGERD_WORKER_ID, else hostname).",
        show_default=False,
    ),
]


def register(app: typer.Typer) -> None:
    app.command("gpu")(gpu)


def gpu(
    ctx: typer.Context,
    concurrency: Concurrency = 1,
    prefetch: Prefetch = 1,
    burst: Burst = False,
    keep_archive: KeepArchive = False,
    keep_failed: KeepFailed = False,
    processor: ProcessorCmd = None,
    processor_mode: ProcessorMode = "oneshot",
    drain_timeout: DrainTimeout = "60s",
    worker_id: WorkerId = None,
) -> None:
    """Consume the queue: reserve scratch, stage, process, record results in PostgreSQL."""
    from stagerd.errors import UsageError
    from stagerd.gpu import sdnotify
    from stagerd.gpu.worker import PROCESSOR_MODES, WorkerOptions, run
    from stagerd.processor import proctree

    if processor_mode not in PROCESSOR_MODES:
        raise UsageError(f"--processor-mode: use oneshot or persistent, not {processor_mode!r}")
    drain = duration_flag(drain_timeout, "--drain-timeout")
    settings = state(ctx).settings()
    stop = threading.Event()
    on_tick = _on_signals(stop)
    # Starve the watchdog once a slot has shown no progress for 3/4 of WatchdogSec.
    interval = sdnotify.watchdog_seconds()
    options = WorkerOptions(
        concurrency=concurrency,
        prefetch=prefetch,
        burst=burst,
        keep_archive=keep_archive,
        keep_failed=keep_failed,
        processor=processor,
        processor_mode=processor_mode,
        drain_timeout=drain,
        worker_id=worker_id,
        on_ready=lambda: sdnotify.ready("connected; consuming " + settings.queue),
        on_tick=on_tick,
        stall_limit=0.75 * interval if interval else WorkerOptions.stall_limit,
    )
    # Before any processor starts: its same-user code must not read our memory/environ.
    proctree.harden_worker()
    run(settings, options, stop)
    sdnotify.stopping()


def _on_signals(stop: threading.Event) -> Callable[[], None]:
    """SIGTERM/SIGINT set *stop*; the returned tick feeds systemd's watchdog and sends
    STOPPING=1 once, when the worker's loop first sees *stop*."""
    from stagerd.gpu import sdnotify

    stopping = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    def on_tick() -> None:
        sdnotify.watchdog()
        if stop.is_set() and not stopping.is_set():
            stopping.set()
            sdnotify.stopping()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_signal)
    return on_tick
