"""The ledger's side of dead-worker recovery: say what the queue did with their batches."""

from __future__ import annotations

from collections.abc import Sequence

from stagerd.db.pg import connect


def requeue_stale_batches(
    database_url: str, dead_workers: Sequence[str], dead_lettered: Sequence[str] = ()
) -> list[str]:
    """Janitor: rows in staging/processing owned by a dead worker -> ``requeued``, or
    ``dead`` for the batches that recovery moved to the dead-letter list (attempts used
    up), so the ledger says what the queue did. Returns the batch ids marked requeued.
    Raises ServiceUnavailable when PostgreSQL cannot be reached (after DB_POLICY), and
    psycopg's own error if the connection breaks during the statement."""
    if not dead_workers:
        return []
    with connect(database_url) as conn:
        rows = conn.execute(
            "UPDATE stagerd_batches SET updated_at = now(),"
            " state = CASE WHEN batch_id = ANY(%(dead)s) THEN 'dead' ELSE 'requeued' END,"
            " error = 'worker ' || worker || ' stopped heartbeating'"
            " WHERE state IN ('staging', 'processing') AND worker = ANY(%(workers)s)"
            " RETURNING batch_id, state",
            {"dead": list(dead_lettered), "workers": list(dead_workers)},
        ).fetchall()
    return sorted(row[0] for row in rows if row[1] == "requeued")
