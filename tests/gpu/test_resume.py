"""stagerd.gpu.resume: whose processed results a worker may commit (pure logic)."""

from __future__ import annotations

import pytest

from stagerd.gpu.resume import ProcessedMarker

DIGEST = "a" * 64


def marker(worker: str = "w1", sha256: str = DIGEST) -> ProcessedMarker:
    return ProcessedMarker("b1", worker, sha256, 1.0, 10, 20, 2, 0.5)


@pytest.mark.parametrize(
    ("worker", "job_sha", "expected"),
    [
        ("w1", DIGEST, True),  # our restart, same archive
        ("w1", None, True),  # our restart, the seed's payload (no digest): as before
        ("w2", DIGEST, True),  # a dead worker's results, proven the same archive
        ("w2", None, False),  # a dead worker's results, unprovable: process again
        ("w1", "b" * 64, False),  # another archive under this id (--force): never
        ("w2", "b" * 64, False),
    ],
)
def test_whose_results_are_committed(worker: str, job_sha: str | None, expected: bool) -> None:
    assert marker().matches("b1", worker, job_sha) is expected


def test_another_batch_is_never_matched() -> None:
    assert not marker().matches("b2", "w1", DIGEST)
