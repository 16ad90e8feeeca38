"""S3 refusals say what the server said and which setting to change (issue 16), through
the real CLI: a server allowing fewer parts than STAGERD_MAX_PARTS (SeaweedFS behind a
proxy answering part numbers over 2 as Swift does) and ``stagerd doctor``'s probe."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from stagerd.s3.hints import hint, part_limit
from tests.faultproxy import FaultProxy, Head
from tests.transfer_helpers import write_tar

MiB = 1024 * 1024


def _part_over(limit: int) -> Any:
    def match(head: Head) -> bool:
        query = parse_qs(urlsplit(head.target).query)
        return head.method == "PUT" and int(query.get("partNumber", ["0"])[0]) > limit

    return match


def test_part_number_refusal_quotes_the_server_and_names_the_setting(
    run_cli: Any, stagerd_env: dict[str, str], tmp_path: Path
) -> None:
    path = write_tar(tmp_path / "b.tar", 20 * MiB)  # 5 MiB parts: 4-5 parts
    with FaultProxy(stagerd_env["S3_ENDPOINT"]) as proxy:
        proxy.fail_first(100, "part_limit", _part_over(2))
        env = {**stagerd_env, "S3_ENDPOINT": proxy.endpoint}
        args = ["transfer", "upload", str(path), "--batch-id", "p1", "--part-size", "5MiB",
                "--progress", "none"]  # fmt: skip
        result = run_cli(args, env=env, timeout=180)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert "InvalidArgument (HTTP 400)" in line
    assert '"Part number must be an integer between 1 and 2, inclusive"' in line
    assert "STAGERD_MAX_PARTS=2" in line


def test_doctor_finds_the_servers_part_limit(run_cli: Any, stagerd_env: dict[str, str]) -> None:
    with FaultProxy(stagerd_env["S3_ENDPOINT"]) as proxy:
        proxy.fail_first(100, "part_limit", _part_over(2))
        env = {**stagerd_env, "S3_ENDPOINT": proxy.endpoint, "STAGERD_MAX_PARTS": "1000"}
        result = run_cli(["doctor", "--role", "transfer", "--json"], env=env, timeout=180)
    assert result.returncode == 1, result.stdout + result.stderr
    checks = {c["name"]: c for c in json.loads(result.stdout)["checks"]}
    parts = checks["s3.parts"]
    assert not parts["ok"] and "part number 1000 refused" in parts["detail"], parts
    assert "STAGERD_MAX_PARTS=2" in json.dumps(parts)
    assert checks["s3.multipart"]["ok"]  # part 1 is fine: only the limit is reported


def test_doctor_passes_when_the_server_takes_max_parts(
    run_cli: Any, stagerd_env: dict[str, str]
) -> None:
    result = run_cli(["doctor", "--role", "transfer", "--json"], env=stagerd_env, timeout=180)
    checks = {c["name"]: c for c in json.loads(result.stdout)["checks"]}
    assert checks["s3.parts"]["ok"], checks["s3.parts"]


@pytest.mark.parametrize(
    ("message", "limit"),
    [
        ("Part number must be an integer between 1 and 1000, inclusive", 1000),
        ("Part number must be an integer between 1 and 10000, inclusive", 10000),
        ("partNumber must be less than or equal to 500", 500),
        ("Argument partNumber must be an integer between 1 and 10000", 10000),
        ("Your proposed upload is smaller than the minimum allowed size", None),
        (None, None),
    ],
)
def test_part_limit_is_read_from_the_servers_words(message: str | None, limit: int | None) -> None:
    assert part_limit(message) == limit


def test_hints_name_the_setting() -> None:
    assert "STAGERD_PART_SIZE" in (hint("EntityTooSmall", "too small") or "")
    assert "STAGERD_S3_CHECKSUM" in (hint("InvalidRequest", "bad x-amz-content-sha256") or "")
    assert hint("NoSuchKey", "The specified key does not exist.") is None
