"""``stagerd janitor``: crash recovery for scratch, reservations, in-flight jobs, uploads."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated

import typer

from stagerd.commands import duration_flag, state
from stagerd.units import format_size

if TYPE_CHECKING:
    from stagerd.janitor.run import JanitorReport


def register(app: typer.Typer) -> None:
    app.command("janitor")(janitor)


def janitor(
    ctx: typer.Context,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Change nothing; report what would be done.")
    ] = False,
    min_age: Annotated[
        str,
        typer.Option(
            "--min-age", help="Only remove unlocked scratch entries older than this (e.g. 15m)."
        ),
    ] = "15m",
    upload_max_age: Annotated[
        str,
        typer.Option(
            "--upload-max-age",
            help="Abort incomplete multipart uploads under archives/ older than this.",
        ),
    ] = "24h",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Remove dead workers' scratch, reclaim their reservations, requeue their jobs, abort
    stale multipart uploads and fix the ledger. Exit 1 if any part failed."""
    from stagerd.janitor.run import JanitorOptions, run_janitor

    options = JanitorOptions(
        dry_run=dry_run,
        min_age=duration_flag(min_age, "--min-age"),
        upload_max_age=duration_flag(upload_max_age, "--upload-max-age"),
    )
    report = run_janitor(state(ctx).settings(), options)
    if report.busy:
        typer.echo(
            "stagerd janitor: another janitor is running on this host; nothing to do", err=True
        )
    if as_json:
        typer.echo(json.dumps(report.as_json(), indent=2))
    elif not report.busy:
        typer.echo(_human(report))
    raise typer.Exit(0 if report.ok else 1)


def _human(report: JanitorReport) -> str:
    verb = "would remove" if report.dry_run else "removed"
    lines = [
        f"scratch: {verb} {len(report.removed)} entries ({format_size(report.freed_bytes)}), "
        f"kept {len(report.kept_locked)} locked",
        f"reservations: {'would reclaim' if report.dry_run else 'reclaimed'} "
        f"{len(report.reservations_reclaimed)}",
        f"queue: {'would requeue' if report.dry_run else 'requeued'} "
        f"{len(report.requeued_jobs)}, dead-lettered {len(report.dead_lettered)}",
        f"uploads: {'would abort' if report.dry_run else 'aborted'} {len(report.aborted_uploads)}",
    ]
    if report.reenqueued:
        lines.append(f"reconcile: re-enqueued {len(report.reenqueued)} lost batches")
    if report.ledger_requeued:
        lines.append(f"ledger: marked {len(report.ledger_requeued)} batches requeued")
    lines += [f"removed {path}" for path in report.removed]
    lines += [f"skipped {what}" for what in report.skipped]
    lines += [f"error: {error}" for error in report.errors]
    if report.dry_run:
        lines.insert(0, "dry run: nothing was changed")
    return "\n".join(lines)
