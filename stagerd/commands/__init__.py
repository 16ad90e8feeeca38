"""Subcommands. Each module exposes ``register(app)``; see :mod:`stagerd.cli`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import typer

from stagerd.config.settings import Settings


@dataclass
class AppState:
    """What the root callback hands to subcommands through ``ctx.obj``."""

    env_file: Path | None = None
    _settings: Settings | None = field(default=None, repr=False)

    def settings(self) -> Settings:
        """Load settings once (lazily, so ``--help`` never fails on bad configuration).

        Raises ConfigError, which the CLI turns into exit code 2.
        """
        if self._settings is None:
            from stagerd.log import register_secrets

            self._settings = Settings.from_env(env_file=self.env_file)
            register_secrets(secret_values(self._settings))
        return self._settings


def secret_values(settings: Settings) -> list[str | None]:
    """The secret strings of *settings*, for the log redaction filter."""
    from stagerd.config.settings import url_passwords

    values: list[str | None] = [settings.s3_access_key, settings.s3_secret_key]
    for url in (settings.redis_url, settings.database_url):
        values.extend(url_passwords(url))
    return values


def state(ctx: typer.Context) -> AppState:
    """The :class:`AppState` of the running command."""
    obj = ctx.find_root().obj
    if not isinstance(obj, AppState):  # direct invocation of a sub-app in tests
        obj = AppState()
        ctx.find_root().obj = obj
    return obj


def duration_flag(text: str, flag: str) -> float:
    """Parse a duration option (``15m``, ``24h``), or raise UsageError naming *flag*."""
    from stagerd.errors import UsageError
    from stagerd.units import parse_duration

    try:
        value = parse_duration(text)
    except ValueError as exc:
        raise UsageError(f"{flag}: {exc}") from None
    if value < 0:
        raise UsageError(f"{flag}: must not be negative")
    return value
