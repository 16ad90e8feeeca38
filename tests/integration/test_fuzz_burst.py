"""The done-when of issue 16: one ``stagerd gpu --burst`` fed fuzzed payloads and fuzzed
archives mixed with good batches exits 0, prints no ``internal error``, processes every
good batch, and ends every bad one on its first attempt with a reason that is not
"attempt N exceeds".

The full run (1,000 payloads, 200 archives, 20 good) is ``slow``; a scaled-down run of
the same code is in the default suite. Inputs come from a seeded generator over the
hostile corpus, so a failure reproduces exactly.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path
from typing import Any

import pytest

from stagerd.db import ledger as db
from stagerd.errors import InvalidJob
from stagerd.job import Job
from stagerd.queue.keys import QueueKeys
from tests.corpus import good_tar, hostile_archives, hostile_payloads
from tests.worker_support import WAVINFO, dead_letters, make_tar, scratch_leftovers

SEED = 16
EXCEEDS = re.compile(r"attempt \d+ exceeds")


def _mutate(rng: random.Random, data: bytes, max_edits: int = 4) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, max_edits)):
        if not out:
            break
        at = rng.randrange(len(out))
        action = rng.choice(("byte", "digit", "cut", "repeat", "truncate"))
        if action == "byte":
            out[at] = rng.randrange(256)
        elif action == "digit":
            out[at : at + 1] = rng.choice((b"9", b" ", b"\x00", "٣".encode(), b"{", b"["))
        elif action == "cut":
            del out[at : at + rng.randint(1, 600)]
        elif action == "repeat":
            out[at:at] = out[at : at + rng.randint(1, 600)]
        else:
            del out[at:]
    return bytes(out)


def fuzzed_payloads(rng: random.Random, count: int) -> list[bytes]:
    """Bad payloads: invalid, or valid but naming a batch whose archive does not exist
    (``p-*`` ids only, so none collides with a real batch)."""
    seeds = [case.data for case in hostile_payloads()]
    seeds += [Job.new(f"p-{i:04d}", size=10).to_json().encode() for i in range(20)]
    out: list[bytes] = []
    while len(out) < count:
        raw = _mutate(rng, rng.choice(seeds))
        try:
            job = Job.from_json(raw)
        except InvalidJob:
            out.append(raw)
            continue
        if job.batch_id.startswith("p-"):
            out.append(raw)
    return out


def fuzzed_archives(rng: random.Random, count: int) -> list[bytes]:
    seeds = [good_tar(1), good_tar(3), make_tar(files=2), *(c.data for c in hostile_archives())]
    return [_mutate(rng, rng.choice(seeds)) for _ in range(count)]


def _burst(
    run_cli: Any, env: dict[str, str], s3: Any, bucket: str, redis: Any, queue: str,
    payloads: int, archives: int, good: int,
) -> tuple[Any, list[str], list[str]]:  # fmt: skip
    rng = random.Random(SEED)
    bad_payloads = fuzzed_payloads(rng, payloads)
    bad_archives = fuzzed_archives(rng, archives)
    archive_ids = [f"a-{i:04d}" for i in range(archives)]
    good_ids = [f"good-{i:03d}" for i in range(good)]
    jobs: list[bytes] = list(bad_payloads)
    for batch_id, body in zip(archive_ids, bad_archives, strict=True):
        jobs.append(_put(s3, bucket, batch_id, body))
    for batch_id in good_ids:
        jobs.append(_put(s3, bucket, batch_id, make_tar(files=2)))
    rng.shuffle(jobs)
    for start in range(0, len(jobs), 500):
        redis.rpush(queue, *jobs[start : start + 500])
    result = run_cli(["--log-json", "gpu", "--burst"], env=env, timeout=3600)
    return result, archive_ids, good_ids


def _put(s3: Any, bucket: str, batch_id: str, body: bytes) -> bytes:
    s3.put_object(Bucket=bucket, Key=f"archives/{batch_id}.tar", Body=body)
    job = Job.new(batch_id, size=len(body), sha256=hashlib.sha256(body).hexdigest())
    return job.to_json().encode()


@pytest.mark.parametrize(
    ("payloads", "archives", "good"),
    [
        pytest.param(100, 20, 4, id="scaled"),
        pytest.param(1000, 200, 20, id="full", marks=pytest.mark.slow),
    ],
)
def test_one_burst_ends_every_bad_batch_on_its_first_attempt(
    run_cli: Any, stagerd_env: dict[str, str], s3_client: Any, s3_bucket: str,
    redis_client: Any, queue_name: str, database_url: str, scratch_dir: Path,
    payloads: int, archives: int, good: int,
) -> None:  # fmt: skip
    env = {**stagerd_env, "STAGERD_PROCESSOR": WAVINFO}
    result, archive_ids, good_ids = _burst(
        run_cli, env, s3_client, s3_bucket, redis_client, queue_name, payloads, archives, good
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "internal error" not in result.stderr and "Traceback" not in result.stderr

    keys = QueueKeys(queue_name)
    assert redis_client.llen(keys.pending) == 0
    assert redis_client.llen(keys.processing(stagerd_env["STAGERD_WORKER_ID"])) == 0
    ledger = db.Ledger(database_url)
    try:
        states = {b: getattr(ledger.batch(b), "state", None) for b in archive_ids + good_ids}
        failures = ledger.recent_failures(100_000)
    finally:
        ledger.close()
    assert all(states[b] == "done" for b in good_ids), {b: states[b] for b in good_ids}

    dead = dead_letters(redis_client, queue_name)
    for entry in dead:
        assert entry["attempts"] <= 1, entry
        assert not EXCEEDS.search(entry["error"]), entry
        assert "\n" not in entry["error"], entry
    assert not [f for f in failures if f.outcome != "dead"], "a bad batch was retried"
    dead_archives = {e["batch_id"] for e in dead if e["batch_id"] in set(archive_ids)}
    done_archives = {b for b in archive_ids if states[b] == "done"}
    # Every fuzzed archive ended once: dead on attempt 1, or (mutation left it valid) done.
    assert dead_archives | done_archives == set(archive_ids)
    assert not dead_archives & done_archives
    assert len(dead) == payloads + len(dead_archives)
    assert scratch_leftovers(scratch_dir) == []
    print(  # the measured mix, for the report (pytest -s)
        json.dumps({"payloads": payloads, "archives": archives, "good": good,
                    "archives_dead": len(dead_archives), "archives_done": len(done_archives)})
    )  # fmt: skip
