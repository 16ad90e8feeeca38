"""``stagerd reconcile``: re-enqueue batches whose jobs Redis lost (S3 vs ledger vs queues)."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from stagerd.commands import duration_flag, state


def register(app: typer.Typer) -> None:
    app.command("reconcile")(reconcile)


def reconcile(
    ctx: typer.Context,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Change nothing; report what would be re-enqueued.")
    ] = False,
    min_age: Annotated[
        str,
        typer.Option(
            "--min-age",
            help="Leave archives younger than this alone unless they were enqueued "
            "(an upload whose job is not pushed yet).",
        ),
    ] = "10m",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Find archives under archives/ that are neither done nor dead in the ledger and in no
    queue or processing list, and enqueue them again. Exit 1 if a service fails."""
    from stagerd.janitor.reconcile import ReconcileOptions, run_reconcile

    options = ReconcileOptions(dry_run=dry_run, min_age=duration_flag(min_age, "--min-age"))
    report = run_reconcile(state(ctx).settings(), options)
    if as_json:
        typer.echo(json.dumps(report.as_json(), indent=2))
        return
    verb = "would re-enqueue" if dry_run else "re-enqueued"
    typer.echo(
        f"archives: {report.archives}, in queues: {report.queued}, done or dead: "
        f"{report.settled}, {verb}: {len(report.reenqueued)}, too young: {len(report.too_young)}"
    )
    for batch in report.reenqueued:
        typer.echo(f"{verb} {batch}")
