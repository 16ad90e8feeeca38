"""Versioned schema migrations: ``stagerd/db/migrations/NNNN_name.sql`` applied in order.

Applied by ``stagerd db migrate`` and at every worker start: idempotent, and serialised
between processes by a PostgreSQL advisory lock.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any

from stagerd.db.pg import DB_POLICY, connect
from stagerd.log import get_logger
from stagerd.retry import RetryPolicy

if TYPE_CHECKING:
    import psycopg

log = get_logger(__name__)

# Any 64-bit constant works; it only has to be the same in every stagerd process.
MIGRATION_LOCK_KEY = 0x57A6E7D0


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def load_migrations() -> list[Migration]:
    """The packaged ``stagerd/db/migrations/NNNN_name.sql`` files, in version order."""
    found = []
    for entry in (resources.files("stagerd.db") / "migrations").iterdir():
        stem, _, ext = entry.name.partition(".")
        number, _, name = stem.partition("_")
        if ext == "sql" and number.isdigit():
            found.append(Migration(int(number), name, entry.read_text(encoding="utf-8")))
    return sorted(found, key=lambda m: m.version)


def applied_versions(conn: psycopg.Connection[Any]) -> set[int]:
    """Versions recorded in ``stagerd_schema_migrations`` (empty before the first migrate)."""
    exists = conn.execute("SELECT to_regclass('stagerd_schema_migrations')").fetchone()
    if not exists or exists[0] is None:
        return set()
    return {row[0] for row in conn.execute("SELECT version FROM stagerd_schema_migrations")}


def pending_migrations(database_url: str) -> list[Migration]:
    """Migrations not yet applied (for ``stagerd doctor``: one attempt, no retries).

    Raises psycopg.Error when PostgreSQL cannot be used."""
    import psycopg

    with psycopg.connect(database_url, autocommit=True, connect_timeout=10) as conn:
        done = applied_versions(conn)
    return [m for m in load_migrations() if m.version not in done]


def migrate(database_url: str, *, policy: RetryPolicy = DB_POLICY) -> list[int]:
    """Apply pending migrations in order; returns the versions applied now.

    Idempotent and safe to run from many workers at once: the advisory lock serialises
    them and each file is applied with its version row in one transaction.
    """
    with connect(database_url, policy=policy) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK_KEY,))
        try:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS stagerd_schema_migrations ("
                " version integer PRIMARY KEY, name text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = applied_versions(conn)
            applied = []
            for migration in load_migrations():
                if migration.version in done:
                    continue
                with conn.transaction():
                    conn.execute(migration.sql.encode())
                    conn.execute(
                        "INSERT INTO stagerd_schema_migrations (version, name) VALUES (%s, %s)",
                        (migration.version, migration.name),
                    )
                log.info("applied migration %04d_%s", migration.version, migration.name)
                applied.append(migration.version)
            return applied
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK_KEY,))
