"""The ObjectStore contract (stagerd.s3.store) held by BotoStore against real servers: every
server of the interop matrix (SeaweedFS and moto by default), faults from tests.faultproxy."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest

from stagerd.errors import (
    BucketNotFound,
    NoSuchUpload,
    ObjectChanged,
    ObjectNotFound,
    PermanentError,
    TransientError,
)
from stagerd.retry import is_transient
from stagerd.s3.boto import BotoStore
from stagerd.s3.boto import is_transient as s3_is_transient
from tests.conftest import S3Server, make_s3_client
from tests.faultproxy import FaultProxy, Head

pytestmark = pytest.mark.interop

MiB = 1024 * 1024


@pytest.fixture
def store(s3_server: S3Server) -> BotoStore:
    return BotoStore(make_s3_client(s3_server), s3_server.endpoint)


@pytest.fixture
def proxy(s3_server: S3Server) -> Iterator[FaultProxy]:
    with FaultProxy(s3_server.endpoint, seed=3, stall_seconds=5.0) as p:
        yield p


def _proxied(server: S3Server, proxy: FaultProxy, attempts: int = 1) -> BotoStore:
    """A store through *proxy* making *attempts* HTTP attempts per call (botocore's)."""
    client = make_s3_client(
        server,
        endpoint=proxy.endpoint,
        retries={"mode": "standard", "total_max_attempts": attempts},
        read_timeout=2,
        connect_timeout=2,
    )
    return BotoStore(client, proxy.endpoint)


def test_objects_round_trip_as_typed_results(store: BotoStore, s3_bucket: str) -> None:
    data = os.urandom(100_000)
    etag = store.put(s3_bucket, "a/x", data, metadata={"k": "v"}, content_type="x/y")
    head = store.head(s3_bucket, "a/x")
    assert head.size == len(data) and head.etag.strip('"') == etag and head.etag.startswith('"')
    assert head.metadata == {"k": "v"}
    with pytest.raises(dataclasses.FrozenInstanceError):
        head.size = 1  # type: ignore[misc]
    body = store.get_range(s3_bucket, "a/x", 10, 19, if_match=head.etag)
    try:
        assert body.read() == data[10:20]
    finally:
        body.close()
    assert store.get(s3_bucket, "a/x") == data
    store.put(s3_bucket, "b/y", b"1")
    listed = {o.key: o for o in store.list_objects(s3_bucket, "a/")}
    assert list(listed) == ["a/x"] and listed["a/x"].size == len(data)
    assert isinstance(listed["a/x"].last_modified, datetime)
    store.delete(s3_bucket, "a/x")
    store.delete(s3_bucket, "a/x")  # a missing key is not an error
    assert [o.key for o in store.list_objects(s3_bucket)] == ["b/y"]


def test_not_found_is_object_not_found_and_permanent(store: BotoStore, s3_bucket: str) -> None:
    for call in (
        lambda: store.head(s3_bucket, "nope"),
        lambda: store.get(s3_bucket, "nope"),
        lambda: store.get_range(s3_bucket, "nope", 0, 9),
    ):
        with pytest.raises(ObjectNotFound) as info:
            call()
        assert isinstance(info.value, PermanentError) and not is_transient(info.value)
        assert s3_bucket in str(info.value) and store.endpoint in str(info.value)
    with pytest.raises(BucketNotFound, match="does not exist"):
        store.head_bucket(f"{s3_bucket}-missing")
    store.head_bucket(s3_bucket)


def test_replaced_object_fails_if_match_as_object_changed(store: BotoStore, s3_bucket: str) -> None:
    store.put(s3_bucket, "k", b"first")
    etag = store.head(s3_bucket, "k").etag
    store.put(s3_bucket, "k", b"second version")
    with pytest.raises(ObjectChanged) as info:
        store.get_range(s3_bucket, "k", 0, 3, if_match=etag).read()
    # Repeating the pinned read cannot help: no retry policy spends attempts on it.
    assert not is_transient(info.value)


def test_multipart_lifecycle_and_idempotent_abort(store: BotoStore, s3_bucket: str) -> None:
    parts = [os.urandom(5 * MiB), os.urandom(1234)]
    upload_id = store.create_multipart(s3_bucket, "mp", metadata={"m": "1"})
    (listed,) = [u for u in store.list_uploads(s3_bucket, "mp") if u.upload_id == upload_id]
    assert listed.key == "mp" and isinstance(listed.initiated, datetime)
    etags = [
        store.upload_part(s3_bucket, "mp", upload_id, n, io.BytesIO(d), len(d))
        for n, d in enumerate(parts, start=1)
    ]
    got = store.list_parts(s3_bucket, "mp", upload_id)
    assert [(p.number, p.size, p.etag) for p in got] == [
        (1, len(parts[0]), etags[0]),
        (2, len(parts[1]), etags[1]),
    ]
    store.complete_multipart(s3_bucket, "mp", upload_id, etags)
    assert store.get(s3_bucket, "mp") == b"".join(parts)
    # Repeated after a success: succeeds again or says NoSuchUpload (the contract); the
    # object stays either way.
    with contextlib.suppress(NoSuchUpload):
        store.complete_multipart(s3_bucket, "mp", upload_id, etags)
    assert store.head(s3_bucket, "mp").size == sum(map(len, parts))

    stale = store.create_multipart(s3_bucket, "mp2")
    assert store.abort_multipart(s3_bucket, "mp2", stale) is True
    store.abort_multipart(s3_bucket, "mp2", stale)  # idempotent: never raises
    assert stale not in {u.upload_id for u in store.list_uploads(s3_bucket)}


def test_a_vanished_upload_is_no_such_upload(store: BotoStore, s3_bucket: str) -> None:
    upload_id = store.create_multipart(s3_bucket, "gone")
    store.abort_multipart(s3_bucket, "gone", upload_id)
    # ListParts is where a concurrent run's abort shows (stagerd.s3.multipart relies on it).
    with pytest.raises(NoSuchUpload) as info:
        store.list_parts(s3_bucket, "gone", upload_id)
    assert "NoSuchUpload" in str(info.value) and not is_transient(info.value)


def test_refusals_quote_the_servers_code_and_message(
    s3_server: S3Server, s3_bucket: str, proxy: FaultProxy
) -> None:
    def part_two(head: Head) -> bool:
        return head.method == "PUT" and "partNumber=2" in head.target

    store = _proxied(s3_server, proxy)
    upload_id = store.create_multipart(s3_bucket, "k")
    proxy.fail_first(1, "part_limit", part_two)
    with pytest.raises(PermanentError) as info:
        store.upload_part(s3_bucket, "k", upload_id, 2, io.BytesIO(b"x"), 1)
    message = str(info.value)
    assert f"S3 UploadPart on bucket {s3_bucket!r} at {proxy.endpoint}" in message
    assert "InvalidArgument (HTTP 400)" in message
    assert '"Part number must be an integer between 1 and 2, inclusive"' in message
    assert "STAGERD_MAX_PARTS=2" in message
    store.abort_multipart(s3_bucket, "k", upload_id)


def test_5xx_is_transient_and_botocore_attempts_are_bounded(
    s3_server: S3Server, s3_bucket: str, proxy: FaultProxy
) -> None:
    proxy.configure(rate=1.0, kinds=["slowdown"])
    store = _proxied(s3_server, proxy, attempts=2)
    with pytest.raises(TransientError) as info:
        store.put(s3_bucket, "k", b"data")
    assert 'SlowDown (HTTP 503): "Please reduce your request rate."' in str(info.value)
    # One store call, at most S3_MAX_ATTEMPTS (here 2) HTTP attempts: the contract's bound.
    assert proxy.stats().requests == 2


def test_cut_connections_are_transient(
    s3_server: S3Server, s3_bucket: str, proxy: FaultProxy, store: BotoStore
) -> None:
    store.put(s3_bucket, "k", os.urandom(2 * MiB))
    proxy.configure(rate=1.0, kinds=["reset_response"])
    body = _proxied(s3_server, proxy).get_range(s3_bucket, "k", 0, 2 * MiB - 1)
    with pytest.raises(TransientError) as info:  # while reading the body, not only at GET
        while body.read(256 * 1024):
            pass
    assert is_transient(info.value)
    proxy.configure(rate=1.0, kinds=["reset_request"])
    with pytest.raises(TransientError, match="unreachable"):
        _proxied(s3_server, proxy).put(s3_bucket, "k2", os.urandom(2 * MiB))
    down = BotoStore(make_s3_client(s3_server, endpoint="http://127.0.0.1:9"))
    with pytest.raises(TransientError, match=r"S3 endpoint http://127.0.0.1:9 unreachable"):
        down.head(s3_bucket, "k")


def test_bad_credentials_are_permanent_and_never_quote_the_secret(
    s3_server: S3Server, s3_bucket: str
) -> None:
    bad = dataclasses.replace(s3_server, secret_key="wrong-secret-value-987")
    store = BotoStore(make_s3_client(bad), s3_server.endpoint)
    try:
        store.head_bucket(s3_bucket)
    except PermanentError as exc:
        # Permanent everywhere (stagerd.s3.boto says why); the worker's health probe keeps
        # a worker-wide credentials failure from burning jobs.
        assert "access denied" in str(exc) and "wrong-secret" not in str(exc)
        assert not is_transient(exc)
    else:
        pytest.skip(f"{s3_server.name} does not check credentials")


def test_raw_botocore_errors_classify_through_the_edge() -> None:
    from botocore.exceptions import ClientError, EndpointConnectionError

    def client_error(code: str, status: int) -> ClientError:
        response: Any = {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}
        return ClientError(response, "GetObject")

    assert s3_is_transient(client_error("SlowDown", 503))
    assert not s3_is_transient(client_error("PreconditionFailed", 412))
    assert not s3_is_transient(client_error("AccessDenied", 403))
    assert not s3_is_transient(client_error("NoSuchKey", 404))
    assert s3_is_transient(EndpointConnectionError(endpoint_url="http://x"))
    # stagerd.retry knows only stagerd's classes and OS errors now.
    assert not is_transient(client_error("SlowDown", 503))
    assert not s3_is_transient(ValueError("a bug"))
