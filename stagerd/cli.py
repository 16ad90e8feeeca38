"""The ``stagerd`` command line: parse, build settings, dispatch, map errors to exit codes.

Nothing else lives here. Each subcommand is a module under :mod:`stagerd.commands` with a
``register(app)`` function; heavy libraries (boto3, redis, psycopg) are imported inside the
commands so ``stagerd --version`` and ``--help`` start fast.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Annotated

import typer

from stagerd import __version__, build_id
from stagerd.commands import AppState
from stagerd.errors import StagerdError

# The subcommand modules, in the order ``--help`` lists them.
COMMAND_MODULES = (
    "transfer",
    "gpu",
    "janitor",
    "reconcile",
    "status",
    "doctor",
    "dlq",
    "db",
    "config_cmd",
    "selfcheck",
)

app = typer.Typer(
    name="stagerd",
    help="Stage batch archives: transfer host -> S3 -> GPU VM scratch -> results in PostgreSQL.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"stagerd {__version__} (build {build_id()}, Python {sys.version.split()[0]})")
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    env_file: Annotated[
        Path | None,
        typer.Option(
            "--env-file",
            help="Read settings from this file (default: $STAGERD_ENV_FILE, "
            "else /etc/stagerd/stagerd.env when it exists). The environment wins.",
            show_default=False,
        ),
    ] = None,
    log_level: Annotated[
        str,
        typer.Option(
            "--log-level", help="debug, info, warning or error.", envvar="STAGERD_LOG_LEVEL"
        ),
    ] = "info",
    log_json: Annotated[
        bool | None,
        typer.Option(
            "--log-json/--log-text",
            help="Log format (default: JSON lines unless stderr is a terminal).",
            show_default=False,
        ),
    ] = None,
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Stage batch archives through S3-compatible storage onto GPU VMs."""
    from stagerd.log import setup_logging

    if log_level.lower() not in {"debug", "info", "warning", "error"}:
        raise typer.BadParameter("use debug, info, warning or error", param_hint="--log-level")
    setup_logging(log_level, log_json)
    ctx.obj = AppState(env_file=env_file)


for _name in COMMAND_MODULES:
    try:
        _module = importlib.import_module(f"stagerd.commands.{_name}")
    except ModuleNotFoundError as _exc:
        if _exc.name != f"stagerd.commands.{_name}":
            raise
        continue
    _module.register(app)


def main() -> None:
    """Console entry point: run the app, turning StagerdError into one line and an exit code,
    then end without the interpreter's teardown (stagerd.fastexit says why and when)."""
    from stagerd.fastexit import exit_code, finish

    try:
        _run()
    except SystemExit as done:
        finish(exit_code(done.code))
    finish(0)


def _run() -> None:
    from stagerd.log import redact

    try:
        app(prog_name="stagerd")
    except StagerdError as exc:
        typer.echo(f"stagerd: error: {redact(str(exc))}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        typer.echo("stagerd: interrupted", err=True)
        sys.exit(130)
    except Exception as exc:
        # A bug, not bad input: keep the traceback for the journal (JSON logs carry it),
        # but end with one readable line and exit 1 so systemd's restart policy applies.
        import logging

        logging.getLogger("stagerd").error("internal error", exc_info=True)
        typer.echo(f"stagerd: internal error: {type(exc).__name__}: {redact(str(exc))}", err=True)
        sys.exit(1)
