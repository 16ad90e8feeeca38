"""The S3 client factory against real servers."""

from __future__ import annotations

import pytest

from stagerd.config.settings import Settings
from stagerd.s3.boto import describe_client_error
from stagerd.s3.client import get_s3_client


@pytest.mark.parametrize("s3_server", ["seaweedfs", "moto"], indirect=True)
def test_client_round_trip(settings: Settings, s3_bucket: str) -> None:
    client = get_s3_client(settings)
    client.put_object(Bucket=s3_bucket, Key="archives/x.tar", Body=b"hello")
    assert client.get_object(Bucket=s3_bucket, Key="archives/x.tar")["Body"].read() == b"hello"
    assert client.meta.config.max_pool_connections >= settings.concurrency


def test_seed_signature_reads_environment(
    settings: Settings, stagerd_env: dict[str, str], monkeypatch, s3_bucket: str
) -> None:
    for key, value in stagerd_env.items():
        monkeypatch.setenv(key, value)
    client = get_s3_client()
    client.put_object(Bucket=s3_bucket, Key="k", Body=b"1")
    assert client.head_object(Bucket=s3_bucket, Key="k")["ContentLength"] == 1


def test_wrong_credentials_message_names_bucket_not_secret(
    settings: Settings, s3_bucket: str
) -> None:
    from botocore.exceptions import ClientError

    bad = settings.replace(s3_access_key="not-a-key", s3_secret_key="wrong-secret-123")
    client = get_s3_client(bad)
    with pytest.raises(ClientError) as info:
        client.head_bucket(Bucket=s3_bucket)
    message = describe_client_error(info.value, s3_bucket, settings.s3_endpoint or "")
    assert s3_bucket in message and "wrong-secret-123" not in message and "not-a-key" not in message


def test_unreachable_endpoint_message(settings: Settings) -> None:
    from botocore.exceptions import EndpointConnectionError

    client = get_s3_client(settings.replace(s3_endpoint="http://127.0.0.1:9", s3_max_attempts=1))
    with pytest.raises(EndpointConnectionError) as info:
        client.head_bucket(Bucket="b")
    assert "127.0.0.1:9" in describe_client_error(info.value, "b", "http://127.0.0.1:9")


def test_client_keeps_the_seeds_transfer_methods_without_importing_them(
    stagerd_env: dict[str, str], s3_bucket: str, tmp_path
) -> None:
    """The seed's calls (upload_file, download_file) work; a one-shot command that never makes
    them pays for botocore only (stagerd.s3.client says why); the server's logs can tell
    stagerd's requests apart by their user agent."""
    import subprocess
    import sys

    from stagerd import __version__
    from tests.conftest import base_env

    src, dst = tmp_path / "src.bin", tmp_path / "dst.bin"
    src.write_bytes(b"seed" * 1000)
    code = (
        "import sys\n"
        "from stagerd.s3.client import get_s3_client\n"
        "c = get_s3_client()\n"
        f"c.put_object(Bucket={s3_bucket!r}, Key='ua', Body=b'1')\n"
        "print('boto3' in sys.modules, 's3transfer' in sys.modules, c.meta.config.user_agent_extra)\n"
        f"c.upload_file({str(src)!r}, {s3_bucket!r}, 'archives/seed.tar')\n"
        f"c.download_file({s3_bucket!r}, 'archives/seed.tar', {str(dst)!r})\n"
        "print('s3transfer' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**base_env(), **stagerd_env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False", f"stagerd/{__version__}", "True"]
    assert dst.read_bytes() == src.read_bytes()


def test_clients_share_one_parsed_model(settings: Settings) -> None:
    first, second = get_s3_client(settings), get_s3_client(settings)
    assert first is not second
    # The second client's service model is the first's (the loader cache), not a re-parse.
    assert first.meta.service_model._service_description is (  # type: ignore[attr-defined]
        second.meta.service_model._service_description  # type: ignore[attr-defined]
    )
