"""``stagerd db``: schema migrations and a batch's ledger entry with its results."""

from __future__ import annotations

import json
from dataclasses import asdict
from datetime import datetime
from typing import Annotated, Any

import typer

from stagerd.commands import state

db_app = typer.Typer(help="The PostgreSQL ledger: migrations, batch results.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(db_app, name="db")


@db_app.command("migrate")
def migrate(ctx: typer.Context) -> None:
    """Apply pending schema migrations (idempotent; safe beside running workers)."""
    from stagerd.db.ledger import CLI_POLICY
    from stagerd.db.ledger import migrate as run_migrations

    database_url = state(ctx).settings().require_database()
    applied = run_migrations(database_url, policy=CLI_POLICY)
    if applied:
        typer.echo("applied migrations: " + ", ".join(f"{v:04d}" for v in applied))
    else:
        typer.echo("schema up to date")


@db_app.command("results")
def results(
    ctx: typer.Context,
    batch_id: Annotated[str, typer.Argument(help="The batch id.")],
) -> None:
    """Print a batch's ledger state and its results as one JSON object."""
    from stagerd.db.ledger import CLI_POLICY, Ledger
    from stagerd.errors import StagerdError, UsageError
    from stagerd.ids import validate_batch_id

    try:
        validate_batch_id(batch_id)
    except StagerdError as exc:
        raise UsageError(str(exc)) from None
    ledger = Ledger(state(ctx).settings().require_database(), policy=CLI_POLICY)
    try:
        row = ledger.batch(batch_id)
        if row is None:
            raise StagerdError(f"batch {batch_id!r} is not in the ledger")
        items = ledger.results(batch_id)
    finally:
        ledger.close()
    out: dict[str, Any] = asdict(row)
    out["results"] = [{"item": item, "result": result} for item, result in items]
    typer.echo(json.dumps(out, indent=2, default=_json_default))


def _json_default(value: object) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
