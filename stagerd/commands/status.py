"""``stagerd status``: queue, workers, scratch and recent failures at a glance."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from stagerd.commands import state


def register(app: typer.Typer) -> None:
    app.command("status")(status)


def status(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object.")] = False,
) -> None:
    """Show queue depth, workers and their in-flight jobs, scratch use and recent failures.

    Exits 1 when a section could not be read (its error is listed), else 0.
    """
    from stagerd.ops.status import collect

    data = collect(state(ctx).settings())
    if as_json:
        typer.echo(json.dumps(data, indent=2, default=str))
    else:
        render(data)
    if data["errors"]:
        raise typer.Exit(1)


def render(data: dict[str, Any]) -> None:
    """Readable tables for a person at a terminal."""
    from rich.console import Console
    from rich.table import Table

    from stagerd.units import format_size

    console = Console()
    queue = data["queue"]
    if queue:
        console.print(
            f"[bold]queue[/bold] {queue['name']}: {queue['pending']} pending, {queue['dead']} dead"
        )
    workers = Table(title="workers", show_lines=False)
    for column in ("worker", "alive", "batch", "phase", "age", "attempt"):
        workers.add_column(column)
    for w in data["workers"] or []:
        jobs = w["in_flight"] or [
            {"batch_id": "-", "phase": "idle", "age_seconds": None, "attempt": None}
        ]
        for job in jobs:
            age = job["age_seconds"]
            workers.add_row(
                w["id"],
                "yes" if w["alive"] else "[red]no[/red]",
                str(job["batch_id"]),
                str(job["phase"]),
                f"{age:.0f}s" if age is not None else "-",
                str(job["attempt"] or "-"),
            )
    console.print(workers)
    scratch = data["scratch"]
    if scratch:
        console.print(
            f"[bold]scratch[/bold] {scratch['root']}: budget {format_size(scratch['budget'])}, "
            f"reserved {format_size(scratch['reserved'])}, used {format_size(scratch['used'])}, "
            f"free {format_size(scratch['free'])}"
        )
        for r in scratch.get("reservations", []):
            console.print(f"  {r['batch_id']}: {format_size(r['nbytes'])}, {r['age']:.0f}s old")
    for failure in data["recent_failures"] or []:
        console.print(f"[yellow]failed[/yellow] {failure}")
    for error in data["errors"]:
        console.print(f"[red]error[/red] {error}")
