"""Results PostgreSQL cannot hold, through the real worker loop and real PostgreSQL: each
ends its batch on the first attempt with a clear reason, and the worker carries on."""

from __future__ import annotations

import io
import json
import secrets
import tarfile
import threading
from pathlib import Path
from typing import Any

import pytest

from stagerd.db import ledger as db
from stagerd.errors import ResultsRejected
from stagerd.gpu.worker import WorkerOptions, run
from stagerd.retry import RetryPolicy
from tests.worker_support import WAVINFO, dead_letters, make_tar, put_batch, scratch_leftovers, wav

FAST_STAGE = RetryPolicy(attempts=2, base=0.01, max_delay=0.05, total=5)
GOOD = '{"item": "fine.wav", "n": 1}\n{"stagerd": "end", "count": 1}\n'


@pytest.fixture
def ledger(database_url: str) -> Any:
    db.migrate(database_url)
    ledger = db.Ledger(database_url)
    yield ledger
    ledger.close()


def run_burst(settings: Any, processor: str, timeout: float = 60) -> None:
    opts = WorkerOptions(
        burst=True, processor=processor, stage_policy=FAST_STAGE, tick=0.1, reserve_timeout=5.0
    )
    stop = threading.Event()
    errors: list[BaseException] = []

    def target() -> None:
        try:
            run(settings, opts, stop)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        stop.set()
        thread.join(30)
        pytest.fail(f"worker did not finish within {timeout}s")
    assert not errors, errors


CASES = {
    "nul-in-item": ('{"item": "a\\u0000b"}\n', "NUL character"),
    "nul-in-value": ('{"item": "a", "text": "x\\u0000y"}\n', "NUL character"),
    "nul-in-key": ('{"item": "a", "k\\u0000": 1}\n', "NUL character"),
    "nan": ('{"item": "a", "score": NaN}\n', "NaN is not valid JSON"),
    "infinity": ('{"item": "a", "score": -Infinity}\n', "-Infinity is not valid JSON"),
    "lone-surrogate": ('{"item": "a", "text": "\\ud800"}\n', "lone UTF-16 surrogate"),
    "over-long-item": (json.dumps({"item": "x" * 3000}) + "\n", "longer than 2048 bytes"),
    "raw-nul-byte": ('{"item": "a", "text": "x\x00y"}\n', "not JSON"),
    "not-utf8": (b'{"item": "a", "text": "\xff"}\n'.decode("latin-1"), "not UTF-8"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_results_postgres_cannot_hold_end_the_batch_at_once(
    case: str,
    settings: Any,
    s3_client: Any,
    redis_client: Any,
    s3_bucket: str,
    queue_name: str,
    ledger: db.Ledger,
    scratch_dir: Path,
    tmp_path: Path,
) -> None:
    line, why = CASES[case]
    lines = tmp_path / "lines"
    lines.mkdir()
    (lines / "bad.jsonl").write_bytes(line.encode("latin-1" if case == "not-utf8" else "utf-8"))
    (lines / "good.jsonl").write_text(GOOD)
    processor = f"sh -c 'cat {lines}/$STAGERD_BATCH_ID.jsonl > \"$STAGERD_RESULTS\"'"
    put_batch(s3_client, redis_client, s3_bucket, queue_name, "bad", make_tar(files=1))
    put_batch(s3_client, redis_client, s3_bucket, queue_name, "good", make_tar(files=1))
    run_burst(settings, processor)
    row = ledger.batch("bad")
    assert row is not None and row.state == "dead" and row.attempts == 1, row
    assert row.error is not None and why in row.error and "committing failed" in row.error
    assert ledger.results("bad") == []
    [dead] = dead_letters(redis_client, queue_name)
    assert dead["batch_id"] == "bad"
    assert ledger.batch("good").state == "done"  # type: ignore[union-attr]
    assert scratch_leftovers(scratch_dir) == []


def test_member_with_a_non_utf8_name_ends_the_batch_at_once(
    settings: Any,
    s3_client: Any,
    redis_client: Any,
    s3_bucket: str,
    queue_name: str,
    ledger: db.Ledger,
    scratch_dir: Path,
) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT, encoding="latin-1") as tar:
        data = wav(0.1)
        info = tarfile.TarInfo("clip-\xff.wav")  # the byte 0xff in the header
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    put_batch(s3_client, redis_client, s3_bucket, queue_name, "latin", buf.getvalue())
    put_batch(s3_client, redis_client, s3_bucket, queue_name, "after", make_tar(files=1))
    run_burst(settings, WAVINFO)
    row = ledger.batch("latin")
    assert row is not None and row.state == "dead" and row.attempts == 1, row
    assert row.error, row
    assert ledger.batch("after").state == "done"  # type: ignore[union-attr]
    assert scratch_leftovers(scratch_dir) == []


def test_postgres_refusals_are_permanent_not_service_outages(ledger: db.Ledger) -> None:
    """Bypassing our own validation: what PostgreSQL itself refuses fails at once (it used
    to be retried for ~2 minutes as ServiceUnavailable: ProgramLimitExceeded is filed under
    OperationalError)."""
    ledger.begin("pg", "archives/pg.tar", worker="w", sha256=None)
    too_long = secrets.token_hex(4000)  # incompressible: too large for a btree index row
    with pytest.raises(ResultsRejected, match="index row"):
        ledger.commit_results("pg", [(too_long, {"n": 1})])
    with pytest.raises(ResultsRejected, match="PostgreSQL refused"):
        ledger.commit_results("pg", [("a\x00b", {"n": 1})])
    with pytest.raises(ResultsRejected):
        ledger.commit_results("pg", [("\ud800", {"n": 1})])
    with pytest.raises(ResultsRejected, match="repeat an item"):
        ledger.commit_results("pg", [("x", {}), ("x", {})], unique=True)
    # The connection survived every refusal; the batch can still be committed.
    assert ledger.commit_results("pg", [("ok", {"n": 1})]) is True
    assert ledger.results("pg") == [("ok", {"n": 1})]
    ledger.record_failure("pg", "stderr with a NUL \x00 byte", outcome="failed")
