"""Shared fixtures: every test gets real Redis, PostgreSQL and S3, isolated from the others.

Isolation: each test has its own bucket, its own Redis queue name (all stagerd keys derive
from it), its own PostgreSQL schema (``search_path`` in the URL) and its own scratch dir.
The services are started by ``build/services.sh`` (``build/test.sh`` calls it); a test run
without them fails loudly instead of skipping.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

ROOT = Path(__file__).resolve().parent.parent

DEV_ACCESS_KEY = "stagerd-dev"
DEV_SECRET_KEY = "stagerd-dev-secret"


@dataclass(frozen=True)
class S3Server:
    """An S3 server the tests can target."""

    name: str
    endpoint: str
    access_key: str = DEV_ACCESS_KEY
    secret_key: str = DEV_SECRET_KEY
    version: str = ""  # when the starter reports it (build/swift.sh does)
    start_with: str = "build/services.sh"
    tls_endpoint: str = ""  # the same server over HTTPS, where there is one
    ca_bundle: str = ""  # the certificate that endpoint's clients trust


def _swift_server(name: str, prefix: str) -> S3Server:
    """A Swift all-in-one of build/swift.sh: from ``$PREFIX...`` or the state file it writes."""
    state = Path(os.environ.get("STAGERD_SWIFT_DIR", "/tmp/stagerd-swift")) / f"{name}.env"
    found: dict[str, str] = {}
    if state.is_file():
        for line in state.read_text().splitlines():
            key, sep, value = line.removeprefix("export ").partition("=")
            if sep:
                found[key] = value
    found.update({k: v for k, v in os.environ.items() if k.startswith(prefix)})
    if f"{prefix}_TLS" not in os.environ and prefix in os.environ:
        found.pop(f"{prefix}_TLS", None)  # an endpoint from the env: the file is someone else's
    return S3Server(
        name,
        # Port 0 never answers: a Swift that is not running fails loudly when requested.
        found.get(prefix, "http://127.0.0.1:0"),
        found.get(f"{prefix}_ACCESS_KEY", "test:tester"),
        found.get(f"{prefix}_SECRET_KEY", "testing"),
        found.get(f"{prefix}_VERSION", ""),
        start_with=f"build/swift.sh start {'old' if name == 'swift-old' else 'current'}",
        tls_endpoint=found.get(f"{prefix}_TLS", ""),
        ca_bundle=found.get(f"{prefix}_CA", ""),
    )


S3_SERVERS = {
    "seaweedfs": S3Server(
        "seaweedfs", os.environ.get("STAGERD_TEST_SEAWEEDFS", "http://127.0.0.1:8333")
    ),
    "moto": S3Server("moto", os.environ.get("STAGERD_TEST_MOTO", "http://127.0.0.1:5055")),
    "swift": _swift_server("swift", "STAGERD_TEST_SWIFT"),
    "swift-old": _swift_server("swift-old", "STAGERD_TEST_SWIFT_OLD"),
}
DEFAULT_INTEROP_SERVERS = "seaweedfs,moto"
REDIS_URL = os.environ.get("STAGERD_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
DATABASE_URL = os.environ.get(
    "STAGERD_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)


def _reachable(url: str) -> bool:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 80), timeout=2):
            return True
    except OSError:
        return False


def _require(url: str, what: str, start_with: str = "build/services.sh") -> None:
    if not _reachable(url):
        pytest.fail(f"{what} is not reachable at {url}: start it with {start_with}", pytrace=False)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--s3-servers",
        default=None,
        help="comma-separated S3 servers that tests marked interop run against "
        f"({', '.join(S3_SERVERS)}); default $STAGERD_TEST_S3_SERVERS or {DEFAULT_INTEROP_SERVERS}",
    )


def interop_servers(config: pytest.Config) -> list[str]:
    """The servers of the interop matrix: --s3-servers, $STAGERD_TEST_S3_SERVERS or default."""
    raw = (
        config.getoption("--s3-servers")
        or os.environ.get("STAGERD_TEST_S3_SERVERS")
        or DEFAULT_INTEROP_SERVERS
    )
    names = [name.strip() for name in raw.split(",") if name.strip()]
    unknown = [name for name in names if name not in S3_SERVERS]
    if unknown or not names:
        raise pytest.UsageError(f"unknown S3 servers {unknown}; known: {', '.join(S3_SERVERS)}")
    return names


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # Tests marked interop run once per server of the matrix; a requested server that is
    # not running fails (s3_server's _require), it is never skipped.
    if "s3_server" in metafunc.fixturenames and metafunc.definition.get_closest_marker("interop"):
        metafunc.parametrize("s3_server", interop_servers(metafunc.config), indirect=True)


INTEROP_FINDINGS = pytest.StashKey[dict[str, dict[str, str]]]()


@pytest.fixture
def interop_record(request: pytest.FixtureRequest) -> Callable[[str, str, object], None]:
    """``record(server, what, value)``: a finding shown in the run's summary (and written as
    JSON to $STAGERD_INTEROP_REPORT when set)."""
    findings = request.config.stash.setdefault(INTEROP_FINDINGS, {})

    def record(server: str, what: str, value: object) -> None:
        findings.setdefault(server, {})[what] = str(value)

    return record


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    findings = config.stash.get(INTEROP_FINDINGS, {})
    if not findings:
        return
    terminalreporter.section("S3 interop findings")
    for server, found in sorted(findings.items()):
        for what, value in sorted(found.items()):
            terminalreporter.write_line(f"{server:10} {what:28} {value}")
    report = os.environ.get("STAGERD_INTEROP_REPORT")
    if report:
        import json

        Path(report).write_text(json.dumps(findings, indent=2, sort_keys=True) + "\n")


@pytest.fixture
def unique() -> str:
    """A short random token for naming this test's resources."""
    return uuid.uuid4().hex[:10]


def make_s3_client(
    server: S3Server,
    *,
    endpoint: str | None = None,
    verify: str | None = None,
    checksum: str = "when_required",
    **config: Any,
) -> Any:
    """A plain boto3 client on *server* (or on *endpoint*, e.g. a proxy in front of it);
    extra keywords go to botocore's Config (retries, timeouts)."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint or server.endpoint,
        verify=verify,
        aws_access_key_id=server.access_key,
        aws_secret_access_key=server.secret_key,
        region_name="us-east-1",
        config=Config(
            signature_version="s3v4",
            s3={"addressing_style": "path"},
            request_checksum_calculation=checksum,
            response_checksum_validation=checksum,
            **config,
        ),
    )


def empty_and_delete_bucket(client: Any, bucket: str) -> None:
    """Best-effort teardown: abort uploads, delete objects, delete the bucket."""
    from botocore.exceptions import ClientError

    try:
        for upload in client.list_multipart_uploads(Bucket=bucket).get("Uploads", []):
            client.abort_multipart_upload(
                Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"]
            )
        paginator = client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket):
            for obj in page.get("Contents", []):
                client.delete_object(Bucket=bucket, Key=obj["Key"])
        client.delete_bucket(Bucket=bucket)
    except ClientError:
        pass


@pytest.fixture
def s3_server(request: pytest.FixtureRequest) -> S3Server:
    """The S3 server under test: SeaweedFS, or each of the matrix for tests marked interop
    (or parametrise indirectly to pick one)."""
    server = S3_SERVERS[getattr(request, "param", "seaweedfs")]
    _require(server.endpoint, f"S3 server {server.name}", server.start_with)
    return server


@pytest.fixture
def s3_client(s3_server: S3Server) -> Any:
    """A plain boto3 client on the server under test, for arranging and asserting."""
    return make_s3_client(s3_server)


@pytest.fixture
def s3_bucket(s3_client: Any, unique: str) -> Iterator[str]:
    """A fresh bucket for this test, removed afterwards."""
    bucket = f"t-{unique}"
    s3_client.create_bucket(Bucket=bucket)
    yield bucket
    empty_and_delete_bucket(s3_client, bucket)


@pytest.fixture
def redis_url() -> str:
    _require(REDIS_URL, "Redis")
    return REDIS_URL


@pytest.fixture
def queue_name(unique: str) -> str:
    """This test's queue; every stagerd Redis key derives from it."""
    return f"t:{unique}:queue:unpack"


@pytest.fixture
def redis_client(redis_url: str, queue_name: str) -> Iterator[Any]:
    import redis

    client = redis.Redis.from_url(redis_url)
    yield client
    keys = list(client.scan_iter(match=f"{queue_name}*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture
def database_url(unique: str) -> Iterator[str]:
    """A libpq URL whose search_path is a fresh schema, dropped afterwards."""
    import psycopg

    _require(DATABASE_URL, "PostgreSQL")
    schema = f"t_{unique}"
    with psycopg.connect(DATABASE_URL, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    sep = "&" if "?" in DATABASE_URL else "?"
    yield f"{DATABASE_URL}{sep}options={quote(f'-csearch_path={schema}')}"
    with psycopg.connect(DATABASE_URL, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.fixture
def scratch_dir(tmp_path: Path) -> Path:
    path = tmp_path / "scratch"
    path.mkdir()
    return path


@pytest.fixture
def stagerd_env(
    tmp_path: Path,
    s3_server: S3Server,
    s3_bucket: str,
    redis_url: str,
    redis_client: Any,
    queue_name: str,
    database_url: str,
    scratch_dir: Path,
    unique: str,
) -> dict[str, str]:
    """The environment of a stagerd process wired to this test's resources."""
    env_file = tmp_path / "stagerd.env"
    env_file.write_text("# empty: keep /etc/stagerd/stagerd.env out of tests\n")
    return {
        "S3_ENDPOINT": s3_server.endpoint,
        "S3_ACCESS_KEY": s3_server.access_key,
        "S3_SECRET_KEY": s3_server.secret_key,
        "S3_BUCKET": s3_bucket,
        "REDIS_URL": redis_url,
        "DATABASE_URL": database_url,
        "STAGERD_QUEUE": queue_name,
        "STAGERD_SCRATCH_DIR": str(scratch_dir),
        "STAGERD_SCRATCH_BUDGET": "2GiB",
        "STAGERD_SCRATCH_HEADROOM": "64MiB",
        "STAGERD_WORKER_ID": f"w-{unique}",
        "STAGERD_HEARTBEAT_TTL": "5s",
        "STAGERD_ENV_FILE": str(env_file),
    }


@pytest.fixture
def settings(stagerd_env: dict[str, str]) -> Any:
    """In-process Settings equal to what a CLI run with ``stagerd_env`` sees."""
    from stagerd.config.settings import Settings

    return Settings.from_env(environ=stagerd_env)


def base_env() -> dict[str, str]:
    """A clean environment for child processes: no inherited S3/stagerd variables."""
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "SYSTEMROOT")
    env = {k: v for k, v in os.environ.items() if k in keep}
    env["PYTHONPATH"] = str(ROOT)
    env["PYTHONUNBUFFERED"] = "1"
    return env


CliRunner = Callable[..., "subprocess.CompletedProcess[str]"]


@pytest.fixture
def run_cli() -> CliRunner:
    """Run ``python -m stagerd ARGS`` as a real process: ``run_cli(args, env=..., timeout=...)``."""

    def run(
        args: list[str],
        env: dict[str, str] | None = None,
        timeout: float = 120,
        input: str | None = None,
        cwd: Path | None = None,
    ) -> subprocess.CompletedProcess[str]:
        full_env = {**base_env(), **(env or {})}
        return subprocess.run(
            [sys.executable, "-m", "stagerd", *args],
            env=full_env,
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            cwd=cwd,
        )

    return run


@pytest.fixture
def restartable_redis(tmp_path: Path) -> Iterator[Any]:
    """A private redis-server (durable AOF) on a free port: stop/kill/start/restart freely."""
    from tests.restartable import RedisServer

    with RedisServer(tmp_path / "redis") as server:
        yield server


@pytest.fixture
def restartable_postgres(tmp_path: Path) -> Iterator[Any]:
    """A private PostgreSQL cluster on a free port (trust): stop/start/restart freely."""
    from tests.restartable import PostgresServer

    with PostgresServer(tmp_path / "pg") as server:
        yield server


@pytest.fixture
def fault_proxy(s3_server: S3Server) -> Iterator[Any]:
    """A FaultProxy (tests/faultproxy.py) in front of the S3 server under test, injecting
    nothing until ``configure(rate=...)``; point S3_ENDPOINT at ``fault_proxy.endpoint``."""
    from tests.faultproxy import FaultProxy

    with FaultProxy(s3_server.endpoint, seed=int(os.environ.get("STAGERD_FAULT_SEED", "1"))) as p:
        yield p
