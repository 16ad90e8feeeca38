"""PostgreSQL connections for the ledger: one policy for reconnecting with backoff.

psycopg is imported lazily so ``stagerd --help`` stays fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from stagerd.errors import ConfigError, ServiceUnavailable
from stagerd.retry import RetryPolicy, is_transient

if TYPE_CHECKING:
    import psycopg


def is_db_transient(exc: BaseException) -> bool:
    """Transient for the ledger: our own classification plus psycopg's connection errors."""
    if is_transient(exc):
        return True
    import psycopg

    return isinstance(exc, psycopg.OperationalError)


# Long enough to ride out a PostgreSQL restart, bounded so a dead database ends the job.
DB_POLICY = RetryPolicy(attempts=30, base=0.2, max_delay=5.0, total=120.0, classify=is_db_transient)
# Interactive commands: a person is waiting; fail within seconds with the reason.
CLI_POLICY = RetryPolicy(attempts=3, base=0.2, max_delay=1.0, total=10.0, classify=is_db_transient)


def connect(
    database_url: str, *, policy: RetryPolicy = DB_POLICY, application_name: str = "stagerd"
) -> psycopg.Connection[Any]:
    """An autocommit connection, retried with backoff. Raises ServiceUnavailable."""
    import psycopg

    def attempt() -> psycopg.Connection[Any]:
        try:
            return psycopg.connect(
                database_url,
                autocommit=True,
                connect_timeout=10,
                application_name=application_name,
            )
        except psycopg.OperationalError as exc:
            raise ServiceUnavailable(f"PostgreSQL unreachable: {first_line(exc)}") from None
        except psycopg.ProgrammingError:
            # libpq's parser quotes the text it refuses (a password, say): name, not value.
            raise ConfigError(
                "DATABASE_URL: libpq cannot parse it (percent-encode special characters)"
            ) from None

    return policy.call(attempt, what="connect to PostgreSQL")


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
