"""The db edge's error mapping: psycopg's errors onto stagerd's transient/permanent classes.

Only this module (and the connection code that calls it) knows psycopg's exception tree:

- SQLSTATE classes 22 (data), 23 (integrity) and 54 (program limit), plus a string psycopg
  cannot encode, are the *values'* fault: :class:`ResultsRejected` (permanent; the same rows
  fail on every retry);
- :class:`psycopg.OperationalError` (connection lost, server shutting down) is
  :class:`ServiceUnavailable` (transient);
- anything else passes through unchanged (a bug: it ends the batch or the process).

So a :class:`~stagerd.retry.RetryPolicy` over a ledger call needs no classifier of its own.
psycopg is imported lazily so ``stagerd --help`` stays fast.
"""

from __future__ import annotations

from stagerd.errors import ResultsRejected, ServiceUnavailable, StagerdError, first_line
from stagerd.retry import is_transient


def is_db_transient(exc: BaseException) -> bool:
    """Transient for the ledger: our own classification plus psycopg's connection errors
    (for a psycopg error that reached a policy untranslated)."""
    if is_transient(exc):
        return True
    import psycopg

    return isinstance(exc, psycopg.OperationalError)


def refused_errors() -> tuple[type[BaseException], ...]:
    """Errors caused by the values sent, not by the service: SQLSTATE classes 22 (data),
    23 (integrity) and 54 (program limit: an index row too large, nesting too deep; psycopg
    files it under OperationalError, which would otherwise mean "retry")."""
    import psycopg

    return (
        psycopg.DataError,
        psycopg.IntegrityError,
        psycopg.errors.ProgramLimitExceeded,
        UnicodeEncodeError,  # a lone surrogate psycopg cannot encode
    )


def db_errors(*also: type[BaseException]) -> tuple[type[BaseException], ...]:
    """What a ledger call can raise untranslated when PostgreSQL (not stagerd) is at fault:
    psycopg's errors and the socket errors it lets through, plus *also*. Roles catch this
    tuple, so they never name psycopg's classes: ``except db_errors(StagerdError) as exc``.
    Never raises."""
    import psycopg

    return (psycopg.Error, OSError, *also)


def translate(exc: BaseException) -> StagerdError | None:
    """*exc* as stagerd's error (see the module docstring), or None to let it pass."""
    import psycopg

    if isinstance(exc, refused_errors()):
        # The data, not the service: the same rows fail on every retry.
        return ResultsRejected(f"PostgreSQL refused the data: {first_line(exc)}")
    if isinstance(exc, psycopg.OperationalError):
        return ServiceUnavailable(f"PostgreSQL: {first_line(exc)}")
    return None
