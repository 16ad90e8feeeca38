"""The multipart engine against a real S3 server (SeaweedFS)."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from stagerd.errors import PermanentError
from stagerd.retry import RetryPolicy
from stagerd.s3.boto import BotoStore
from stagerd.s3.client import get_s3_client
from stagerd.s3.multipart import (
    PART_SIZE_META,
    UploadInterrupted,
    UploadOptions,
    UploadTarget,
    upload_file,
)
from stagerd.s3.partio import Cancelled, FileSlice, MiB, plan_part_size, split_parts

FAST = RetryPolicy(attempts=6, base=0.001, max_delay=0.01, total=30.0)
KEY = "archives/b1.tar"


def _file(tmp_path: Path, size: int, name: str = "a.tar") -> Path:
    path = tmp_path / name
    path.write_bytes(os.urandom(size))
    return path


def _target(settings: Any, client: Any = None) -> UploadTarget:
    store = BotoStore(client or get_s3_client(settings), settings.s3_endpoint)
    return UploadTarget(store, settings.s3_bucket, KEY)


def _opts(**kw: Any) -> UploadOptions:
    return UploadOptions(**{"part_size": 5 * MiB, "concurrency": 3, "policy": FAST, **kw})


def _object(s3_client: Any, bucket: str) -> bytes:
    return s3_client.get_object(Bucket=bucket, Key=KEY)["Body"].read()


def _uploads(s3_client: Any, bucket: str) -> list[dict[str, Any]]:
    return s3_client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])


# -- pure pieces -------------------------------------------------------------------------


def test_plan_part_size_adapts_to_max_parts() -> None:
    assert plan_part_size(100 * MiB, 64 * MiB, 1000) == 64 * MiB
    # 100 GiB in at most 1000 parts needs ceil(100 GiB / 1000).
    assert plan_part_size(100 * 1024 * MiB, 64 * MiB, 1000) == -(-100 * 1024 * MiB // 1000)
    assert plan_part_size(10, 5 * MiB, 1000) == 5 * MiB
    with pytest.raises(PermanentError, match="STAGERD_MAX_PARTS"):
        plan_part_size(6 * 1024**4, 64 * MiB, 1000)


def test_split_parts_covers_the_file() -> None:
    parts = split_parts(11, 5)
    assert [(p.number, p.offset, p.length) for p in parts] == [(1, 0, 5), (2, 5, 5), (3, 10, 1)]
    assert [(p.number, p.length) for p in split_parts(0, 5)] == [(1, 0)]


def test_file_slice_reads_seeks_and_cancels(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"0123456789")
    cancel = threading.Event()
    with FileSlice(path, 2, 5, cancel.is_set) as body:
        assert len(body) == 5
        assert body.read(3) == b"234" and body.tell() == 3
        assert body.read() == b"56" and body.read() == b""
        assert body.seek(0) == 0 and body.read(-1) == b"23456"
        assert body.seek(-2, os.SEEK_END) == 3 and body.read() == b"56"
        cancel.set()
        with pytest.raises(Cancelled):
            body.read(1)
    assert not hasattr(body, "fileno")


# -- against SeaweedFS ---------------------------------------------------------------------


def test_fresh_upload_then_rerun_is_a_no_op(settings: Any, s3_client: Any, tmp_path: Path) -> None:
    path = _file(tmp_path, 23 * MiB + 17)
    data = path.read_bytes()
    result = upload_file(_target(settings), path, _opts())
    assert result.parts == 5 and result.part_size == 5 * MiB
    assert result.uploaded_bytes == len(data) and result.resumed_bytes == 0
    assert result.sha256 == hashlib.sha256(data).hexdigest()
    assert not result.already_complete
    assert _object(s3_client, settings.s3_bucket) == data
    head = s3_client.head_object(Bucket=settings.s3_bucket, Key=KEY)
    assert head["Metadata"][PART_SIZE_META] == str(5 * MiB)
    assert head["ETag"].strip('"') == result.etag

    # Rerun with a different configured part size: the object's own layout is used to verify.
    again = upload_file(_target(settings), path, _opts(part_size=8 * MiB))
    assert again.already_complete and again.uploaded_bytes == 0
    assert again.resumed_bytes == len(data) and again.sha256 == result.sha256


def test_changed_file_after_complete_is_uploaded_again(
    settings: Any, s3_client: Any, tmp_path: Path
) -> None:
    path = _file(tmp_path, 6 * MiB)
    upload_file(_target(settings), path, _opts())
    path.write_bytes(os.urandom(6 * MiB))  # same size, different bytes
    result = upload_file(_target(settings), path, _opts())
    assert not result.already_complete and result.uploaded_bytes == 6 * MiB
    assert _object(s3_client, settings.s3_bucket) == path.read_bytes()


def test_resume_skips_verified_parts(settings: Any, s3_client: Any, tmp_path: Path) -> None:
    path = _file(tmp_path, 22 * MiB)
    data = path.read_bytes()
    bucket = settings.s3_bucket
    upload_id = s3_client.create_multipart_upload(Bucket=bucket, Key=KEY)["UploadId"]
    for number in (1, 3):  # a gap, as concurrent parts leave after a crash
        chunk = data[(number - 1) * 5 * MiB : number * 5 * MiB]
        s3_client.upload_part(
            Bucket=bucket, Key=KEY, UploadId=upload_id, PartNumber=number, Body=chunk
        )
    result = upload_file(_target(settings), path, _opts())
    assert result.resumed_bytes == 10 * MiB
    assert result.uploaded_bytes == 12 * MiB
    assert result.sha256 == hashlib.sha256(data).hexdigest()
    assert _object(s3_client, bucket) == data
    assert _uploads(s3_client, bucket) == []


def test_stale_upload_is_aborted_and_restarted(
    settings: Any, s3_client: Any, tmp_path: Path
) -> None:
    path = _file(tmp_path, 12 * MiB)
    bucket = settings.s3_bucket
    stale = s3_client.create_multipart_upload(Bucket=bucket, Key=KEY)["UploadId"]
    s3_client.upload_part(
        Bucket=bucket, Key=KEY, UploadId=stale, PartNumber=1, Body=os.urandom(5 * MiB)
    )
    result = upload_file(_target(settings), path, _opts())
    assert result.resumed_bytes == 0 and result.uploaded_bytes == 12 * MiB
    assert _object(s3_client, bucket) == path.read_bytes()
    assert stale not in {u["UploadId"] for u in _uploads(s3_client, bucket)}


def test_more_parts_than_max_parts_adapts(settings: Any, s3_client: Any, tmp_path: Path) -> None:
    path = _file(tmp_path, 20 * MiB)
    result = upload_file(_target(settings), path, _opts(max_parts=3))
    assert result.parts == 3 and result.part_size == -(-20 * MiB // 3)
    assert _object(s3_client, settings.s3_bucket) == path.read_bytes()


def test_injected_503_and_resets_are_retried(settings: Any, s3_client: Any, tmp_path: Path) -> None:
    from botocore.awsrequest import AWSResponse
    from botocore.exceptions import ConnectionClosedError

    # botocore's own retries off: the per-part RetryPolicy must do the work.
    client = get_s3_client(settings.replace(s3_max_attempts=1))
    calls = {"n": 0, "failed": 0}
    lock = threading.Lock()

    def fault(request: Any, **_: Any) -> Any:
        with lock:
            calls["n"] += 1
            n = calls["n"]
            if n > 4:
                return None
            calls["failed"] += 1
        if n % 2:
            raw = b"<Error><Code>SlowDown</Code><Message>slow</Message></Error>"
            return AWSResponse(request.url, 503, {}, _Raw(raw))
        raise ConnectionClosedError(endpoint_url=request.url)

    client.meta.events.register("before-send.s3.UploadPart", fault)
    path = _file(tmp_path, 11 * MiB)
    result = upload_file(_target(settings, client), path, _opts())
    assert calls["failed"] == 4 and calls["n"] == 3 + 4
    assert result.uploaded_bytes == 11 * MiB
    assert _object(s3_client, settings.s3_bucket) == path.read_bytes()


class _Raw:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def stream(self, **_: Any) -> Any:
        yield self.data


def test_persistent_failure_gives_up_with_the_cause(settings: Any, tmp_path: Path) -> None:
    from botocore.exceptions import ConnectionClosedError

    client = get_s3_client(settings.replace(s3_max_attempts=1))
    attempts = {"n": 0}

    def fault(request: Any, **_: Any) -> Any:
        attempts["n"] += 1
        raise ConnectionClosedError(endpoint_url=request.url)

    client.meta.events.register("before-send.s3.UploadPart", fault)
    client.meta.events.register("before-send.s3.PutObject", fault)  # the one-part fast path
    from stagerd.errors import TransientError

    with pytest.raises(TransientError, match="unreachable"):
        upload_file(_target(settings, client), _file(tmp_path, 1 * MiB), _opts())
    # Bounded: our policy's attempts (times botocore's own connection retry, if any).
    assert FAST.attempts <= attempts["n"] <= 2 * FAST.attempts


def test_bad_credentials_fail_fast_without_the_secret(settings: Any, tmp_path: Path) -> None:
    bad = settings.replace(s3_secret_key="wrong-secret-value-123")
    with pytest.raises(PermanentError) as info:
        upload_file(_target(bad), _file(tmp_path, 1 * MiB), _opts())
    message = str(info.value)
    assert settings.s3_bucket in message and "wrong-secret" not in message


def test_missing_bucket_fails_fast(settings: Any, tmp_path: Path) -> None:
    missing = settings.replace(s3_bucket=f"{settings.s3_bucket}-missing")
    # Two parts, so the multipart path runs: SeaweedFS creates a missing bucket on a plain
    # PutObject, which is why transfer() probes the bucket (HeadBucket) before any upload.
    with pytest.raises(PermanentError, match="does not exist"):
        upload_file(_target(missing), _file(tmp_path, 6 * MiB), _opts())


def test_stop_leaves_a_resumable_upload(settings: Any, s3_client: Any, tmp_path: Path) -> None:
    path = _file(tmp_path, 30 * MiB)
    stop = threading.Event()

    class StopAfterTwo:
        done = 0

        def advance(self, nbytes: int) -> None:
            self.done += 1
            if self.done == 2:
                stop.set()

        def close(self) -> None:
            pass

    with pytest.raises(UploadInterrupted):
        upload_file(
            _target(settings), path, _opts(concurrency=1), stop=stop, progress=StopAfterTwo()
        )
    (upload,) = _uploads(s3_client, settings.s3_bucket)
    parts = s3_client.list_parts(Bucket=settings.s3_bucket, Key=KEY, UploadId=upload["UploadId"])
    assert 2 <= len(parts["Parts"]) < 6
    result = upload_file(_target(settings), path, _opts())
    assert result.resumed_bytes == len(parts["Parts"]) * 5 * MiB
    assert _object(s3_client, settings.s3_bucket) == path.read_bytes()


def test_file_changed_during_upload_is_not_completed(
    settings: Any, s3_client: Any, tmp_path: Path
) -> None:
    path = _file(tmp_path, 12 * MiB)

    class Toucher:
        def advance(self, nbytes: int) -> None:
            os.utime(path, ns=(1, 1))

        def close(self) -> None:
            pass

    with pytest.raises(PermanentError, match="changed while"):
        upload_file(_target(settings), path, _opts(), progress=Toucher())
    head = s3_client.list_objects_v2(Bucket=settings.s3_bucket).get("Contents", [])
    assert head == [] and _uploads(s3_client, settings.s3_bucket) == []


def test_small_file_goes_up_in_one_verified_put(
    settings: Any, s3_client: Any, tmp_path: Path
) -> None:
    path = _file(tmp_path, 1 * MiB)
    client = get_s3_client(settings)
    sent: list[str] = []
    client.meta.events.register("before-send.s3", lambda request, **_: sent.append(request.method))
    result = upload_file(_target(settings, client), path, _opts())
    assert sent == ["HEAD", "PUT"]  # the exactly-once HEAD, then one PutObject
    assert result.parts == 1 and result.uploaded_bytes == path.stat().st_size
    assert _object(s3_client, settings.s3_bucket) == path.read_bytes()
    assert _uploads(s3_client, settings.s3_bucket) == []
    again = upload_file(_target(settings), path, _opts())  # a rerun verifies the plain-MD5 ETag
    assert again.already_complete and again.uploaded_bytes == 0 and again.sha256 == result.sha256


class _RacingClient:
    """A real client whose first ListParts loses a race: a concurrent run aborts the
    upload between our ListMultipartUploads and our ListParts (issue 16's flaky 404)."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self.raced = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def get_paginator(self, name: str) -> Any:
        paginator = self._client.get_paginator(name)
        if name != "list_parts" or self.raced:
            return paginator
        client, racer = self._client, self

        class _Racing:
            def paginate(self, **kw: Any) -> Any:
                racer.raced += 1
                client.abort_multipart_upload(
                    Bucket=kw["Bucket"], Key=kw["Key"], UploadId=kw["UploadId"]
                )
                return paginator.paginate(**kw)

        return _Racing()


def test_upload_vanishing_between_list_and_list_parts_starts_over(
    settings: Any, s3_client: Any, tmp_path: Path
) -> None:
    path = _file(tmp_path, 17 * MiB)
    bucket = settings.s3_bucket
    # Leave an interrupted upload behind, so the next run finds it and lists its parts.
    created = s3_client.create_multipart_upload(Bucket=bucket, Key=KEY)["UploadId"]
    racing = _RacingClient(get_s3_client(settings))
    result = upload_file(_target(settings, racing), path, _opts())
    assert racing.raced == 1
    assert result.size == path.stat().st_size and result.resumed_bytes == 0
    assert _object(s3_client, bucket) == path.read_bytes()
    assert created not in [u["UploadId"] for u in _uploads(s3_client, bucket)]


class _RacingStore:
    """The real store, but right after the first HEAD a concurrent run uploads *racer*:
    the interleaving in which another transfer completes between the uploader's looks."""

    def __init__(self, target: UploadTarget, racer: Path) -> None:
        self._target = target
        self._racer = racer
        self.looks = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._target.store, name)

    def head(self, bucket: str, key: str) -> Any:
        self.looks += 1
        try:
            return self._target.store.head(bucket, key)
        finally:
            if self.looks == 1:
                upload_file(self._target, self._racer, _opts())


def _racing(settings: Any, racer: Path) -> tuple[UploadTarget, _RacingStore]:
    target = _target(settings)
    store = _RacingStore(target, racer)
    return UploadTarget(store, target.bucket, target.key), store  # type: ignore[arg-type]


def test_keep_existing_accepts_this_file_completed_by_a_concurrent_run(
    settings: Any, tmp_path: Path, s3_client: Any, s3_bucket: str
) -> None:
    """Found by a fresh-clone run (three concurrent `transfer upload` of one archive): the
    object was absent at the first look and present at the refusal check, because another
    run of the same file had just completed it, and the upload was refused as "a different
    archive". The interleaving is forced here: a real upload of the same file completes
    between the two looks."""
    path = _file(tmp_path, 12 * MiB)
    racing, store = _racing(settings, path)
    result = upload_file(racing, path, _opts(keep_existing=True))
    assert result.already_complete and result.uploaded_bytes == 0
    assert _object(s3_client, s3_bucket) == path.read_bytes()
    assert store.looks >= 2


def test_keep_existing_still_refuses_another_file_that_appears_meanwhile(
    settings: Any, tmp_path: Path, s3_client: Any, s3_bucket: str
) -> None:
    from stagerd.errors import BatchIdReused

    path = _file(tmp_path, 12 * MiB)
    other = _file(tmp_path, 12 * MiB, "other.tar")
    racing, _ = _racing(settings, other)
    with pytest.raises(BatchIdReused, match="different archive"):
        upload_file(racing, path, _opts(keep_existing=True))
    assert _object(s3_client, s3_bucket) == other.read_bytes()


def test_a_listed_part_that_does_not_match_is_resent_and_the_others_kept(
    settings: Any, s3_client: Any, tmp_path: Path
) -> None:
    """Found by a fresh-clone run on moto: after a SIGKILL through a throttling proxy the
    server kept a part that was not the file's bytes, and the whole upload (every verified
    part with it) was aborted and sent again. Only that part is sent again now."""
    path = _file(tmp_path, 12 * MiB)
    data = path.read_bytes()
    bucket = settings.s3_bucket
    upload = s3_client.create_multipart_upload(
        Bucket=bucket, Key=KEY, Metadata={"stagerd-part-size": str(5 * MiB)}
    )["UploadId"]
    s3_client.upload_part(
        Bucket=bucket, Key=KEY, UploadId=upload, PartNumber=1, Body=data[: 5 * MiB]
    )
    s3_client.upload_part(  # right size, wrong bytes
        Bucket=bucket, Key=KEY, UploadId=upload, PartNumber=2, Body=os.urandom(5 * MiB)
    )
    result = upload_file(_target(settings), path, _opts())
    assert result.resumed_bytes == 5 * MiB and result.uploaded_bytes == 7 * MiB
    assert _object(s3_client, bucket) == data
    assert _uploads(s3_client, bucket) == []
