"""``stagerd dlq``: inspect and replay dead letters."""

from __future__ import annotations

import json
from functools import partial
from typing import TYPE_CHECKING, Annotated

import typer

from stagerd.commands import duration_flag, state
from stagerd.errors import UsageError
from stagerd.queue.dlq import guard as _guard

if TYPE_CHECKING:
    from stagerd.config.settings import Settings
    from stagerd.queue.dlq import DeadLetters

dlq_app = typer.Typer(help="Inspect and replay dead-lettered jobs.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(dlq_app, name="dlq")


def _dead_letters(ctx: typer.Context) -> tuple[DeadLetters, Settings]:
    from stagerd.queue.dlq import DeadLetters

    settings = state(ctx).settings()
    return DeadLetters.from_settings(settings), settings


@dlq_app.command("list")
def list_(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object.")] = False,
) -> None:
    """List dead letters, oldest first."""
    dead, settings = _dead_letters(ctx)
    entries = _guard(dead.list)
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "queue": settings.queue,
                    "count": len(entries),
                    "entries": [e.to_dict() for e in entries],
                },
                indent=2,
            )
        )
        return
    if not entries:
        typer.echo(f"no dead letters in {settings.queue}:dead")
        return
    for e in entries:
        typer.echo(
            f"{e.id or '-':<12}  {e.batch_id or '(invalid)':<24}  {e.failed_at or '-':<32}  "
            f"attempts={e.attempts}  {e.error}"
        )


@dlq_app.command("show")
def show(
    ctx: typer.Context, ref: Annotated[str, typer.Argument(help="Entry id or batch id.")]
) -> None:
    """Show one dead letter as JSON, with its original payload."""
    dead, _ = _dead_letters(ctx)
    typer.echo(json.dumps(_guard(lambda: dead.find(ref)).to_dict(), indent=2))


@dlq_app.command("retry")
def retry(
    ctx: typer.Context,
    ref: Annotated[str | None, typer.Argument(help="Entry id or batch id.")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Retry every dead letter.")] = False,
) -> None:
    """Put dead letters back on the queue with fresh attempts."""
    if (ref is None) == (not all_):
        raise UsageError("give exactly one of an entry id/batch id or --all")
    dead, _ = _dead_letters(ctx)
    entries = _guard(dead.list) if all_ else [_guard(lambda: dead.find(ref or ""))]
    retried = [e for e in entries if _guard(partial(dead.retry, e))]
    typer.echo(json.dumps({"retried": len(retried), "batch_ids": [e.batch_id for e in retried]}))


@dlq_app.command("purge")
def purge(
    ctx: typer.Context,
    older_than: Annotated[
        str | None,
        typer.Option("--older-than", help="Only entries that failed longer ago (e.g. 7d)."),
    ] = None,
) -> None:
    """Delete dead letters (all, or those older than --older-than)."""
    age = duration_flag(older_than, "--older-than") if older_than else None
    dead, _ = _dead_letters(ctx)
    typer.echo(json.dumps({"purged": _guard(lambda: dead.purge(age))}))
