"""The results commit's SQL, run inside :meth:`Ledger.commit_results`'s transaction: lock
the batch row (fenced by its lease), then stream the results in with COPY."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from stagerd.errors import LeaseLost
from stagerd.ids import archive_key

if TYPE_CHECKING:
    import psycopg


def claim_for_commit(
    conn: psycopg.Connection[Any], batch_id: str, worker: str | None, lease: int | None
) -> bool:
    """Lock the batch row for the commit; False if it is already ``done``. Raises
    LeaseLost when *lease* is older than the row's (a fenced zombie's late commit)."""
    current = conn.execute(
        "SELECT state, lease FROM stagerd_batches WHERE batch_id = %s FOR UPDATE",
        (batch_id,),
    ).fetchone()
    if current is not None and current[0] == "done":
        return False
    check_lease(batch_id, lease, current)
    if current is None:  # ledger row lost (e.g. a truncated table): recreate it
        conn.execute(
            "INSERT INTO stagerd_batches (batch_id, s3_key, state, attempts, worker)"
            " VALUES (%s, %s, 'processing', 1, %s)",
            (batch_id, archive_key(batch_id), worker),
        )
    return True


def check_lease(batch_id: str, lease: int | None, row: Any) -> None:
    """Inside the commit transaction (row locked): refuse a token that is not the newest."""
    if lease is None or row is None or row[1] is None or row[1] == lease:
        return
    raise LeaseLost(
        f"batch {batch_id}: commit with lease {lease} refused, the ledger holds lease {row[1]}"
    )


def copy_results(
    conn: psycopg.Connection[Any], batch_id: str, results: Iterable[tuple[str, Any]]
) -> tuple[int, int]:
    """COPY *results* through a temporary table into stagerd_results: (sent, inserted).

    The temporary table keeps ``ON CONFLICT DO NOTHING`` (a redelivered or repeated item
    keeps its first row) while rows still travel by COPY, one at a time."""
    from stagerd.results import RawJson

    conn.execute(
        "CREATE TEMPORARY TABLE IF NOT EXISTS stagerd_incoming"
        " (n bigserial, item text NOT NULL, result jsonb NOT NULL) ON COMMIT DELETE ROWS"
    )
    sent = 0
    with conn.cursor() as cur:
        with cur.copy("COPY stagerd_incoming (item, result) FROM STDIN") as copy:
            for item, result in results:
                text = result.text if isinstance(result, RawJson) else json.dumps(result)
                copy.write_row((item, text))
                sent += 1
        cur.execute(
            "INSERT INTO stagerd_results (batch_id, item, result)"
            " SELECT %s, item, result FROM stagerd_incoming ORDER BY n"
            " ON CONFLICT (batch_id, item) DO NOTHING",
            (batch_id,),
        )
        inserted = cur.rowcount
    return sent, inserted
