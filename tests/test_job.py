from __future__ import annotations

import json

import pytest

from stagerd.errors import InvalidJob
from stagerd.job import Job


def test_seed_minimal_payload_round_trips() -> None:
    seed = {
        "batch_id": "b-1",
        "s3_key": "archives/b-1.tar",
        "file_count": None,
        "transferred_at": "2026-11-29T10:00:00",
    }
    job = Job.from_json(json.dumps(seed))
    assert job.batch_id == "b-1" and job.file_count is None and job.sha256 is None
    assert json.loads(job.to_json()) == seed


def test_new_job_has_seed_fields_and_extras_survive() -> None:
    job = Job.new("b-2", file_count=3, size=10, sha256="A" * 64)
    data = json.loads(job.to_json())
    assert data["s3_key"] == "archives/b-2.tar"
    assert data["transferred_at"].endswith("+00:00")
    assert data["sha256"] == "a" * 64
    extra = Job.from_json(json.dumps({**data, "priority": 5}))
    assert json.loads(extra.to_json())["priority"] == 5


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("not json", "not JSON"),
        ("[1, 2]", "JSON object"),
        ('{"s3_key": "archives/a.tar"}', "batch_id"),
        ('{"batch_id": "a"}', "s3_key"),
        ('{"batch_id": "../x", "s3_key": "archives/../x.tar"}', "'..'"),
        ('{"batch_id": "a", "s3_key": "archives/b.tar"}', "does not match"),
        ('{"batch_id": "a", "s3_key": "archives/a.tar", "file_count": "3"}', "file_count"),
        ('{"batch_id": "a", "s3_key": "archives/a.tar", "file_count": true}', "file_count"),
        ('{"batch_id": "a", "s3_key": "archives/a.tar", "size": -1}', "size"),
        ('{"batch_id": "a", "s3_key": "archives/a.tar", "sha256": "zz"}', "sha256"),
        ("x" * 70000, "bytes"),
        (b"\xff\xfe", "not JSON"),
    ],
)
def test_bad_payloads_are_refused_with_reason(raw: str | bytes, reason: str) -> None:
    with pytest.raises(InvalidJob, match=reason):
        Job.from_json(raw)
