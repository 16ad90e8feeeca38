"""Logging: JSON lines on stderr for journald, readable lines on a terminal.

Every record passes a redaction filter that replaces the configured secret values, a
second line of defence behind code that never logs them in the first place.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterable
from typing import Any, ClassVar

from stagerd.config.settings import REDACTED

LOGGER_NAME = "stagerd"
# Attributes of a LogRecord that are not user "extra" fields.
_STANDARD = frozenset(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}


def get_logger(name: str) -> logging.Logger:
    """A child of the ``stagerd`` logger (``get_logger(__name__)``)."""
    return logging.getLogger(name if name.startswith(LOGGER_NAME) else f"{LOGGER_NAME}.{name}")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg and any ``extra=`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                payload[key] = value
        if record.exc_info and record.levelno >= logging.ERROR:
            # Library exception text (a DSN echoed by a parser, say) rides in tracebacks:
            # the filter ran before formatting, so redact the rendered trace here.
            payload["exc"] = redact(self.formatException(record.exc_info))
        return json.dumps(payload, default=str, ensure_ascii=False)


class HumanFormatter(logging.Formatter):
    """``12:00:01 INFO  message  key=value ...`` for people at a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        extras = " ".join(
            f"{k}={v}"
            for k, v in vars(record).items()
            if k not in _STANDARD and not k.startswith("_")
        )
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        line = f"{stamp} {record.levelname:<7} {record.getMessage()}"
        return f"{line}  {extras}" if extras else line


class RedactingFilter(logging.Filter):
    """Replace known secret values anywhere in the rendered message and extras."""

    secrets: ClassVar[list[str]] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.secrets:
            return True
        message = record.getMessage()
        for secret in self.secrets:
            message = message.replace(secret, REDACTED)
        record.msg, record.args = message, None
        for key, value in list(vars(record).items()):
            if key not in _STANDARD and isinstance(value, str):
                clean = value
                for secret in self.secrets:
                    clean = clean.replace(secret, REDACTED)
                setattr(record, key, clean)
        return True


def redact(text: str) -> str:
    """*text* with every registered secret value masked (for reasons stored elsewhere)."""
    for secret in RedactingFilter.secrets:
        text = text.replace(secret, REDACTED)
    return text


def setup_logging(level: str = "info", json_mode: bool | None = None) -> None:
    """Configure the ``stagerd`` logger once for this process (idempotent)."""
    if json_mode is None:
        json_mode = not sys.stderr.isatty()
    logger = logging.getLogger(LOGGER_NAME)
    logger.handlers.clear()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_mode else HumanFormatter())
    handler.addFilter(RedactingFilter())
    logger.addHandler(handler)
    logger.setLevel(level.upper())
    logger.propagate = False


def register_secrets(values: Iterable[str | None]) -> None:
    """Teach the redaction filter the secret values of this process's settings."""
    for value in values:
        # Very short values would redact ordinary words; they are not real secrets anyway.
        if value and len(value) >= 4 and value not in RedactingFilter.secrets:
            RedactingFilter.secrets.append(value)
