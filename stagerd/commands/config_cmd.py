"""``stagerd config``: the effective configuration, every secret redacted."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from stagerd.commands import state


def register(app: typer.Typer) -> None:
    app.command("config")(config)


def config(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object.")] = False,
    check: Annotated[
        bool,
        typer.Option(
            "--check", help="Also require the S3 settings; exit 2 naming what is missing."
        ),
    ] = False,
) -> None:
    """Print the effective configuration (environment over env file), secrets redacted."""
    settings = state(ctx).settings()
    if check:
        settings.require_s3()
    values = settings.redacted()
    if as_json:
        typer.echo(json.dumps(values, indent=2, sort_keys=True))
        return
    width = max(len(k) for k in values)
    for key, value in values.items():
        typer.echo(f"{key:<{width}}  {value if value is not None else '(unset)'}")
