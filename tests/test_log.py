from __future__ import annotations

import io
import json
import logging

from stagerd.log import JsonFormatter, RedactingFilter, get_logger, register_secrets, setup_logging


def _capture(json_mode: bool) -> tuple[logging.Logger, io.StringIO]:
    setup_logging("debug", json_mode)
    logger = get_logger("test")
    stream = io.StringIO()
    handler = logging.getLogger("stagerd").handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(stream)
    return logger, stream


def test_json_lines_with_extras() -> None:
    logger, stream = _capture(json_mode=True)
    logger.info("staged %s", "b1", extra={"batch_id": "b1", "bytes": 42})
    record = json.loads(stream.getvalue())
    assert record["msg"] == "staged b1" and record["batch_id"] == "b1" and record["bytes"] == 42
    assert record["level"] == "info" and record["logger"] == "stagerd.test"


def test_human_lines() -> None:
    logger, stream = _capture(json_mode=False)
    logger.warning("waiting", extra={"batch_id": "b2"})
    line = stream.getvalue()
    assert "WARNING" in line and "waiting" in line and "batch_id=b2" in line


def test_secrets_are_redacted_in_messages_and_extras() -> None:
    register_secrets(["topsecret-abc", None, "xy"])
    try:
        logger, stream = _capture(json_mode=True)
        logger.error("auth failed with %s", "topsecret-abc", extra={"detail": "key=topsecret-abc"})
        out = stream.getvalue()
        assert "topsecret-abc" not in out and "***" in out
    finally:
        RedactingFilter.secrets.remove("topsecret-abc")
    assert "xy" not in RedactingFilter.secrets
    assert isinstance(JsonFormatter(), logging.Formatter)


def test_json_traceback_field_is_redacted() -> None:
    # Library exception text (a DSN echoed by a parser) rides in tracebacks, which the
    # record filter never sees: the formatter redacts the rendered trace too.
    register_secrets(["tb-secret-value-123"])
    logger, out = _capture(True)
    try:
        raise ValueError("bad conninfo 'password=tb-secret-value-123 host=x'")
    except ValueError:
        logger.error("failed", exc_info=True)
    record = json.loads(out.getvalue().splitlines()[-1])
    assert "ValueError" in record["exc"]
    assert "tb-secret-value-123" not in out.getvalue()
