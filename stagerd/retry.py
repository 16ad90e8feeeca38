"""One retry policy for every IO edge, built on tenacity.

Callers wrap an operation with :meth:`RetryPolicy.call` (or decorate with
:meth:`RetryPolicy.wrap`); they never loop by hand. The policy retries only transient
failures (see :func:`is_transient`), backs off exponentially with full jitter, caps both the
attempts and the total time, stops at once when the *stop* event is set (shutdown), and
re-raises the last real exception, so callers see the cause, not a RetryError.

Tests inject a fast policy (``RetryPolicy(base=0.001, ...)``); there are no global switches.
"""

from __future__ import annotations

import errno
import logging
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from stagerd.errors import PermanentError, TransientError

T = TypeVar("T")
log = logging.getLogger("stagerd.retry")

TRANSIENT_ERRNOS = frozenset(
    {errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED, errno.EPIPE, errno.ETIMEDOUT}
)


def is_transient(exc: BaseException) -> bool:
    """Whether retrying the operation that raised *exc* can help.

    Knows stagerd's own classes and OS/socket errors only: each IO edge maps its library's
    errors onto TransientError/PermanentError (S3: :mod:`stagerd.s3.boto`)."""
    if isinstance(exc, TransientError):
        return True
    if isinstance(exc, PermanentError):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError, socket.timeout)):
        return True
    return isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter, bounded in attempts and total time."""

    attempts: int = 8
    base: float = 0.5
    max_delay: float = 30.0
    total: float = 600.0
    classify: Callable[[BaseException], bool] = is_transient

    def call(
        self,
        fn: Callable[[], T],
        *,
        what: str = "operation",
        stop: threading.Event | None = None,
        before_retry: Callable[[], None] | None = None,
    ) -> T:
        """Run *fn* until it succeeds, a permanent error, exhaustion or *stop*.

        *before_retry* runs before each new attempt (e.g. rewind a stream). Raises the last
        exception *fn* raised.
        """
        from tenacity import (
            Retrying,
            retry_if_exception,
            stop_after_attempt,
            stop_after_delay,
            wait_random_exponential,
        )
        from tenacity.stop import stop_base

        class _StopEvent(stop_base):
            def __call__(self, retry_state: object) -> bool:
                return stop is not None and stop.is_set()

        def _log(retry_state: object) -> None:
            outcome = getattr(retry_state, "outcome", None)
            exc = outcome.exception() if outcome is not None else None
            number = getattr(retry_state, "attempt_number", 0)
            from stagerd.liveness import touch

            touch()  # a bounded retry is a worker busy, not hung (the watchdog's measure)
            log.warning(
                "%s failed (attempt %d/%d), retrying: %s",
                what,
                number,
                self.attempts,
                brief(exc),
                extra={"retry_of": what, "attempt": number},
            )
            if before_retry is not None:
                before_retry()

        retrying = Retrying(
            stop=stop_after_attempt(self.attempts) | stop_after_delay(self.total) | _StopEvent(),
            wait=wait_random_exponential(multiplier=self.base, max=self.max_delay),
            retry=retry_if_exception(self.classify),
            before_sleep=_log,
            reraise=True,
        )
        return retrying(fn)

    def wrap(self, what: str) -> Callable[[Callable[[], T]], Callable[[], T]]:
        """Decorator form of :meth:`call` for zero-argument callables."""

        def decorate(fn: Callable[[], T]) -> Callable[[], T]:
            return lambda: self.call(fn, what=what)

        return decorate


def brief(exc: BaseException | None) -> str:
    """An exception as one line for reasons and logs: ``Type: first line``, secrets
    redacted, at most 300 characters. The one helper for that; every module calls it."""
    from stagerd.log import redact

    if exc is None:
        return "?"
    lines = str(exc).strip().splitlines()
    text = redact(f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__)
    return text if len(text) <= 300 else text[:297] + "..."
