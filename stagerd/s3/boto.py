"""The boto3 :class:`~stagerd.s3.store.ObjectStore`, and stagerd's only botocore error mapping.

:class:`BotoStore` wraps a client from :func:`stagerd.s3.client.get_s3_client`. Each method
is one logical request (botocore makes at most ``S3_MAX_ATTEMPTS`` HTTP attempts for it;
stagerd's RetryPolicy, applied by the caller, multiplies that bound by its own attempts)
and raises only stagerd errors, via :func:`map_error`. Nothing else in stagerd imports
botocore (``stagerd.ops.selfcheck`` only checks that it loads).

Why a 403 is permanent everywhere: the same request with the same credentials cannot
succeed, and the old split (transient when staging, permanent when uploading) made one
refusal mean two things. A worker-wide credentials failure does not burn jobs: the GPU
worker's S3 health probe (HeadBucket) fails too, so the batch is handed back unharmed
while the worker waits to heal (stagerd.gpu.pipeline).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from stagerd.errors import (
    BucketNotFound,
    NoSuchUpload,
    ObjectChanged,
    ObjectNotFound,
    PermanentError,
    StagerdError,
    TransientError,
)
from stagerd.retry import TRANSIENT_ERRNOS
from stagerd.retry import is_transient as is_transient_error
from stagerd.s3.hints import explain, server_message
from stagerd.s3.store import Body, ObjectHead, ObjectInfo, PartBody, PartInfo, UploadInfo

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

    from stagerd.config.settings import S3Settings, Settings

T = TypeVar("T")

# S3 error codes (and HTTP statuses) worth another try; every other refusal is final.
TRANSIENT_S3_CODES = frozenset(
    {
        "500",
        "502",
        "503",
        "504",
        "InternalError",
        "ServiceUnavailable",
        "SlowDown",
        "RequestTimeout",
        "RequestTimeTooSkewed",
        "Throttling",
        "ThrottlingException",
        "TooManyRequests",
        "429",
        "BadDigest",  # a body damaged in flight: resending the same bytes can succeed
        "IncompleteBody",
        "XAmzContentSHA256Mismatch",
    }
)
ACCESS_DENIED_CODES = frozenset(
    {"403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"}
)
NOT_FOUND_CODES = frozenset({"404", "NoSuchKey", "NotFound"})


def _connection_errors() -> tuple[type[BaseException], ...]:
    """botocore/urllib3 errors that mean the connection, not the request, failed."""
    from botocore.exceptions import (
        ConnectionClosedError,
        ConnectTimeoutError,
        EndpointConnectionError,
        IncompleteReadError,
        ReadTimeoutError,
        ResponseStreamingError,
    )
    from urllib3.exceptions import HTTPError

    return (
        EndpointConnectionError,
        ConnectionClosedError,
        ReadTimeoutError,
        ConnectTimeoutError,
        IncompleteReadError,
        ResponseStreamingError,
        HTTPError,
        ConnectionError,
        TimeoutError,
    )


def map_error(exc: BaseException, op: str, bucket: str, endpoint: str) -> BaseException:
    """The stagerd error for *exc* raised by S3 operation *op*; *exc* itself when it is not
    an S3 or network error (a stagerd error, a cancelled body, a bug)."""
    from botocore.exceptions import BotoCoreError, ClientError

    if isinstance(exc, StagerdError):
        return exc
    if isinstance(exc, ClientError):
        return _map_client_error(exc, op, bucket, endpoint)
    line = _first_line(exc)
    if isinstance(exc, _connection_errors()) or (
        isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS
    ):
        return TransientError(
            f"S3 endpoint {endpoint} unreachable ({op} on bucket {bucket!r}): {line}"
        )
    if isinstance(exc, (BotoCoreError, OSError)):
        return PermanentError(f"S3 {op} on bucket {bucket!r} at {endpoint} failed: {line}")
    return exc


def _map_client_error(exc: BaseException, op: str, bucket: str, endpoint: str) -> StagerdError:
    code, status, _ = server_message(exc)
    where = f"S3 {op} on bucket {bucket!r} at {endpoint}"
    said = explain(exc)  # code (HTTP status): "the server's message"; a hint
    if code == "NoSuchBucket":
        return BucketNotFound(f"S3 bucket {bucket!r} does not exist at {endpoint} ({said})")
    if code == "NoSuchUpload":
        return NoSuchUpload(f"{where} failed: {said}")
    if code in NOT_FOUND_CODES or status == "404":
        return ObjectNotFound(f"{where}: no such key ({said})")
    if code == "PreconditionFailed" or status == "412":
        return ObjectChanged(f"{where}: the object changed ({said})")
    if code in ACCESS_DENIED_CODES or status == "403":
        # Permanent on purpose: see the module docstring.
        return PermanentError(f"{where}: access denied ({said}); check S3_ACCESS_KEY/S3_SECRET_KEY")
    if code in TRANSIENT_S3_CODES or status in TRANSIENT_S3_CODES:
        return TransientError(f"{where} failed: {said}")
    return PermanentError(f"{where} failed: {said}")


def is_transient(exc: BaseException) -> bool:
    """:func:`stagerd.retry.is_transient` that also understands raw botocore errors (for
    code holding a bare client, such as tests and benchmarks)."""
    mapped = map_error(exc, "request", "?", "?")
    return is_transient_error(mapped)


def describe_client_error(exc: BaseException, bucket: str, endpoint: str) -> str:
    """One line for a raw botocore error naming bucket and endpoint, never a secret."""
    op = str(getattr(exc, "operation_name", "") or "request")
    return str(map_error(exc, op, bucket, endpoint))


def _first_line(exc: BaseException) -> str:
    from stagerd.retry import brief

    return brief(exc)


class _MappedBody:
    """A GET body whose read errors (reset, timeout, truncation) leave as stagerd errors."""

    def __init__(self, body: Body, fail: Callable[[BaseException], BaseException]) -> None:
        self._body = body
        self._fail = fail

    def read(self, amt: int | None = None, /) -> bytes:
        try:
            return self._body.read(amt)
        except Exception as exc:
            mapped = self._fail(exc)
            if mapped is exc:
                raise
            raise mapped from exc

    def close(self) -> None:
        self._body.close()


class BotoStore:
    """:class:`~stagerd.s3.store.ObjectStore` over one boto3 client (thread-safe, as the
    client is). *endpoint* defaults to the client's own, and is used in messages only."""

    def __init__(self, client: S3Client, endpoint: str | None = None) -> None:
        self.client = client
        self._endpoint = endpoint if endpoint is not None else str(client.meta.endpoint_url)

    @classmethod
    def from_settings(cls, settings: Settings | S3Settings | None = None) -> BotoStore:
        """A store on :func:`~stagerd.s3.client.get_s3_client` (raises ConfigError)."""
        from stagerd.config.settings import Settings
        from stagerd.s3.client import get_s3_client

        if settings is None:
            settings = Settings.from_env()
        s3 = settings.require_s3() if isinstance(settings, Settings) else settings
        return cls(get_s3_client(s3), s3.endpoint)

    @property
    def endpoint(self) -> str:
        return self._endpoint

    def _call(self, op: str, bucket: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except Exception as exc:
            mapped = map_error(exc, op, bucket, self._endpoint)
            if mapped is exc:
                raise
            raise mapped from exc

    def _pages(self, op: str, bucket: str, pages: Callable[[], Any]) -> Iterator[Any]:
        """Iterate paginator pages, mapping errors raised by any page's request."""
        it = self._call(op, bucket, lambda: iter(pages()))
        while True:
            page = self._call(op, bucket, lambda: next(it, None))
            if page is None:
                return
            yield page

    def head_bucket(self, bucket: str) -> None:
        try:
            self._call("HeadBucket", bucket, lambda: self.client.head_bucket(Bucket=bucket))
        except ObjectNotFound as exc:
            # A HEAD has no body, so the 404 carries no code: here it can only be the bucket.
            raise BucketNotFound(
                f"S3 bucket {bucket!r} does not exist at {self._endpoint}"
            ) from exc.__cause__

    def head(self, bucket: str, key: str) -> ObjectHead:
        resp = self._call(
            "HeadObject", bucket, lambda: self.client.head_object(Bucket=bucket, Key=key)
        )
        meta = resp.get("Metadata", {})
        return ObjectHead(int(resp["ContentLength"]), str(resp.get("ETag", "")), dict(meta))

    def get_range(
        self, bucket: str, key: str, start: int, end: int, *, if_match: str | None = None
    ) -> Body:
        extra: dict[str, Any] = {"IfMatch": if_match} if if_match is not None else {}
        resp = self._call(
            "GetObject",
            bucket,
            lambda: self.client.get_object(
                Bucket=bucket, Key=key, Range=f"bytes={start}-{end}", **extra
            ),
        )
        return _MappedBody(
            resp["Body"], lambda exc: map_error(exc, "GetObject", bucket, self._endpoint)
        )

    def get(self, bucket: str, key: str) -> bytes:
        def read() -> bytes:
            return self.client.get_object(Bucket=bucket, Key=key)["Body"].read()

        return self._call("GetObject", bucket, read)

    def put(
        self,
        bucket: str,
        key: str,
        body: bytes,
        *,
        content_md5: str | None = None,
        metadata: Mapping[str, str] | None = None,
        content_type: str | None = None,
    ) -> str:
        extra: dict[str, Any] = {}
        if content_md5 is not None:
            extra["ContentMD5"] = content_md5
        if metadata is not None:
            extra["Metadata"] = dict(metadata)
        if content_type is not None:
            extra["ContentType"] = content_type
        resp = self._call(
            "PutObject",
            bucket,
            lambda: self.client.put_object(Bucket=bucket, Key=key, Body=body, **extra),
        )
        return _strip(resp.get("ETag", ""))

    def delete(self, bucket: str, key: str) -> None:
        self._call(
            "DeleteObject", bucket, lambda: self.client.delete_object(Bucket=bucket, Key=key)
        )

    def create_multipart(
        self,
        bucket: str,
        key: str,
        *,
        metadata: Mapping[str, str] | None = None,
        content_type: str | None = None,
    ) -> str:
        extra: dict[str, Any] = {}
        if metadata is not None:
            extra["Metadata"] = dict(metadata)
        if content_type is not None:
            extra["ContentType"] = content_type
        resp = self._call(
            "CreateMultipartUpload",
            bucket,
            lambda: self.client.create_multipart_upload(Bucket=bucket, Key=key, **extra),
        )
        return str(resp["UploadId"])

    def upload_part(
        self, bucket: str, key: str, upload_id: str, number: int, body: PartBody, length: int
    ) -> str:
        def send() -> str:
            body.seek(0)  # a retry (ours or botocore's) resends the part from its start
            resp = self.client.upload_part(
                Bucket=bucket,
                Key=key,
                UploadId=upload_id,
                PartNumber=number,
                Body=body,  # type: ignore[arg-type]
                ContentLength=length,
            )
            return _strip(resp["ETag"])

        return self._call("UploadPart", bucket, send)

    def list_parts(self, bucket: str, key: str, upload_id: str) -> list[PartInfo]:
        def pages() -> Any:
            paginator = self.client.get_paginator("list_parts")
            return paginator.paginate(Bucket=bucket, Key=key, UploadId=upload_id)

        return [
            PartInfo(int(p["PartNumber"]), int(p["Size"]), _strip(p["ETag"]))
            for page in self._pages("ListParts", bucket, pages)
            for p in page.get("Parts", [])
        ]

    def complete_multipart(
        self, bucket: str, key: str, upload_id: str, etags: Sequence[str]
    ) -> None:
        parts = [{"PartNumber": i + 1, "ETag": f'"{e}"'} for i, e in enumerate(etags)]
        self._call(
            "CompleteMultipartUpload",
            bucket,
            lambda: self.client.complete_multipart_upload(
                Bucket=bucket,
                Key=key,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},  # type: ignore[typeddict-item]
            ),
        )

    def abort_multipart(self, bucket: str, key: str, upload_id: str) -> bool:
        try:
            self._call(
                "AbortMultipartUpload",
                bucket,
                lambda: self.client.abort_multipart_upload(
                    Bucket=bucket, Key=key, UploadId=upload_id
                ),
            )
        except NoSuchUpload:
            return False  # already completed or aborted: the contract makes abort idempotent
        return True

    def list_uploads(self, bucket: str, prefix: str = "") -> Iterator[UploadInfo]:
        def pages() -> Any:
            paginator = self.client.get_paginator("list_multipart_uploads")
            return paginator.paginate(Bucket=bucket, Prefix=prefix)

        for page in self._pages("ListMultipartUploads", bucket, pages):
            for u in page.get("Uploads", []):
                yield UploadInfo(str(u["Key"]), str(u["UploadId"]), u.get("Initiated"))

    def list_objects(self, bucket: str, prefix: str = "") -> Iterator[ObjectInfo]:
        def pages() -> Any:
            paginator = self.client.get_paginator("list_objects_v2")
            return paginator.paginate(Bucket=bucket, Prefix=prefix)

        for page in self._pages("ListObjectsV2", bucket, pages):
            for obj in page.get("Contents", []):
                yield ObjectInfo(str(obj["Key"]), int(obj["Size"]), obj.get("LastModified"))


def _strip(etag: str) -> str:
    return etag.strip().strip('"')
