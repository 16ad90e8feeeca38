"""How the Redis edge classifies redis-py's errors for stagerd's one retry layer.

redis-py raises its own tree (``redis.RedisError``); its ``ConnectionError`` and
``TimeoutError`` are *not* the builtins, so :func:`stagerd.retry.is_transient` alone does not
see them. The mapping:

- ``redis.ConnectionError`` (also ``BusyLoadingError``, a Redis still loading its data,
  and ``AuthenticationError``, which redis-py derives from it) and ``redis.TimeoutError``:
  transient, like :class:`~stagerd.errors.TransientError`;
- every other ``redis.RedisError`` (``ResponseError`` such as WRONGTYPE or a script
  error): permanent, like :class:`~stagerd.errors.PermanentError`: the same command
  against the same data fails again;
- anything else: as :func:`stagerd.retry.is_transient` says.

Attempts per operation are bounded twice, on purpose: redis-py retries a connection or
timeout error itself (:data:`stagerd.queue.redis_queue.REDIS_RETRIES`: at most
``REDIS_RETRIES + 1`` attempts per command, about 7 s of back-off, so a short restart is
ridden out by callers that have no policy of their own: the janitor, transfer's enqueue,
``status``), and a :class:`~stagerd.retry.RetryPolicy` classifying with
:func:`is_transient_redis` retries the whole operation above that (the worker's service
policy: at most its ``attempts`` x ``REDIS_RETRIES + 1`` commands, within its ``total``).
"""

from __future__ import annotations

from stagerd.retry import is_transient


def is_transient_redis(exc: BaseException) -> bool:
    """Whether retrying a Redis operation that raised *exc* can help: stagerd's transient
    errors (:func:`stagerd.retry.is_transient`) and redis-py's connection and timeout errors.

    The classifier for a :class:`~stagerd.retry.RetryPolicy` around Redis (and PostgreSQL)
    calls; never raises."""
    if is_transient(exc):
        return True
    import redis

    return isinstance(exc, (redis.ConnectionError, redis.TimeoutError))


def queue_errors(*also: type[BaseException]) -> tuple[type[BaseException], ...]:
    """What a Redis call can raise when the service (not stagerd) is at fault: redis-py's
    errors and the socket errors it lets through, plus *also*. Roles catch this tuple, so
    they never name redis-py's classes: ``except queue_errors(StagerdError) as exc``.
    Never raises."""
    import redis

    return (redis.RedisError, OSError, *also)
