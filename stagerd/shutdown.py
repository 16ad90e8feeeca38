"""Service calls that stay bounded once the worker is stopping.

A worker told to stop while Redis or PostgreSQL is unreachable used to keep retrying for
minutes (40 deregistration attempts) after its main loop had stopped feeding the systemd
watchdog, and ended in a watchdog kill instead of a clean exit. Stopping must not depend on
the services: whatever a stopping worker cannot tell them is already safe where it is,
because every job it holds stays in its processing list, and the next start of this worker
(``register`` takes its own jobs back) or another worker's heartbeat recovers it.

:class:`ShutdownGuard` wraps every service call of the worker. Before *stop* it is the
service's own policy (stopped early by *stop*). Once *stop* is set, a call gets a short,
bounded retry; a service that still does not answer is given up for the rest of the
shutdown, so later calls to it fail at once rather than each waiting again, and the caller
gets :class:`LeftForRecovery`, which the slots log and do not treat as a crash.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from typing import TypeVar

from stagerd.errors import ServiceUnavailable
from stagerd.retry import RetryPolicy, brief

T = TypeVar("T")

# Per call once stopping: a service that restarts answers within this; one that is down
# costs at most this much (plus the client's own socket timeouts) per service, once.
SHUTDOWN_ATTEMPTS = 2
SHUTDOWN_TOTAL = 5.0


class LeftForRecovery(ServiceUnavailable):
    """A stopping worker could not reach a service; the job stays for recovery."""


def bounded(policy: RetryPolicy) -> RetryPolicy:
    """*policy*'s classifier with the shutdown bound on attempts and time."""
    return dataclasses.replace(
        policy, attempts=SHUTDOWN_ATTEMPTS, total=SHUTDOWN_TOTAL, max_delay=1.0
    )


class ShutdownGuard:
    """Runs service calls under their policy, bounded once *stop* is set (thread-safe)."""

    def __init__(self, stop: threading.Event | None = None) -> None:
        self._stop = stop
        self._lock = threading.Lock()
        self._given_up: dict[str, str] = {}

    @property
    def stopping(self) -> bool:
        return self._stop is not None and self._stop.is_set()

    def call(
        self,
        policy: RetryPolicy,
        fn: Callable[[], T],
        *,
        what: str,
        service: str,
        stop: threading.Event | None = None,
    ) -> T:
        """Run *fn*; raises what *fn* raises, or LeftForRecovery once stopping."""
        if not self.stopping:
            try:
                return policy.call(fn, what=what, stop=stop or self._stop)
            except Exception as exc:
                # Only a retry cut short by the stop goes on to the bounded attempt below.
                if not (self.stopping and policy.classify(exc)):
                    raise
        return self.final(policy, fn, what=what, service=service)

    def final(self, policy: RetryPolicy, fn: Callable[[], T], *, what: str, service: str) -> T:
        """A bounded attempt at *fn*, whether or not stopping (e.g. deregistration)."""
        with self._lock:
            reason = self._given_up.get(service)
        if reason is not None:
            raise LeftForRecovery(f"{what}: skipped, {service} unreachable ({reason})")
        try:
            return bounded(policy).call(fn, what=what)
        except Exception as exc:
            if not policy.classify(exc):
                raise
            with self._lock:
                self._given_up.setdefault(service, brief(exc))
            raise LeftForRecovery(f"{what}: {service} unreachable ({brief(exc)})") from None
