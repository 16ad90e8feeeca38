"""``stagerd transfer upload|watch``: parse, build settings, dispatch. Nothing else."""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path
from typing import Annotated

import typer

from stagerd.commands import state

PROGRESS_MODES = ("auto", "bar", "json", "none")


def register(app: typer.Typer) -> None:
    group = typer.Typer(
        help="Upload batch archives to S3 (resumable, verified) and enqueue them once.",
        no_args_is_help=True,
    )
    group.command("upload")(upload)
    group.command("watch")(watch)
    app.add_typer(group, name="transfer")


def _part_size(text: str | None) -> int | None:
    if text is None:
        return None
    from stagerd.config.settings import parse_part_size

    try:
        return parse_part_size(text)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--part-size") from None


def _progress(mode: str) -> str:
    if mode not in PROGRESS_MODES:
        raise typer.BadParameter(f"use one of {', '.join(PROGRESS_MODES)}", param_hint="--progress")
    return mode


PartSizeOpt = Annotated[
    str | None,
    typer.Option(
        "--part-size",
        help="Part size (default $STAGERD_PART_SIZE, 64MiB); raised "
        "automatically to stay within $STAGERD_MAX_PARTS.",
        show_default=False,
    ),
]
ConcurrencyOpt = Annotated[
    int | None,
    typer.Option(
        "--concurrency",
        min=1,
        max=256,
        help="Parts in flight (default $STAGERD_CONCURRENCY, 8).",
        show_default=False,
    ),
]
NoEnqueueOpt = Annotated[bool, typer.Option("--no-enqueue", help="Upload only; do not push a job.")]
ProgressOpt = Annotated[
    str,
    typer.Option(
        "--progress", help="auto (bar on a terminal, else JSON lines on stderr), bar, json or none."
    ),
]


def upload(
    ctx: typer.Context,
    path: Annotated[Path, typer.Argument(help="The batch archive (.tar).", show_default=False)],
    batch_id: Annotated[
        str, typer.Option("--batch-id", help="Batch id; the key is archives/ID.tar.")
    ],
    file_count: Annotated[
        int | None,
        typer.Option(
            "--file-count",
            min=0,
            help="Files in the batch (default: counted from the tar headers).",
            show_default=False,
        ),
    ] = None,
    no_enqueue: NoEnqueueOpt = False,
    force: Annotated[
        bool, typer.Option("--force", help="Upload and enqueue again even if already done.")
    ] = False,
    part_size: PartSizeOpt = None,
    concurrency: ConcurrencyOpt = None,
    progress: ProgressOpt = "auto",
) -> None:
    """Upload PATH to s3://$S3_BUCKET/archives/ID.tar and enqueue it; print one JSON object.

    A rerun after a crash resumes from the parts already in S3; a rerun after success
    neither re-uploads nor re-enqueues (unless --force).
    """
    from stagerd.transfer.upload import TransferRequest, transfer

    request = TransferRequest(
        path=path,
        batch_id=batch_id,
        file_count=file_count,
        enqueue=not no_enqueue,
        force=force,
        part_size=_part_size(part_size),
        concurrency=concurrency,
    )
    report = transfer(state(ctx).settings(), request, progress_mode=_progress(progress))
    typer.echo(json.dumps(report.to_dict(), sort_keys=True))


def watch(
    ctx: typer.Context,
    directory: Annotated[Path, typer.Argument(help="Directory receiving *.tar archives.")],
    interval: Annotated[
        float, typer.Option("--interval", min=0.05, help="Seconds between directory scans.")
    ] = 1.0,
    delete_after: Annotated[
        bool,
        typer.Option(
            "--delete-after",
            help="Delete archives after success instead of moving them to DIR/done/.",
        ),
    ] = False,
    no_enqueue: NoEnqueueOpt = False,
    part_size: PartSizeOpt = None,
    concurrency: ConcurrencyOpt = None,
    progress: ProgressOpt = "json",
) -> None:
    """Upload and enqueue every complete *.tar renamed into DIRECTORY (batch id = stem).

    Successes go to DIR/done/ (or are deleted with --delete-after); archives that can
    never succeed (not tar, truncated, bad batch id) go to DIR/failed/ with a .error file.
    SIGTERM stops cleanly; a restart resumes interrupted uploads.
    """
    from stagerd.transfer.watch import WatchOptions, run_watch

    settings = state(ctx).settings()
    settings.require_s3()  # a configuration error ends the service at once (exit 2)
    options = WatchOptions(
        directory=directory,
        interval=interval,
        delete_after=delete_after,
        enqueue=not no_enqueue,
        part_size=_part_size(part_size),
        concurrency=concurrency,
        progress_mode=_progress(progress),
    )
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    run_watch(settings, options, stop)
