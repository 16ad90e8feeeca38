"""What an S3 refusal means and which setting fixes it.

Servers explain refusals in the error body's ``Message``; botocore keeps it, but our
one-line errors used to drop it, so "InvalidArgument (HTTP 400)" left the operator to
guess. :func:`explain` quotes the server's code and message and, for limits we know,
names the stagerd setting to change (a part-number refusal: the server's limit and
``STAGERD_MAX_PARTS``).
"""

from __future__ import annotations

import re
from typing import Any

from stagerd.log import redact

_PART_LIMIT = re.compile(
    r"part ?number.*?(?:between\s+\d+\s+and|at most|less than or equal to|<=|max(?:imum)?)"
    r"\D{0,20}(\d{1,6})",
    re.IGNORECASE,
)
_CHECKSUM_CODES = frozenset({"XAmzContentSHA256Mismatch", "InvalidDigest", "BadDigest"})


def server_message(exc: BaseException) -> tuple[str | None, str | None, str | None]:
    """(code, HTTP status, message) of a botocore ClientError; Nones otherwise."""
    response: Any = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return None, None, None
    error = response.get("Error", {})
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    code, message = error.get("Code"), error.get("Message")
    return (
        str(code) if code is not None else None,
        str(status) if status is not None else None,
        _clean(str(message)) if message else None,
    )


def part_limit(message: str | None) -> int | None:
    """The part-number limit a server states in its refusal, if it states one."""
    match = _PART_LIMIT.search(message or "")
    return int(match.group(1)) if match else None


def hint(code: str | None, message: str | None) -> str | None:
    """The setting to change for a known limit, or None."""
    text = (message or "").lower()
    limit = part_limit(message)
    if limit is not None:
        return (
            f"the server allows at most {limit} parts per upload: set STAGERD_MAX_PARTS={limit} "
            "(part sizes then grow to fit)"
        )
    if code == "EntityTooSmall":
        return "a part is below the server's minimum part size: raise STAGERD_PART_SIZE"
    if code == "EntityTooLarge":
        return "a part is over the server's limit: lower STAGERD_PART_SIZE"
    if code in _CHECKSUM_CODES or "checksum" in text or "x-amz-content-sha256" in text:
        return "the server rejects this checksum mode: try STAGERD_S3_CHECKSUM=when_required"
    if code == "RequestTimeTooSkewed":
        return "this host's clock is off: fix NTP"
    if code == "AuthorizationHeaderMalformed" or "region" in text:
        return "check STAGERD_S3_REGION"
    return None


def explain(exc: BaseException) -> str:
    """``Code (HTTP n): "message"; hint`` for a ClientError (redacted, one line)."""
    code, status, message = server_message(exc)
    text = f"{code or '?'} (HTTP {status or '?'})"
    if message:
        text += f': "{message}"'
    advice = hint(code, message)
    return f"{text}; {advice}" if advice else text


def _clean(message: str) -> str:
    line = " ".join(message.split())
    line = redact(line)
    return line if len(line) <= 240 else line[:237] + "..."
