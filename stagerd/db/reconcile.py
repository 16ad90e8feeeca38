"""The ledger's side of ``stagerd reconcile``: which batches it settled, its newest lease.

Each function opens one connection (retried under *policy*, then ServiceUnavailable) and
runs one statement on it; a psycopg error during the statement propagates untranslated
(:func:`~stagerd.db.errors.db_errors`), so reconcile can tell the operator to check the
migrations.
"""

from __future__ import annotations

from collections.abc import Sequence

from stagerd.db.pg import CLI_POLICY, connect
from stagerd.retry import RetryPolicy

# Shared with Ledger.max_lease: the floor for Redis's lease epoch.
MAX_LEASE = "SELECT coalesce(max(lease), 0) FROM stagerd_batches"


def batch_states(
    database_url: str, batch_ids: Sequence[str], *, policy: RetryPolicy = CLI_POLICY
) -> dict[str, str]:
    """The ledger state of each of *batch_ids* that has a row (no connection if none)."""
    if not batch_ids:
        return {}
    with connect(database_url, policy=policy) as conn:
        rows = conn.execute(
            "SELECT batch_id, state FROM stagerd_batches WHERE batch_id = ANY(%s)",
            (list(batch_ids),),
        ).fetchall()
    return {row[0]: row[1] for row in rows}


def max_lease(database_url: str, *, policy: RetryPolicy = CLI_POLICY) -> int:
    """The newest lease token the ledger holds (0 if none)."""
    with connect(database_url, policy=policy) as conn:
        row = conn.execute(MAX_LEASE).fetchone()
    return int(row[0]) if row else 0
