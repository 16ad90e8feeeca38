from __future__ import annotations

from pathlib import Path

import pytest

from stagerd.config.settings import GiB, Settings, read_env_file, redact_url
from stagerd.errors import ConfigError

FULL = {
    "S3_ENDPOINT": "http://127.0.0.1:8333",
    "S3_ACCESS_KEY": "AKIAEXAMPLEKEY",
    "S3_SECRET_KEY": "very-secret-value",
    "S3_BUCKET": "audio-archives",
}


def test_defaults_match_the_contract() -> None:
    s = Settings.from_env(environ={}, env_file=None)
    assert s.scratch_dir == Path("/data/scratch")
    assert s.scratch_budget == 40 * GiB and s.scratch_headroom == 2 * GiB
    assert s.queue == "queue:unpack" and s.max_parts == 1000 and s.max_attempts == 3
    assert s.redis_url == "redis://127.0.0.1:6379/0"
    from stagerd.s3.fetch import DEFAULT_RANGE_SIZE

    assert s.range_size == DEFAULT_RANGE_SIZE  # one default, whichever way staging is called


def test_human_units_and_overrides() -> None:
    s = Settings.from_env(
        environ={
            **FULL,
            "STAGERD_SCRATCH_BUDGET": "10GiB",
            "STAGERD_PROCESS_TIMEOUT": "15m",
            "STAGERD_PART_SIZE": "8MiB",
            "STAGERD_RANGE_SIZE": "32MiB",
        }
    )
    assert (
        s.scratch_budget == 10 * GiB and s.process_timeout == 900.0 and s.part_size == 8 * 1024**2
    )
    assert s.range_size == 32 * 1024**2
    s3 = s.require_s3()
    assert s3.bucket == "audio-archives" and s3.checksum_mode == "when_required"


def test_missing_s3_names_the_variables() -> None:
    env = {k: v for k, v in FULL.items() if k != "S3_BUCKET"}
    with pytest.raises(ConfigError, match="S3_BUCKET") as info:
        Settings.from_env(environ=env).require_s3()
    assert "very-secret-value" not in str(info.value)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("STAGERD_SCRATCH_BUDGET", "lots"),
        ("STAGERD_MAX_PARTS", "0"),
        ("STAGERD_MAX_PARTS", "10001"),
        ("STAGERD_PART_SIZE", "1MiB"),
        ("STAGERD_RANGE_SIZE", "64KiB"),
        ("STAGERD_RANGE_SIZE", "6GiB"),
        ("STAGERD_CONCURRENCY", "many"),
        ("S3_ENDPOINT", "swift.example.edu"),
        ("REDIS_URL", "localhost:6379"),
        ("STAGERD_PROCESS_TIMEOUT", "forever"),
        ("STAGERD_S3_CHECKSUM", "always"),
    ],
)
def test_malformed_values_name_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        Settings.from_env(environ={name: value})


def test_malformed_secret_is_not_echoed() -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env(environ={"DATABASE_URL": "hunter2-password-only"})
    assert "DATABASE_URL" in str(info.value)
    assert "hunter2" not in str(info.value)


def test_env_file_is_read_and_environment_wins(tmp_path: Path) -> None:
    env_file = tmp_path / "stagerd.env"
    env_file.write_text(
        "# managed by ansible\nS3_BUCKET=from-file\nS3_ENDPOINT='http://file:8080'\n\nSTAGERD_QUEUE=\"q:file\"\n"
    )
    s = Settings.from_env(environ={"S3_BUCKET": "from-env"}, env_file=env_file)
    assert s.s3_bucket == "from-env"
    assert s.s3_endpoint == "http://file:8080"
    assert s.queue == "q:file"
    assert s.env_file == env_file
    via_var = Settings.from_env(environ={"STAGERD_ENV_FILE": str(env_file)})
    assert via_var.s3_bucket == "from-file"


def test_env_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        Settings.from_env(environ={}, env_file=tmp_path / "missing.env")
    bad = tmp_path / "bad.env"
    bad.write_text("S3_BUCKET=ok\nthis line is wrong\n")
    with pytest.raises(ConfigError, match="line 2"):
        read_env_file(bad)


def test_redaction_hides_every_secret() -> None:
    s = Settings.from_env(
        environ={
            **FULL,
            "REDIS_URL": "redis://:redispw@10.0.0.1:6379/0",
            "DATABASE_URL": "postgresql://stagerd:dbpw@db:5432/results?password=dbpw2",
        }
    )
    text = repr(s) + repr(s.require_s3()) + str(s.redacted())
    for secret in ("AKIAEXAMPLEKEY", "very-secret-value", "redispw", "dbpw"):
        assert secret not in text
    assert s.redacted()["DATABASE_URL"] == "postgresql://stagerd:***@db:5432/results?password=***"
    assert redact_url("host=db user=x password=abc") == "host=db user=x password=***"
