"""Hostile configuration through the real CLI (issue 16): malformed connection URLs,
env files that are not regular files or are huge, and the systemd ``EnvironmentFile=``
syntax. Every case: exit 2, one line naming the variable or the file, no traceback, and
no secret on stderr."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from stagerd.config.envfile import parse_env_text

SECRET = "s3cr3t-Passw0rd"


def _one_line_error(result: Any, must_name: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("stagerd: error: ") and must_name in lines[0], lines[0]
    assert "Traceback" not in result.stderr
    assert SECRET not in result.stderr + result.stdout
    assert SECRET.replace("-", " ") not in result.stderr + result.stdout


def _empty_env_file(tmp_path: Path) -> dict[str, str]:
    env_file = tmp_path / "empty.env"
    env_file.write_text("")
    return {"STAGERD_ENV_FILE": str(env_file)}


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("DATABASE_URL", f"postgresql://stagerd:{SECRET.replace('-', ' ')}@127.0.0.1/stagerd"),
        ("DATABASE_URL", f"host=127.0.0.1 password={SECRET.replace('-', ' ')} dbname=x"),
        ("DATABASE_URL", f"postgresql://stagerd:{SECRET}@127.0.0.1:99999/stagerd"),
        ("DATABASE_URL", f"postgresql://stagerd:{SECRET}@127.0.0.1:54x32/stagerd"),
        ("REDIS_URL", f"redis://:{SECRET}@127.0.0.1:63x79/0"),
        ("REDIS_URL", f"redis://:{SECRET}@127.0.0.1:6379/0?socket_timeout=soon"),
        ("REDIS_URL", f"redis://:{SECRET}@127.0.0.1:6379/zero"),
    ],
)
@pytest.mark.parametrize("command", [["gpu", "--burst"], ["status"], ["config"]])
def test_malformed_connection_urls_are_one_line_config_errors(
    run_cli: Any, tmp_path: Path, variable: str, value: str, command: list[str]
) -> None:
    env = {**_empty_env_file(tmp_path), variable: value}
    result = run_cli(["--log-json", *command], env=env, timeout=60)
    _one_line_error(result, variable)


def test_env_file_that_is_a_fifo_is_refused_without_hanging(run_cli: Any, tmp_path: Path) -> None:
    fifo = tmp_path / "stagerd.env"
    os.mkfifo(fifo)
    result = run_cli(["--env-file", str(fifo), "config"], timeout=60)
    _one_line_error(result, "not a regular file")


@pytest.mark.parametrize("path", ["/dev/zero", "/dev/null"])
def test_env_file_that_is_a_device_is_refused(run_cli: Any, path: str) -> None:
    result = run_cli(["--env-file", path, "config"], timeout=60)
    _one_line_error(result, "not a regular file")


def test_env_file_over_the_size_cap_is_refused(run_cli: Any, tmp_path: Path) -> None:
    big = tmp_path / "big.env"
    big.write_text("# padding\n" * 200_000)
    result = run_cli(["--env-file", str(big), "config"], timeout=60)
    _one_line_error(result, "larger than")


def test_env_file_with_a_nul_or_export_is_refused(run_cli: Any, tmp_path: Path) -> None:
    nul = tmp_path / "nul.env"
    nul.write_bytes(b"S3_BUCKET=a\x00b\n")
    _one_line_error(run_cli(["--env-file", str(nul), "config"], timeout=60), "NUL")
    export = tmp_path / "export.env"
    export.write_text("STAGERD_QUEUE=q\nexport S3_BUCKET=b\n")
    _one_line_error(run_cli(["--env-file", str(export), "config"], timeout=60), "line 2")


# What systemd.exec(5) says EnvironmentFile= makes of each line (v254+).
SYSTEMD_CASES = [
    ("A=1", "1"),
    ("A = 1 ", "1"),
    ("A=  hello world  ", "hello world"),
    ('A="quoted value"', "quoted value"),
    ('A=" spaced "', " spaced "),
    ("A='single \"kept\" $HOME'", 'single "kept" $HOME'),
    ('A=foo"bar"', 'foo"bar"'),  # quotes after the first character are kept
    ("A=it's", "it's"),
    ("A=\"a\" 'b' c", "abc"),  # pieces are joined, whitespace between them dropped
    ('A="x\\"y\\\\z\\n"', 'x"y\\z\\n'),  # \" and \\ unescaped, \n kept as two characters
    ("A=a\\\nb", "ab"),  # backslash-newline continues an unquoted value
    ("A=x\\ ", "x "),  # an escaped trailing space is kept
    ("A='multi\nline'", "multi\nline"),
    ("A=", ""),
    ("A=1\r\n", "1"),
    ("# comment \\\nA=2", "2"),  # v254: a comment ending in a backslash does not continue
    ("; comment\nA=3", "3"),
    ("A=1\nA=2", "2"),  # the last assignment wins
]


@pytest.mark.parametrize(("text", "expected"), SYSTEMD_CASES)
def test_env_file_parses_as_systemd_environmentfile(text: str, expected: str) -> None:
    assert parse_env_text(text) == {"A": expected}


def test_env_file_quotes_reach_the_settings_as_systemd_reads_them(
    run_cli: Any, tmp_path: Path
) -> None:
    env_file = tmp_path / "stagerd.env"
    env_file.write_text(
        "STAGERD_QUEUE=\"queue:with spaces\"  \nS3_BUCKET=bucket'quote'\n"
        "STAGERD_WORKER_ID='gpu-1' # not a comment: joined\n"
    )
    result = run_cli(["--env-file", str(env_file), "config", "--json"], timeout=60)
    assert result.returncode == 0, result.stderr
    values = json.loads(result.stdout)
    assert values["STAGERD_QUEUE"] == "queue:with spaces"
    assert values["S3_BUCKET"] == "bucket'quote'"
    assert values["STAGERD_WORKER_ID"] == "gpu-1# not a comment: joined"
