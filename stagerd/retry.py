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
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, TypeVar

from stagerd.errors import PermanentError, TransientError

if TYPE_CHECKING:
    from stagerd.config.settings import Settings

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


def brief(exc: BaseException | None, limit: int = 300) -> str:
    """An exception as one line for reasons and logs: ``Type: first line``, secrets
    redacted, at most *limit* characters. The one helper for that (over
    :func:`stagerd.errors.first_line`); every module calls it."""
    from stagerd.errors import first_line
    from stagerd.log import redact

    if exc is None:
        return "?"
    name = type(exc).__name__
    text = redact(f"{name}: {first_line(exc)}" if str(exc).strip() else name)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- the policies of one process --------------------------------------------------------


def _redis_policy() -> RetryPolicy:
    # Rides out a Redis restart; bounded, so a dead Redis ends the process (systemd restarts it).
    return RetryPolicy(attempts=40, base=0.2, max_delay=5.0, total=180.0)


def _postgres_policy() -> RetryPolicy:
    # Long enough to ride out a PostgreSQL restart, bounded so a dead database ends the job.
    return RetryPolicy(attempts=30, base=0.2, max_delay=5.0, total=120.0)


def _startup_policy() -> RetryPolicy:
    # A worker restarted during a PostgreSQL outage (results waiting on scratch) waits for
    # it rather than crash-looping into systemd's start limit; under TimeoutStartSec (5 min).
    return RetryPolicy(attempts=10_000, base=0.2, max_delay=5.0, total=240.0)


def _interactive_policy() -> RetryPolicy:
    # Interactive commands: a person is waiting; fail within seconds with the reason.
    return RetryPolicy(attempts=3, base=0.2, max_delay=1.0, total=10.0)


@dataclass(frozen=True)
class Policies:
    """Every retry policy of one process, built once (:meth:`from_settings`) and passed down
    to the edges and roles that call services; tests build their own, fast ones.

    Each edge translates its library's errors into :class:`TransientError` /
    :class:`PermanentError` before the policy sees them, so :func:`is_transient` is the
    classifier; *redis* keeps a classifier of its own until the queue edge translates."""

    redis: RetryPolicy = field(default_factory=_redis_policy)
    postgres: RetryPolicy = field(default_factory=_postgres_policy)
    postgres_startup: RetryPolicy = field(default_factory=_startup_policy)
    interactive: RetryPolicy = field(default_factory=_interactive_policy)
    s3: RetryPolicy = field(default_factory=RetryPolicy)
    # How long a worker keeps retrying the results commit (STAGERD_COMMIT_RETRY), seconds.
    commit_retry: float = 3600.0

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        classify_redis: Callable[[BaseException], bool] = is_transient,
        s3: RetryPolicy | None = None,
    ) -> Policies:
        """The policies for *settings*; *s3* replaces the staging policy (tests, options)."""
        return cls(
            redis=replace(_redis_policy(), classify=classify_redis),
            s3=s3 if s3 is not None else RetryPolicy(),
            commit_retry=settings.commit_retry,
        )
