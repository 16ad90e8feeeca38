"""``stagerd doctor``: pass/fail checks with hints; exit 0 only when all pass."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Annotated

import typer

from stagerd.commands import state


def register(app: typer.Typer) -> None:
    app.command("doctor")(doctor)


def doctor(
    ctx: typer.Context,
    role: Annotated[
        str, typer.Option("--role", help="What this host runs: gpu, transfer or janitor.")
    ] = "gpu",
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object.")] = False,
) -> None:
    """Check configuration, S3, Redis, PostgreSQL, scratch and the processor."""
    from stagerd.errors import UsageError
    from stagerd.ops.doctor import ROLES, run_checks

    if role not in ROLES:
        raise UsageError(f"--role must be one of {', '.join(ROLES)}")
    checks = run_checks(state(ctx).settings(), role)
    ok = all(c.ok for c in checks)
    if as_json:
        typer.echo(
            json.dumps({"ok": ok, "role": role, "checks": [asdict(c) for c in checks]}, indent=2)
        )
    else:
        for c in checks:
            verdict = "FAIL" if not c.ok else "WARN" if c.warn else "PASS"
            typer.echo(f"{verdict}  {c.name:<13} {c.detail}")
            if (not c.ok or c.warn) and c.hint:
                typer.echo(f"{'':<6}{'':<13} hint: {c.hint}")
    if not ok:
        raise typer.Exit(1)
