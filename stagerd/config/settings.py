"""Settings: one frozen dataclass built from the environment and an optional env file.

The seed's variables (``S3_ENDPOINT``, ``S3_ACCESS_KEY``, ``S3_SECRET_KEY``, ``S3_BUCKET``)
are kept verbatim; everything of our own is prefixed ``STAGERD_``. Values come from the
process environment, falling back to an env file (``--env-file``, ``$STAGERD_ENV_FILE`` or
``/etc/stagerd/stagerd.env`` when it exists): the file Ansible templates and systemd's
``EnvironmentFile=`` reads, so the CLI run by hand sees what the service sees.

Parsing is strict and early: a malformed value raises :class:`ConfigError` naming the
variable. Settings that only some commands need (S3, PostgreSQL) are checked by the
``require_*`` methods, so ``stagerd janitor`` on a host without S3 still runs.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from stagerd.config.dsn import database_url, redis_url, url_passwords
from stagerd.config.envfile import read_env_file
from stagerd.errors import ConfigError
from stagerd.units import parse_duration, parse_size

__all__ = ["REDACTED", "S3Settings", "Settings", "read_env_file", "redact_url", "url_passwords"]

DEFAULT_ENV_FILE = Path("/etc/stagerd/stagerd.env")
MiB = 1024**2
GiB = 1024**3
REDACTED = "***"

T = TypeVar("T")


@dataclass(frozen=True)
class S3Settings:
    """What an S3 client needs; only built when all four seed variables are present."""

    endpoint: str
    access_key: str = field(repr=False)
    secret_key: str = field(repr=False)
    bucket: str
    region: str = "us-east-1"
    ca_bundle: str | None = None
    checksum_mode: str = "when_required"
    retry_mode: str = "standard"
    max_attempts: int = 5
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    max_pool_connections: int = 10


@dataclass(frozen=True)
class Settings:
    """The effective configuration of one stagerd process."""

    s3_endpoint: str | None = None
    s3_access_key: str | None = field(default=None, repr=False)
    s3_secret_key: str | None = field(default=None, repr=False)
    s3_bucket: str | None = None
    s3_region: str = "us-east-1"
    s3_ca_bundle: str | None = None
    s3_checksum: str = "when_required"
    s3_retry_mode: str = "standard"
    # botocore's own attempts per request: kept small under stagerd's policy, which knows how
    # to resume (a range, a part) and backs off with a total cap (see stagerd.s3.store).
    s3_max_attempts: int = 2
    s3_connect_timeout: float = 10.0
    s3_read_timeout: float = 60.0
    redis_url: str = field(default="redis://127.0.0.1:6379/0", repr=False)
    database_url: str | None = field(default=None, repr=False)
    scratch_dir: Path = Path("/data/scratch")
    scratch_budget: int = 40 * GiB
    scratch_headroom: int = 2 * GiB
    queue: str = "queue:unpack"
    max_parts: int = 1000
    part_size: int = 64 * MiB
    # Staging's ranged GETs (stagerd.s3.fetch.DEFAULT_RANGE_SIZE says why this size).
    range_size: int = 256 * MiB
    concurrency: int = 8
    processor: str | None = None
    process_timeout: float = 4 * 3600.0
    max_attempts: int = 3
    max_members: int = 100_000
    max_results: int = 1_000_000
    max_result_bytes: int = 16 * MiB
    process_scratch_allowance: int = 1 * GiB
    metrics_file: Path | None = None
    heartbeat_ttl: float = 60.0
    # How long a worker keeps retrying the results commit (PostgreSQL unreachable) with
    # the results held on scratch, before it exits and leaves them for its restart.
    commit_retry: float = 3600.0
    worker_id: str = field(default_factory=socket.gethostname)
    env_file: Path | None = None

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        env_file: Path | None = None,
    ) -> Settings:
        """Build settings from *environ* (default ``os.environ``) and an env file.

        Raises ConfigError on a malformed value or an unreadable explicit env file.
        """
        env = dict(os.environ if environ is None else environ)
        file_path = _pick_env_file(env, env_file)
        merged = {**(read_env_file(file_path) if file_path else {}), **env}
        return _build(merged, file_path)

    def require_s3(self) -> S3Settings:
        """The S3 settings, or ConfigError naming every missing seed variable."""
        missing = [
            name
            for name, value in (
                ("S3_ENDPOINT", self.s3_endpoint),
                ("S3_ACCESS_KEY", self.s3_access_key),
                ("S3_SECRET_KEY", self.s3_secret_key),
                ("S3_BUCKET", self.s3_bucket),
            )
            if not value
        ]
        if missing:
            raise ConfigError(f"{', '.join(missing)}: not set (required for object storage)")
        assert self.s3_endpoint and self.s3_access_key and self.s3_secret_key and self.s3_bucket
        return S3Settings(
            endpoint=self.s3_endpoint,
            access_key=self.s3_access_key,
            secret_key=self.s3_secret_key,
            bucket=self.s3_bucket,
            region=self.s3_region,
            ca_bundle=self.s3_ca_bundle,
            checksum_mode=self.s3_checksum,
            retry_mode=self.s3_retry_mode,
            max_attempts=self.s3_max_attempts,
            connect_timeout=self.s3_connect_timeout,
            read_timeout=self.s3_read_timeout,
            # One connection per concurrent part plus a few for HEAD/list calls.
            max_pool_connections=max(10, self.concurrency + 4),
        )

    def require_database(self) -> str:
        """The PostgreSQL URL, or ConfigError if ``DATABASE_URL`` is unset."""
        if not self.database_url:
            raise ConfigError("DATABASE_URL: not set (required for the results database)")
        return self.database_url

    def replace(self, **changes: Any) -> Settings:
        """A copy with *changes* applied (command-line overrides)."""
        return dataclasses.replace(self, **changes)

    def redacted(self) -> dict[str, str | None]:
        """Every setting by its variable name, secrets masked, for ``stagerd config``."""
        out: dict[str, str | None] = {}
        for spec in _SPECS:
            value = getattr(self, spec.attr)
            if value is None:
                out[spec.env] = None
            elif spec.secret:
                out[spec.env] = REDACTED
            elif spec.url_secret:
                out[spec.env] = redact_url(str(value))
            else:
                out[spec.env] = str(value)
        out["STAGERD_ENV_FILE"] = str(self.env_file) if self.env_file else None
        return out


def redact_url(url: str) -> str:
    """Mask the password of a URL (``redis://:pw@h`` -> ``redis://:***@h``), and the
    ``password=`` parameter of a libpq key/value string."""
    if "://" not in url:
        return _redact_conninfo(url)
    parts = urlsplit(url)
    if parts.password is None:
        return _redact_query_password(url)
    user = parts.username or ""
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    netloc = f"{user}:{REDACTED}@{host}"
    return _redact_query_password(urlunsplit(parts._replace(netloc=netloc)))


def _redact_query_password(url: str) -> str:
    parts = urlsplit(url)
    if "password=" not in parts.query:
        return url
    query = "&".join(
        f"password={REDACTED}" if item.startswith("password=") else item
        for item in parts.query.split("&")
    )
    return urlunsplit(parts._replace(query=query))


def _redact_conninfo(dsn: str) -> str:
    words = []
    for word in dsn.split():
        key, sep, _ = word.partition("=")
        words.append(f"{key}={REDACTED}" if sep and key == "password" else word)
    return " ".join(words)


def _pick_env_file(env: Mapping[str, str], explicit: Path | None) -> Path | None:
    if explicit is not None:
        return explicit
    if env.get("STAGERD_ENV_FILE"):
        return Path(env["STAGERD_ENV_FILE"])
    # The deployed file is root's (0600; systemd reads it for the services): a process that
    # cannot read it already has its variables from systemd, so it is skipped, not an error.
    if DEFAULT_ENV_FILE.is_file() and os.access(DEFAULT_ENV_FILE, os.R_OK):
        return DEFAULT_ENV_FILE
    return None


@dataclass(frozen=True)
class _Spec:
    env: str
    attr: str
    parse: Callable[[str], object]
    secret: bool = False
    url_secret: bool = False


def _positive(parse: Callable[[str], T]) -> Callable[[str], T]:
    def check(text: str) -> T:
        value = parse(text)
        if not isinstance(value, (int, float)) or value <= 0:
            raise ValueError(f"must be greater than zero, got {text!r}")
        return value

    return check


def _bounded_int(low: int, high: int) -> Callable[[str], int]:
    def check(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise ValueError(f"not a whole number: {text!r}") from None
        if not low <= value <= high:
            raise ValueError(f"must be between {low} and {high}, got {value}")
        return value

    return check


def _size_between(low: str, high: str, why: str = "") -> Callable[[str], int]:
    """A size in [low, high], both given as the user would write them ("5MiB")."""
    lo, hi = parse_size(low), parse_size(high)

    def check(text: str) -> int:
        value = parse_size(text)
        if not lo <= value <= hi:
            raise ValueError(f"must be between {low} and {high}{why}, got {text!r}")
        return value

    return check


# STAGERD_PART_SIZE and `transfer ... --part-size` share it.
parse_part_size = _size_between("5MiB", "5GiB", " (S3 part limits)")


def _url(schemes: tuple[str, ...]) -> Callable[[str], str]:
    def check(text: str) -> str:
        parts = urlsplit(text)
        if parts.scheme not in schemes or not parts.netloc:
            raise ValueError(
                f"must be a URL starting with {' or '.join(s + '://' for s in schemes)}"
            )
        return text.rstrip("/") if schemes == ("http", "https") else text

    return check


def _choice(*allowed: str) -> Callable[[str], str]:
    def check(text: str) -> str:
        if text not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}, got {text!r}")
        return text

    return check


def _nonempty(text: str) -> str:
    if not text.strip():
        raise ValueError("must not be empty")
    return text


_SPECS: tuple[_Spec, ...] = (
    _Spec("S3_ENDPOINT", "s3_endpoint", _url(("http", "https"))),
    _Spec("S3_ACCESS_KEY", "s3_access_key", str, secret=True),
    _Spec("S3_SECRET_KEY", "s3_secret_key", str, secret=True),
    _Spec("S3_BUCKET", "s3_bucket", _nonempty),
    _Spec("STAGERD_S3_REGION", "s3_region", _nonempty),
    _Spec("STAGERD_S3_CA_BUNDLE", "s3_ca_bundle", _nonempty),
    _Spec("STAGERD_S3_CHECKSUM", "s3_checksum", _choice("when_required", "when_supported")),
    _Spec("STAGERD_S3_RETRY_MODE", "s3_retry_mode", _choice("standard", "adaptive", "legacy")),
    _Spec("STAGERD_S3_MAX_ATTEMPTS", "s3_max_attempts", _bounded_int(1, 50)),
    _Spec("STAGERD_S3_CONNECT_TIMEOUT", "s3_connect_timeout", _positive(parse_duration)),
    _Spec("STAGERD_S3_READ_TIMEOUT", "s3_read_timeout", _positive(parse_duration)),
    _Spec("REDIS_URL", "redis_url", redis_url, url_secret=True),
    _Spec("DATABASE_URL", "database_url", database_url, url_secret=True),
    _Spec("STAGERD_SCRATCH_DIR", "scratch_dir", lambda text: Path(_nonempty(text))),
    _Spec("STAGERD_SCRATCH_BUDGET", "scratch_budget", _positive(parse_size)),
    _Spec("STAGERD_SCRATCH_HEADROOM", "scratch_headroom", parse_size),
    _Spec("STAGERD_QUEUE", "queue", _nonempty),
    _Spec("STAGERD_MAX_PARTS", "max_parts", _bounded_int(1, 10000)),
    _Spec("STAGERD_PART_SIZE", "part_size", parse_part_size),
    _Spec("STAGERD_RANGE_SIZE", "range_size", _size_between("1MiB", "5GiB")),
    _Spec("STAGERD_CONCURRENCY", "concurrency", _bounded_int(1, 256)),
    _Spec("STAGERD_PROCESSOR", "processor", _nonempty),
    _Spec("STAGERD_PROCESS_TIMEOUT", "process_timeout", _positive(parse_duration)),
    _Spec("STAGERD_MAX_ATTEMPTS", "max_attempts", _bounded_int(1, 1000)),
    _Spec("STAGERD_MAX_MEMBERS", "max_members", _bounded_int(1, 10_000_000)),
    _Spec("STAGERD_MAX_RESULTS", "max_results", _bounded_int(1, 100_000_000)),
    _Spec("STAGERD_MAX_RESULT_BYTES", "max_result_bytes", _positive(parse_size)),
    _Spec("STAGERD_PROCESS_SCRATCH_ALLOWANCE", "process_scratch_allowance", parse_size),
    _Spec("STAGERD_METRICS_FILE", "metrics_file", lambda text: Path(_nonempty(text))),
    _Spec("STAGERD_HEARTBEAT_TTL", "heartbeat_ttl", _positive(parse_duration)),
    _Spec("STAGERD_COMMIT_RETRY", "commit_retry", _positive(parse_duration)),
    _Spec("STAGERD_WORKER_ID", "worker_id", _nonempty),
)


def _build(env: Mapping[str, str], env_file: Path | None) -> Settings:
    values: dict[str, object] = {"env_file": env_file}
    for spec in _SPECS:
        raw = env.get(spec.env)
        if raw is None or raw == "":
            continue
        try:
            values[spec.attr] = spec.parse(raw)
        except ValueError as exc:
            # Never echo a secret's value back; the variable name is enough to act on.
            detail = "malformed value" if spec.secret else str(exc)
            raise ConfigError(f"{spec.env}: {detail}") from None
    return Settings(**values)  # type: ignore[arg-type]
