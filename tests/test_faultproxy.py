"""The fault proxy itself, in front of real SeaweedFS: every fault kind as a real boto3
client sees it, clean pass-through otherwise, and stagerd's client + RetryPolicy riding out
20% faults."""

from __future__ import annotations

import hashlib
import http.client
import os
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest

from stagerd.config.settings import S3Settings
from stagerd.retry import RetryPolicy
from stagerd.s3.boto import is_transient  # raw botocore errors are the S3 edge's to classify
from stagerd.s3.client import get_s3_client
from tests.conftest import S3Server, make_s3_client
from tests.faultproxy import FAULT_KINDS, FaultProxy, Head

MiB = 1024 * 1024


@pytest.fixture
def proxy(s3_server: S3Server) -> Iterator[FaultProxy]:
    with FaultProxy(s3_server.endpoint, seed=1, stall_seconds=5.0) as p:
        yield p


ClientFactory = Callable[..., Any]


@pytest.fixture
def proxied(proxy: FaultProxy, s3_server: S3Server) -> ClientFactory:
    """A boto3 client through the proxy, with botocore's own retries off."""

    def make(read_timeout: float = 10.0) -> Any:
        return make_s3_client(
            s3_server,
            endpoint=proxy.endpoint,
            retries={"mode": "standard", "total_max_attempts": 1},
            read_timeout=read_timeout,
            connect_timeout=5,
        )

    return make


def _missing(client: Any, bucket: str, key: str) -> bool:
    from botocore.exceptions import ClientError

    try:
        client.head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        return exc.response["ResponseMetadata"]["HTTPStatusCode"] == 404
    return False


def test_passes_everything_through_with_keepalive_range_and_if_match(
    proxy: FaultProxy, proxied: ClientFactory, s3_bucket: str
) -> None:
    from botocore.exceptions import ClientError

    client = proxied()
    data = os.urandom(3 * MiB + 17)
    put = client.put_object(Bucket=s3_bucket, Key="obj", Body=data, Metadata={"sha256": "x1"})
    etag = put["ETag"]
    assert etag.strip('"') == hashlib.md5(data).hexdigest()
    head = client.head_object(Bucket=s3_bucket, Key="obj")
    assert head["ContentLength"] == len(data)
    assert head["Metadata"] == {"sha256": "x1"}
    ranged = client.get_object(Bucket=s3_bucket, Key="obj", Range="bytes=100-199", IfMatch=etag)
    assert ranged["ContentRange"] == f"bytes 100-199/{len(data)}"
    assert ranged["Body"].read() == data[100:200]
    with pytest.raises(ClientError) as mismatch:
        client.get_object(Bucket=s3_bucket, Key="obj", Range="bytes=0-9", IfMatch='"0" * 32')
    assert mismatch.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    assert client.get_object(Bucket=s3_bucket, Key="obj")["Body"].read() == data
    stats = proxy.stats()
    assert stats.requests == 5
    assert stats.injected == {}
    assert stats.connections == 1  # one pooled connection carried every request


def test_relays_chunked_request_bodies(proxy: FaultProxy, s3_client: Any, s3_bucket: str) -> None:
    # boto3 never sends chunked bodies over http, so use a presigned URL and http.client.
    data = [os.urandom(70_000), os.urandom(1), os.urandom(300_000)]
    url = s3_client.generate_presigned_url(
        "put_object", Params={"Bucket": s3_bucket, "Key": "chunked"}, ExpiresIn=300
    )
    parts = urlsplit(url)
    proxied_host = urlsplit(proxy.endpoint)
    conn = http.client.HTTPConnection(proxied_host.hostname, proxied_host.port, timeout=30)
    # The URL was signed for the server's host, so send that Host (the proxy passes it on).
    conn.request(
        "PUT",
        f"{parts.path}?{parts.query}",
        body=iter(data),
        headers={"Host": parts.netloc},
        encode_chunked=True,
    )
    response = conn.getresponse()
    response.read()
    conn.close()
    assert response.status == 200
    body = s3_client.get_object(Bucket=s3_bucket, Key="chunked")["Body"].read()
    assert body == b"".join(data)


@pytest.mark.parametrize("kind", ["slowdown", "internal_error"])
def test_error_replies_are_s3_errors_the_server_never_sees(
    kind: str, proxy: FaultProxy, proxied: ClientFactory, s3_client: Any, s3_bucket: str
) -> None:
    from botocore.exceptions import ClientError

    proxy.configure(rate=1.0, kinds=[kind])
    client = proxied()
    with pytest.raises(ClientError) as err:
        client.put_object(Bucket=s3_bucket, Key="k", Body=os.urandom(2 * MiB))
    expected = {"slowdown": ("SlowDown", 503), "internal_error": ("InternalError", 500)}[kind]
    assert err.value.response["Error"]["Code"] == expected[0]
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == expected[1]
    assert is_transient(err.value)
    assert proxy.stats().injected == {kind: 1}
    assert _missing(s3_client, s3_bucket, "k")
    # botocore sent "Expect: 100-continue" and no body, so that connection had to close;
    # a bodiless request's error leaves its connection usable for the next request.
    with pytest.raises(ClientError):
        client.head_object(Bucket=s3_bucket, Key="k")
    proxy.configure(rate=0.0)
    client.put_object(Bucket=s3_bucket, Key="k", Body=b"after")
    stats = proxy.stats()
    assert stats.injected == {kind: 2}
    assert stats.connections == 2


def test_reset_in_the_request_body_reaches_the_client_and_stores_nothing(
    proxy: FaultProxy, proxied: ClientFactory, s3_client: Any, s3_bucket: str
) -> None:
    proxy.configure(rate=1.0, kinds=["reset_request"])
    with pytest.raises(Exception) as err:
        proxied().put_object(Bucket=s3_bucket, Key="k", Body=os.urandom(4 * MiB))
    assert is_transient(err.value), repr(err.value)
    assert proxy.stats().injected == {"reset_request": 1}
    assert _missing(s3_client, s3_bucket, "k")


@pytest.mark.parametrize("kind", ["reset_response", "truncate", "stall_body"])
def test_damaged_response_bodies_fail_the_read(
    kind: str, proxy: FaultProxy, proxied: ClientFactory, s3_client: Any, s3_bucket: str
) -> None:
    from botocore.exceptions import ReadTimeoutError

    data = os.urandom(2 * MiB)
    s3_client.put_object(Bucket=s3_bucket, Key="k", Body=data)
    proxy.configure(rate=1.0, kinds=[kind])
    client = proxied(read_timeout=1.0)
    with pytest.raises(Exception) as err:
        client.get_object(Bucket=s3_bucket, Key="k")["Body"].read()
    assert is_transient(err.value), repr(err.value)
    if kind == "stall_body":  # the client's read timeout fired, not the end of the stall
        assert isinstance(err.value, ReadTimeoutError), repr(err.value)
    assert proxy.stats().injected == {kind: 1}


def test_stall_outlasts_the_read_timeout(
    proxy: FaultProxy, proxied: ClientFactory, s3_bucket: str
) -> None:
    from botocore.exceptions import ReadTimeoutError

    proxy.configure(rate=1.0, kinds=["stall"])
    with pytest.raises(ReadTimeoutError):
        proxied(read_timeout=1.0).head_bucket(Bucket=s3_bucket)
    assert proxy.stats().injected == {"stall": 1}


def test_choice_is_seeded_rated_and_limited_to_kinds_that_apply() -> None:
    get = Head("GET /b/k HTTP/1.1", (("Host", "x"),))
    put = Head("PUT /b/k HTTP/1.1", (("Content-Length", "10"),))
    head = Head("HEAD /b/k HTTP/1.1", ())

    def draw(seed: int) -> list[str | None]:
        p = FaultProxy("http://127.0.0.1:1", rate=0.2, seed=seed)
        return [p.choose(h) for h in [get, put, head] * 400]

    first = draw(5)
    assert first == draw(5)
    assert first != draw(6)
    faulted = [k for k in first if k is not None]
    assert 180 <= len(faulted) <= 300  # 20% of 1200, within a generous band
    assert set(faulted) == set(FAULT_KINDS)
    on_head = [k for h, k in zip([get, put, head] * 400, first, strict=True) if h is head]
    assert not {"reset_request", "reset_response", "truncate", "stall_body"} & set(on_head)
    on_get = [k for h, k in zip([get, put, head] * 400, first, strict=True) if h is get]
    assert "reset_request" not in on_get

    only_get = FaultProxy("http://127.0.0.1:1", rate=1.0, only=lambda h: h.method == "GET")
    assert only_get.choose(put) is None
    assert only_get.choose(get) is not None
    assert only_get.stats().requests == 2
    with pytest.raises(ValueError):
        only_get.configure(kinds=["flood"])
    with pytest.raises(ValueError):
        only_get.configure(rate=1.5)


def test_stagerd_client_with_retry_policy_survives_20_percent_faults(
    proxy: FaultProxy, s3_server: S3Server, s3_client: Any, s3_bucket: str
) -> None:
    from boto3.s3.transfer import TransferConfig

    settings = S3Settings(
        endpoint=proxy.endpoint,
        access_key=s3_server.access_key,
        secret_key=s3_server.secret_key,
        bucket=s3_bucket,
        max_attempts=1,  # leave every retry to RetryPolicy, so the proxy's faults reach it
        read_timeout=1.0,
        connect_timeout=2.0,
    )
    client = get_s3_client(settings)
    policy = RetryPolicy(attempts=12, base=0.01, max_delay=0.2, total=120, classify=is_transient)
    proxy.configure(rate=0.2, stall_seconds=3.0)
    attempts = 0

    def counted(fn: Callable[[], Any]) -> Callable[[], Any]:
        def run() -> Any:
            nonlocal attempts
            attempts += 1
            return fn()

        return run

    objects = {f"obj-{i}": os.urandom(MiB * (i % 3) + 1000 * i) for i in range(12)}
    for key, data in objects.items():
        policy.call(
            counted(lambda k=key, d=data: client.put_object(Bucket=s3_bucket, Key=k, Body=d))
        )
    for key, data in objects.items():
        got = policy.call(
            counted(lambda k=key: client.get_object(Bucket=s3_bucket, Key=k)["Body"].read())
        )
        assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
    # Multipart through the proxy as well: each part is retried on its own by s3transfer's
    # caller here (the whole transfer), which is the coarse grain stagerd must also survive.
    big = os.urandom(12 * MiB)
    config = TransferConfig(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB)
    import io

    policy.call(
        counted(lambda: client.upload_fileobj(io.BytesIO(big), s3_bucket, "big", Config=config))
    )
    assert s3_client.get_object(Bucket=s3_bucket, Key="big")["Body"].read() == big
    stats = proxy.stats()
    assert stats.total_injected >= 5, stats.injected
    operations = 2 * len(objects) + 1
    assert operations < attempts <= operations + 3 * stats.total_injected
