"""The PostgreSQL ledger against a real server: migrations, states, idempotent commits."""

from __future__ import annotations

import threading
from typing import Any

import psycopg
import pytest

from stagerd.db import ledger as db
from stagerd.retry import RetryPolicy

FAST = RetryPolicy(attempts=3, base=0.01, max_delay=0.05, total=5, classify=db.is_db_transient)


@pytest.fixture
def ledger(database_url: str) -> Any:
    db.migrate(database_url)
    ledger = db.Ledger(database_url, policy=FAST)
    yield ledger
    ledger.close()


def _tables(database_url: str) -> set[str]:
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()"
        ).fetchall()
    return {r[0] for r in rows}


def test_migrate_is_idempotent_and_versioned(database_url: str) -> None:
    versions = [m.version for m in db.load_migrations()]
    assert versions[:2] == [1, 2]
    assert [m.version for m in db.pending_migrations(database_url)] == versions
    assert db.migrate(database_url) == versions
    assert db.migrate(database_url) == []
    assert db.pending_migrations(database_url) == []
    assert {"stagerd_batches", "stagerd_results", "stagerd_schema_migrations"} <= _tables(
        database_url
    )
    with psycopg.connect(database_url) as conn:
        rows = conn.execute("SELECT version, name FROM stagerd_schema_migrations").fetchall()
    assert sorted(rows)[:2] == [(1, "initial"), (2, "leases")]


def test_concurrent_migrations_apply_once(database_url: str) -> None:
    errors: list[BaseException] = []
    applied: list[list[int]] = []

    def run() -> None:
        try:
            applied.append(db.migrate(database_url))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert sorted(applied) == [[], [], [], [m.version for m in db.load_migrations()]]


def test_lifecycle_and_idempotent_commit(ledger: db.Ledger) -> None:
    assert ledger.begin("b1", "archives/b1.tar", worker="w1", sha256=None)
    row = ledger.batch("b1")
    assert row is not None and row.state == "staging" and row.attempts == 1 and row.worker == "w1"
    ledger.mark_processing(
        "b1", archive_bytes=10, extracted_bytes=8, file_count=2, sha256="ab" * 32, stage_seconds=0.5
    )
    assert ledger.batch("b1").state == "processing"  # type: ignore[union-attr]
    results = [("a.wav", {"duration": 1.5}), ("b.wav", {"duration": 2})]
    assert ledger.commit_results("b1", results, process_seconds=1.0) is True
    # A redelivery: nothing written twice, the done state kept.
    assert ledger.commit_results("b1", [*results, ("c.wav", {})], process_seconds=9.0) is False
    assert ledger.results("b1") == [("a.wav", {"duration": 1.5}), ("b.wav", {"duration": 2})]
    row = ledger.batch("b1")
    assert row is not None
    assert (row.state, row.process_seconds, row.file_count) == ("done", 1.0, 2)
    assert row.commit_seconds is not None and row.finished_at is not None
    assert ledger.is_done("b1")
    # begin on a done batch reports it and changes nothing.
    assert ledger.begin("b1", "archives/b1.tar", worker="w2", sha256=None) is False
    assert ledger.batch("b1").worker == "w1"  # type: ignore[union-attr]


def test_partial_results_of_a_crashed_commit_are_not_duplicated(ledger: db.Ledger) -> None:
    ledger.begin("b2", "archives/b2.tar", worker="w", sha256=None)
    assert ledger.commit_results("b2", [("x", {"n": 1}), ("x", {"n": 2})]) is True
    assert ledger.results("b2") == [("x", {"n": 1})]


def test_failures_history_and_states(ledger: db.Ledger) -> None:
    ledger.begin("b3", "archives/b3.tar", worker="w", sha256=None)
    ledger.record_failure(
        "b3", "processor exited 1", outcome="requeued", attempt=1, phase="process"
    )
    assert ledger.batch("b3").state == "failed"  # type: ignore[union-attr]
    ledger.begin("b3", "archives/b3.tar", worker="w", sha256=None)
    assert ledger.batch("b3").attempts == 2  # type: ignore[union-attr]
    ledger.record_failure("b3", "processor exited 1", outcome="dead", attempt=2, phase="process")
    row = ledger.batch("b3")
    assert row is not None and row.state == "dead" and row.error == "processor exited 1"
    ledger.record_failure(None, "payload is not JSON", outcome="dead", phase="validate")
    failures = ledger.recent_failures(10)
    assert [(f.batch_id, f.outcome) for f in failures] == [
        (None, "dead"),
        ("b3", "dead"),
        ("b3", "requeued"),
    ]
    assert ledger.count_by_state() == {"dead": 1}
    as_json = db.recent_failures(ledger._url, 2)
    assert [f["outcome"] for f in as_json] == ["dead", "dead"]
    assert as_json[1]["batch_id"] == "b3" and isinstance(as_json[1]["failed_at"], str)


def test_recent_failures_before_migrate_is_empty(database_url: str) -> None:
    assert db.recent_failures(database_url) == []


def test_requeue_stale_batches(ledger: db.Ledger, database_url: str) -> None:
    ledger.begin("s1", "archives/s1.tar", worker="dead-1", sha256=None)
    ledger.begin("s2", "archives/s2.tar", worker="alive", sha256=None)
    ledger.begin("s3", "archives/s3.tar", worker="dead-1", sha256=None)
    ledger.commit_results("s3", [])
    assert db.requeue_stale_batches(database_url, ["dead-1", "dead-2"]) == ["s1"]
    assert db.requeue_stale_batches(database_url, []) == []
    assert ledger.batch("s1").state == "requeued"  # type: ignore[union-attr]
    assert ledger.batch("s2").state == "staging"  # type: ignore[union-attr]
    assert ledger.batch("s3").state == "done"  # type: ignore[union-attr]


def test_stale_batches_that_recovery_dead_lettered_are_marked_dead(
    ledger: db.Ledger, database_url: str
) -> None:
    ledger.begin("d1", "archives/d1.tar", worker="gone", sha256=None)
    ledger.begin("d2", "archives/d2.tar", worker="gone", sha256=None)
    assert db.requeue_stale_batches(database_url, ["gone"], ["d2"]) == ["d1"]
    assert ledger.batch("d1").state == "requeued"  # type: ignore[union-attr]
    assert ledger.batch("d2").state == "dead"  # type: ignore[union-attr]


def test_reconnects_after_the_connection_is_killed(ledger: db.Ledger, database_url: str) -> None:
    ledger.begin("r1", "archives/r1.tar", worker="w", sha256=None)
    with psycopg.connect(database_url) as admin:
        admin.autocommit = True
        pid = ledger._conn.info.backend_pid  # type: ignore[union-attr]
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    assert ledger.commit_results("r1", [("i", {"ok": True})]) is True
    assert ledger.results("r1") == [("i", {"ok": True})]


def test_unreachable_database_is_service_unavailable() -> None:
    from stagerd.errors import ServiceUnavailable

    ledger = db.Ledger("postgresql://postgres@127.0.0.1:1/postgres", policy=FAST)
    with pytest.raises(ServiceUnavailable) as info:
        ledger.is_done("x")
    assert "PostgreSQL" in str(info.value)


def _env(database_url: str, tmp_path: Any) -> dict[str, str]:
    empty = tmp_path / "empty.env"
    empty.write_text("")
    return {"DATABASE_URL": database_url, "STAGERD_ENV_FILE": str(empty)}


def test_cli_migrate_and_results(run_cli: Any, database_url: str, tmp_path: Any) -> None:
    import json

    env = _env(database_url, tmp_path)
    first = run_cli(["db", "migrate"], env=env)
    assert first.returncode == 0, first.stderr
    expected = ", ".join(f"{m.version:04d}" for m in db.load_migrations())
    assert first.stdout.strip() == f"applied migrations: {expected}"
    again = run_cli(["db", "migrate"], env=env)
    assert again.returncode == 0 and again.stdout.strip() == "schema up to date"

    ledger = db.Ledger(database_url, policy=FAST)
    ledger.begin("demo-1", "archives/demo-1.tar", worker="w", sha256=None)
    ledger.commit_results("demo-1", [("a.wav", {"seconds": 1.0})], process_seconds=0.1)
    ledger.close()
    shown = run_cli(["db", "results", "demo-1"], env=env)
    assert shown.returncode == 0, shown.stderr
    data = json.loads(shown.stdout)
    assert data["state"] == "done" and data["batch_id"] == "demo-1"
    assert data["results"] == [{"item": "a.wav", "result": {"seconds": 1.0}}]

    missing = run_cli(["db", "results", "nope"], env=env)
    assert missing.returncode == 1
    assert missing.stderr.strip() == "stagerd: error: batch 'nope' is not in the ledger"
    bad = run_cli(["db", "results", "../x"], env=env)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


def test_cli_without_database_url_exits_2(run_cli: Any, tmp_path: Any) -> None:
    empty = tmp_path / "empty.env"
    empty.write_text("")
    result = run_cli(["db", "migrate"], env={"STAGERD_ENV_FILE": str(empty)})
    assert result.returncode == 2
    assert "DATABASE_URL" in result.stderr and "Traceback" not in result.stderr


def test_cli_unreachable_database_is_one_line(run_cli: Any, tmp_path: Any) -> None:
    env = _env("postgresql://postgres:hunter22@127.0.0.1:1/postgres", tmp_path)
    result = run_cli(["db", "results", "x"], env=env, timeout=60)
    assert result.returncode == 1
    assert "hunter22" not in result.stderr + result.stdout
    assert "Traceback" not in result.stderr
