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
