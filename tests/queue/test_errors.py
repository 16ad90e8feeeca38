"""The Redis edge's error classifier."""

from __future__ import annotations

import pytest
import redis

from stagerd.errors import PermanentError, ServiceUnavailable
from stagerd.queue.errors import is_transient_redis

CASES = [
    (redis.ConnectionError("refused"), True),
    (redis.TimeoutError("slow"), True),
    (redis.BusyLoadingError("loading"), True),
    (redis.ResponseError("WRONGTYPE"), False),
    # redis-py derives AuthenticationError from ConnectionError: transient, as it always was.
    (redis.AuthenticationError("bad password"), True),
    (ServiceUnavailable("down"), True),
    (PermanentError("no"), False),
    (ConnectionResetError(), True),
    (ValueError("bug"), False),
]


@pytest.mark.parametrize(("exc", "transient"), CASES)
def test_classification(exc: BaseException, transient: bool) -> None:
    assert is_transient_redis(exc) is transient
