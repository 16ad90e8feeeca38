from __future__ import annotations

import errno
import threading

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError

from stagerd.errors import ArchiveRejected, TransientError
from stagerd.retry import RetryPolicy
from stagerd.s3.boto import is_transient  # raw botocore errors are the S3 edge's to classify

FAST = RetryPolicy(attempts=4, base=0.001, max_delay=0.002, total=10.0, classify=is_transient)


def _client_error(code: str, status: int) -> ClientError:
    return ClientError(
        {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "UploadPart"
    )


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (_client_error("SlowDown", 503), True),
        (_client_error("InternalError", 500), True),
        (_client_error("AccessDenied", 403), False),
        (_client_error("NoSuchBucket", 404), False),
        (EndpointConnectionError(endpoint_url="http://x"), True),
        (ConnectionResetError(), True),
        (OSError(errno.ECONNRESET, "reset"), True),
        (OSError(errno.ENOENT, "missing"), False),
        (TransientError("later"), True),
        (ArchiveRejected("bad"), False),
        (ValueError("bug"), False),
    ],
)
def test_classification(exc: BaseException, transient: bool) -> None:
    assert is_transient(exc) is transient


def test_retries_transient_then_succeeds_and_rewinds() -> None:
    calls: list[int] = []
    rewinds: list[int] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise _client_error("SlowDown", 503)
        return "ok"

    assert FAST.call(flaky, what="part 1", before_retry=lambda: rewinds.append(1)) == "ok"
    assert len(calls) == 3 and len(rewinds) == 2


def test_permanent_error_fails_fast() -> None:
    calls: list[int] = []

    def denied() -> None:
        calls.append(1)
        raise _client_error("AccessDenied", 403)

    with pytest.raises(ClientError, match="AccessDenied"):
        FAST.call(denied)
    assert len(calls) == 1


def test_exhaustion_reraises_last_cause() -> None:
    calls: list[int] = []

    def down() -> None:
        calls.append(1)
        raise ConnectionResetError(f"reset #{len(calls)}")

    with pytest.raises(ConnectionResetError, match="reset #4"):
        FAST.call(down)


def test_stop_event_ends_retrying() -> None:
    stop = threading.Event()
    calls: list[int] = []

    def down() -> None:
        calls.append(1)
        stop.set()
        raise ConnectionResetError("reset")

    with pytest.raises(ConnectionResetError):
        FAST.call(down, stop=stop)
    assert len(calls) == 1
