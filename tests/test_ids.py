from __future__ import annotations

import pytest

from stagerd.errors import InvalidBatchId
from stagerd.ids import archive_key, validate_batch_id


@pytest.mark.parametrize("batch_id", ["b1", "batch-2026-11-29_001", "A.B_C-d", "x" * 128])
def test_valid_ids(batch_id: str) -> None:
    assert validate_batch_id(batch_id) == batch_id
    assert archive_key(batch_id) == f"archives/{batch_id}.tar"


@pytest.mark.parametrize(
    "batch_id",
    [
        "",
        "..",
        "a/b",
        "../etc",
        "a..b",
        "-rf",
        ".hidden",
        "x" * 129,
        "a b",
        "a\x00b",
        "é",
        "a\nb",
        7,
        None,
    ],
)
def test_invalid_ids(batch_id: object) -> None:
    with pytest.raises(InvalidBatchId):
        validate_batch_id(batch_id)
