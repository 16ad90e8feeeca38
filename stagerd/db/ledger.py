"""The PostgreSQL ledger: batch states, results, failure history (migrations: schema.py).

Contract of the IO edge:

- Every call reconnects with backoff when PostgreSQL goes away (its policy: the process's
  :attr:`Policies.postgres <stagerd.retry.Policies>`, :data:`DB_POLICY` by default); a call
  that still cannot reach it raises :class:`ServiceUnavailable` (transient). psycopg's
  errors are mapped once, in :mod:`stagerd.db.errors`.
- :meth:`Ledger.commit_results` writes the results rows AND state ``done`` in one
  transaction and is idempotent: a batch already ``done`` is left alone (returns False), and
  result rows are unique per (batch_id, item), so a redelivered batch never duplicates rows.
- State updates never move a ``done`` batch back to another state.
- Fencing: a call given a lease token (``lease=``) acts only while the batch's ``lease``
  column holds that token; :meth:`Ledger.begin` claims the batch only with a token newer
  than the stored one. A refused call raises :class:`LeaseLost` (checked inside the same
  transaction as the write, so a stalled worker's late commit can never land).

psycopg is imported lazily so ``stagerd --help`` stays fast.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, TypeVar

from stagerd.db.commit import claim_for_commit, copy_results
from stagerd.db.errors import is_db_transient, translate
from stagerd.db.pg import CLI_POLICY, DB_POLICY, connect
from stagerd.db.reconcile import MAX_LEASE
from stagerd.db.recovery import requeue_stale_batches
from stagerd.db.rows import BATCH_COLUMNS, STATES, BatchRow, FailureRow
from stagerd.db.schema import Migration, load_migrations, migrate, pending_migrations
from stagerd.errors import LeaseLost, ResultsRejected, ServiceUnavailable
from stagerd.log import get_logger
from stagerd.retry import RetryPolicy
from stagerd.shutdown import ShutdownGuard

__all__ = [
    "CLI_POLICY",
    "DB_POLICY",
    "STATES",
    "BatchRow",
    "FailureRow",
    "Ledger",
    "Migration",
    "connect",
    "is_db_transient",
    "load_migrations",
    "migrate",
    "pending_migrations",
    "recent_failures",
    "requeue_stale_batches",
]

if TYPE_CHECKING:
    import psycopg

T = TypeVar("T")
log = get_logger(__name__)

MAX_ERROR_CHARS = 2000


# A state write of a fenced caller: only while the row still holds its token (two params).
_FENCE = "(%s::bigint IS NULL OR lease IS NULL OR lease = %s)"


# --- the ledger -----------------------------------------------------------------------


class Ledger:
    """Batch states and results for one worker process; safe to share between threads."""

    def __init__(
        self,
        database_url: str,
        *,
        policy: RetryPolicy = DB_POLICY,
        application_name: str = "stagerd",
        guard: ShutdownGuard | None = None,
    ) -> None:
        self._url = database_url
        self._policy = policy
        # The worker's: once it is stopping, calls are bounded (stagerd.shutdown).
        self._guard = guard or ShutdownGuard()
        self._application_name = application_name
        self._conn: psycopg.Connection[Any] | None = None
        # One connection, one transaction at a time: slots take turns (calls are short).
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._drop()

    def begin(
        self,
        batch_id: str,
        s3_key: str,
        *,
        worker: str,
        sha256: str | None,
        lease: int | None = None,
        size: int | None = None,
    ) -> bool:
        """Mark *batch_id* ``staging`` (attempts + 1). False if it is already ``done``.

        With *lease*: claim the batch with that token; raises LeaseLost if the ledger
        already holds a newer (or the same) token, i.e. a later pickup claimed it."""
        sql = """
            INSERT INTO stagerd_batches (batch_id, s3_key, state, attempts, worker, sha256,
                started_at, lease, archive_size)
            VALUES (%(b)s, %(k)s, 'staging', 1, %(w)s, %(sha)s, now(), %(lease)s, %(size)s)
            ON CONFLICT (batch_id) DO UPDATE SET
                s3_key = EXCLUDED.s3_key, state = 'staging',
                attempts = stagerd_batches.attempts + 1, worker = EXCLUDED.worker,
                sha256 = COALESCE(EXCLUDED.sha256, stagerd_batches.sha256),
                archive_size = COALESCE(EXCLUDED.archive_size, stagerd_batches.archive_size),
                lease = COALESCE(EXCLUDED.lease, stagerd_batches.lease),
                archive_bytes = NULL, extracted_bytes = NULL, file_count = NULL,
                stage_seconds = NULL, process_seconds = NULL, commit_seconds = NULL,
                error = NULL, started_at = now(), finished_at = NULL, updated_at = now()
            WHERE stagerd_batches.state <> 'done' AND (%(lease)s::bigint IS NULL
                OR stagerd_batches.lease IS NULL OR stagerd_batches.lease < %(lease)s)
            RETURNING state"""
        params = {"b": batch_id, "k": s3_key, "w": worker, "sha": sha256, "lease": lease}
        params["size"] = size
        row = self._run("ledger begin", lambda c: c.execute(sql, params).fetchone())
        if row is not None:
            return True
        current = self.batch(batch_id)
        if lease is not None and current is not None and current.state != "done":
            raise LeaseLost(
                f"batch {batch_id}: lease {lease} is older than the ledger's {current.lease}"
            )
        return False

    def reopen(self, batch_id: str, *, sha256: str, size: int | None) -> bool:
        """A done batch whose archive was replaced (``transfer upload --force``): delete its
        results and set it back to ``queued`` with the new digest, in one transaction.
        False (nothing changed) unless it is done with a different digest, so a
        redelivered replacement job never reprocesses a batch twice."""

        def write(conn: psycopg.Connection[Any]) -> bool:
            with conn.transaction():
                row = conn.execute(
                    "UPDATE stagerd_batches SET state = 'queued', sha256 = %s,"
                    " archive_size = %s, error = 'archive replaced (transfer upload --force)',"
                    " finished_at = NULL, updated_at = now()"
                    " WHERE batch_id = %s AND state = 'done' AND sha256 IS DISTINCT FROM %s"
                    " RETURNING batch_id",
                    (sha256, size, batch_id, sha256),
                ).fetchone()
                if row is None:
                    return False
                conn.execute("DELETE FROM stagerd_results WHERE batch_id = %s", (batch_id,))
            return True

        return self._run("ledger reopen", write)

    def max_lease(self) -> int:
        """The newest lease token the ledger holds (the floor for Redis's epoch)."""
        row = self._run(
            "ledger read",
            lambda c: c.execute(MAX_LEASE).fetchone(),
        )
        return int(row[0]) if row else 0

    def is_done(self, batch_id: str) -> bool:
        row = self._run(
            "ledger read",
            lambda c: c.execute(
                "SELECT state FROM stagerd_batches WHERE batch_id = %s", (batch_id,)
            ).fetchone(),
        )
        return row is not None and row[0] == "done"

    def mark_processing(
        self,
        batch_id: str,
        *,
        archive_bytes: int,
        extracted_bytes: int,
        file_count: int,
        sha256: str,
        stage_seconds: float,
        lease: int | None = None,
    ) -> None:
        """Staging finished: record sizes and timing, state ``processing``."""
        sql = f"""
            UPDATE stagerd_batches SET state = 'processing', archive_bytes = %s,
                extracted_bytes = %s, file_count = %s, sha256 = %s, stage_seconds = %s,
                updated_at = now()
            WHERE batch_id = %s AND state <> 'done' AND {_FENCE}"""
        params = (
            archive_bytes,
            extracted_bytes,
            file_count,
            sha256,
            stage_seconds,
            batch_id,
            lease,
            lease,
        )
        self._run("ledger processing", lambda c: c.execute(sql, params))

    def commit_results(
        self,
        batch_id: str,
        results: Iterable[tuple[str, Any]],
        *,
        process_seconds: float | None = None,
        worker: str | None = None,
        unique: bool = False,
        lease: int | None = None,
    ) -> bool:
        """Write *results* and state ``done`` in one transaction.

        *results* is consumed lazily (streamed with COPY, never held in memory); a value
        is a :class:`~stagerd.results.RawJson` (validated JSON text) or anything
        ``json.dumps`` takes. A repeated item keeps its first row; with *unique*, a repeat
        raises ResultsRejected instead. Returns False (writing nothing) when the batch is
        already ``done``. Retried as a whole on a lost connection: the transaction either
        happened or did not. Raises ResultsRejected when PostgreSQL refuses a value. With
        *lease*: raises LeaseLost (writing nothing) unless the row still holds that token.
        """

        def write(conn: psycopg.Connection[Any]) -> bool:
            started = time.monotonic()
            with conn.transaction():
                if not claim_for_commit(conn, batch_id, worker, lease):
                    return False
                sent, inserted = copy_results(conn, batch_id, results)
                if unique and inserted != sent:
                    raise ResultsRejected(
                        f"results repeat an item ({sent - inserted} duplicate rows)"
                    )
                conn.execute(
                    "UPDATE stagerd_batches SET state = 'done', process_seconds = %s,"
                    " commit_seconds = %s, error = NULL, finished_at = now(), updated_at = now()"
                    " WHERE batch_id = %s",
                    (process_seconds, time.monotonic() - started, batch_id),
                )
            return True

        return self._run("ledger commit", write)

    def record_failure(
        self,
        batch_id: str | None,
        error: str,
        *,
        outcome: str,
        attempt: int | None = None,
        worker: str | None = None,
        phase: str | None = None,
        lease: int | None = None,
    ) -> None:
        """Keep the failure in the history; outcome ``dead`` -> state dead, else failed."""
        # A processor's stderr may hold NUL, which PostgreSQL text cannot store.
        error = error.replace("\x00", "\\0")[:MAX_ERROR_CHARS]
        state = "dead" if outcome == "dead" else "failed"

        def write(conn: psycopg.Connection[Any]) -> None:
            with conn.transaction():
                conn.execute(
                    "INSERT INTO stagerd_failures (batch_id, attempt, worker, phase, outcome,"
                    " error) VALUES (%s, %s, %s, %s, %s, %s)",
                    ((batch_id or "")[:200] or None, attempt, worker, phase, outcome, error),
                )
                if batch_id is not None:
                    conn.execute(
                        "UPDATE stagerd_batches SET state = %s, error = %s, updated_at = now(),"
                        " finished_at = CASE WHEN %s = 'dead' THEN now() END"
                        f" WHERE batch_id = %s AND state <> 'done' AND {_FENCE}",
                        (state, error, state, batch_id, lease, lease),
                    )

        self._run("ledger failure", write)

    def mark_requeued(self, batch_id: str, reason: str, lease: int | None = None) -> None:
        """The job went back to the queue (shutdown, prefetch): state ``requeued``."""
        self._run(
            "ledger requeued",
            lambda c: c.execute(
                "UPDATE stagerd_batches SET state = 'requeued', error = %s, updated_at = now()"
                f" WHERE batch_id = %s AND state <> 'done' AND {_FENCE}",
                (reason[:MAX_ERROR_CHARS], batch_id, lease, lease),
            ),
        )

    def batch(self, batch_id: str) -> BatchRow | None:
        row = self._run(
            "ledger read",
            lambda c: c.execute(
                f"SELECT {BATCH_COLUMNS} FROM stagerd_batches WHERE batch_id = %s", (batch_id,)
            ).fetchone(),
        )
        return BatchRow(*row) if row else None

    def results(self, batch_id: str) -> list[tuple[str, Any]]:
        rows = self._run(
            "ledger read",
            lambda c: c.execute(
                "SELECT item, result FROM stagerd_results WHERE batch_id = %s ORDER BY item",
                (batch_id,),
            ).fetchall(),
        )
        return [(item, result) for item, result in rows]

    def recent_failures(self, limit: int = 10) -> list[FailureRow]:
        """The newest failures first (for ``stagerd status``)."""
        rows = self._run(
            "ledger read",
            lambda c: c.execute(
                "SELECT batch_id, attempt, worker, phase, outcome, error, failed_at"
                " FROM stagerd_failures ORDER BY failed_at DESC, id DESC LIMIT %s",
                (limit,),
            ).fetchall(),
        )
        return [FailureRow(*row) for row in rows]

    def schema_ready(self) -> bool:
        """Whether the ledger tables exist (``stagerd db migrate`` ran)."""
        row = self._run(
            "ledger read",
            lambda c: c.execute("SELECT to_regclass('stagerd_failures')").fetchone(),
        )
        return row is not None and row[0] is not None

    def count_by_state(self) -> dict[str, int]:
        rows = self._run(
            "ledger read",
            lambda c: c.execute(
                "SELECT state, count(*) FROM stagerd_batches GROUP BY state"
            ).fetchall(),
        )
        return {state: int(n) for state, n in rows}

    def _run(self, what: str, fn: Callable[[psycopg.Connection[Any]], T]) -> T:
        def attempt() -> T:
            with self._lock:
                if self._conn is None or self._conn.closed:
                    self._conn = connect(
                        self._url,
                        policy=RetryPolicy(attempts=1),
                        application_name=self._application_name,
                    )
                try:
                    return fn(self._conn)
                except Exception as exc:
                    mapped = translate(exc)
                    if mapped is None:
                        raise
                    if isinstance(mapped, ServiceUnavailable):
                        # A broken connection stays broken: drop it so the retry reconnects.
                        self._drop()
                    raise mapped from None

        return self._guard.call(self._policy, attempt, what=what, service="PostgreSQL")

    def _drop(self) -> None:
        import psycopg

        if self._conn is not None:
            conn, self._conn = self._conn, None
            try:
                conn.close()
            except (OSError, psycopg.Error) as exc:
                log.debug("closing a broken PostgreSQL connection: %s", exc)


def recent_failures(database_url: str, limit: int = 10) -> list[dict[str, Any]]:
    """The newest failures as JSON-ready dicts (``stagerd status``); one quick attempt.

    Raises ServiceUnavailable when PostgreSQL is unreachable; an unmigrated database has
    no failures yet."""
    ledger = Ledger(database_url, policy=RetryPolicy(attempts=1, classify=is_db_transient))
    try:
        if not ledger.schema_ready():
            return []
        rows = ledger.recent_failures(limit)
    finally:
        ledger.close()
    return [{**asdict(row), "failed_at": row.failed_at.isoformat()} for row in rows]
