"""PostgreSQL connections for the ledger: one policy for reconnecting with backoff.

psycopg's errors are mapped in :mod:`stagerd.db.errors`. psycopg is imported lazily so
``stagerd --help`` stays fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from stagerd.db.errors import is_db_transient
from stagerd.errors import ConfigError, ServiceUnavailable, first_line
from stagerd.retry import Policies, RetryPolicy

if TYPE_CHECKING:
    import psycopg

__all__ = ["CLI_POLICY", "DB_POLICY", "connect", "first_line", "is_db_transient"]

# The defaults of :class:`~stagerd.retry.Policies`, for callers not (yet) handed theirs.
DB_POLICY = Policies().postgres
CLI_POLICY = Policies().interactive


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
