"""``stagerd selfcheck``: import every runtime module of every role; see :mod:`stagerd.ops.selfcheck`."""

from __future__ import annotations

import json
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    app.command("selfcheck")(selfcheck)


def selfcheck(
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object on stdout.")] = False,
) -> None:
    """Check offline that this installation loads everything its services use (exit 1 if not)."""
    from stagerd.errors import StagerdError
    from stagerd.ops.selfcheck import run_checks

    checks = run_checks()
    failed = [c for c in checks if c.error is not None]
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "ok": not failed,
                    "checked": len(checks),
                    "failed": {c.name: c.error for c in failed},
                }
            )
        )
    elif not failed:
        typer.echo(f"selfcheck: ok ({len(checks)} modules and libraries load)")
    if failed:
        first = failed[0]
        raise StagerdError(
            f"selfcheck: {first.name} does not load: {first.error}"
            + (f" (and {len(failed) - 1} more)" if len(failed) > 1 else "")
        )
