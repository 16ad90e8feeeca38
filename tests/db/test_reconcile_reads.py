"""The ledger's reads for reconcile (stagerd.db.reconcile) against a real PostgreSQL."""

from __future__ import annotations

import psycopg
import pytest

from stagerd.db import ledger as db
from stagerd.db.errors import db_errors
from stagerd.db.reconcile import batch_states, max_lease


def test_batch_states_and_max_lease(database_url: str) -> None:
    db.migrate(database_url)
    assert batch_states(database_url, []) == {}
    assert max_lease(database_url) == 0
    ledger = db.Ledger(database_url)
    try:
        ledger.begin("s1", "archives/s1.tar", worker="w", sha256=None, lease=7)
        ledger.begin("s2", "archives/s2.tar", worker="w", sha256=None, lease=3)
        ledger.commit_results("s2", [])
        assert ledger.max_lease() == 7
    finally:
        ledger.close()
    assert batch_states(database_url, ["s1", "s2", "absent"]) == {"s1": "staging", "s2": "done"}
    assert max_lease(database_url) == 7


def test_an_unmigrated_ledger_raises_psycopgs_own_error(database_url: str) -> None:
    # Untranslated on purpose: reconcile names it "ledger: ... (did `stagerd db migrate` run?)".
    with pytest.raises(psycopg.errors.UndefinedTable):
        max_lease(database_url)
    with pytest.raises(db_errors()):
        batch_states(database_url, ["x"])


def test_db_errors_is_psycopgs_tree_and_oserror_plus_extras() -> None:
    assert db_errors() == (psycopg.Error, OSError)
    assert db_errors(ValueError) == (psycopg.Error, OSError, ValueError)
