"""The object store edge: everything stagerd asks of S3, as one typed interface.

:class:`ObjectStore` is the contract; :class:`stagerd.s3.boto.BotoStore` is the one
implementation (boto3), and the only place in stagerd that knows botocore's errors.

Errors. Every method raises only stagerd errors, each quoting the operation, the bucket,
the endpoint and the server's own code and message (never a credential):

- :class:`~stagerd.errors.ObjectNotFound` (permanent): the key does not exist (HTTP 404);
  :class:`~stagerd.errors.BucketNotFound` (permanent): NoSuchBucket;
  :class:`~stagerd.errors.NoSuchUpload` (permanent): the multipart upload id is unknown.
- :class:`~stagerd.errors.ObjectChanged` (permanent for the request): an ``If-Match``
  read found a new version (HTTP 412); staging retries the job from a fresh HEAD.
- :class:`~stagerd.errors.TransientError`: 5xx, throttling, a body damaged in flight, a
  refused/reset/timed-out connection. Retrying can help.
- :class:`~stagerd.errors.PermanentError`: everything else the server refuses, including
  403 (retrying with the same credentials cannot succeed; see ``stagerd.s3.boto``).

Retries. A store call is one logical request: it makes at most ``S3_MAX_ATTEMPTS``
(``STAGERD_S3_MAX_ATTEMPTS``, default 2) HTTP attempts, botocore's own retries. stagerd's
:class:`~stagerd.retry.RetryPolicy` is applied by the caller around a call (the caller
knows how to rewind a body or where a range resumes), so one operation makes at most
``policy.attempts * S3_MAX_ATTEMPTS`` HTTP attempts: a part upload under the transfer's
default policy (8 attempts) at most 16, where botocore's 5 under it made 40. botocore keeps
2, not 1, so a connection the server closed between requests (a stale keep-alive socket)
costs a retry inside the call rather than a back-off of the policy.

Idempotence. Reads and lists are safe. :meth:`put` and :meth:`upload_part` may be
repeated (the last write wins, same bytes give the same object or part).
:meth:`abort_multipart` is idempotent: aborting an unknown upload is not an error.
:meth:`complete_multipart` repeated after a success either succeeds again or raises
NoSuchUpload (servers differ); the caller HEADs the object to know. :meth:`create_multipart`
is not idempotent: each call starts a new upload (an orphan is swept by the janitor).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol


@dataclass(frozen=True)
class ObjectHead:
    """HEAD of an object. ``etag`` is as the server sent it, quotes included (If-Match)."""

    size: int
    etag: str
    metadata: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class PartInfo:
    """A part of an in-progress multipart upload; ``etag`` without quotes."""

    number: int
    size: int
    etag: str


@dataclass(frozen=True)
class UploadInfo:
    """An in-progress multipart upload."""

    key: str
    upload_id: str
    initiated: datetime | None


@dataclass(frozen=True)
class ObjectInfo:
    """One entry of an object listing."""

    key: str
    size: int
    last_modified: datetime | None


class Body(Protocol):
    """The streaming body of a GET (read in pieces, then closed)."""

    def read(self, amt: int | None = ..., /) -> bytes: ...

    def close(self) -> None: ...


class PartBody(Protocol):
    """A seekable, sized body for a part upload (see :class:`stagerd.s3.partio.FileSlice`)."""

    def read(self, n: int = ..., /) -> bytes: ...

    def seek(self, pos: int, whence: int = ..., /) -> int: ...

    def tell(self) -> int: ...


class ObjectStore(Protocol):
    """What stagerd needs of S3 (see the module docstring for errors, retries, idempotence).

    Keys and bucket names are passed per call; ``endpoint`` is for messages only.
    """

    @property
    def endpoint(self) -> str: ...

    def head_bucket(self, bucket: str) -> None:
        """Succeeds when the bucket exists and the credentials may use it; raises
        BucketNotFound for a missing bucket."""

    def head(self, bucket: str, key: str) -> ObjectHead:
        """Size, ETag and user metadata. Raises ObjectNotFound for a missing key."""

    def get_range(
        self, bucket: str, key: str, start: int, end: int, *, if_match: str | None = None
    ) -> Body:
        """Bytes ``[start, end]`` (inclusive) as a stream; with *if_match* a replaced object
        raises ObjectChanged. Errors while reading the body are mapped the same way."""

    def get(self, bucket: str, key: str) -> bytes:
        """A small object's whole body. Raises ObjectNotFound for a missing key."""

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
        """Store *body* under *key*; the ETag without quotes."""

    def delete(self, bucket: str, key: str) -> None:
        """Remove *key* (a missing key is not an error, as in S3)."""

    def create_multipart(
        self,
        bucket: str,
        key: str,
        *,
        metadata: Mapping[str, str] | None = None,
        content_type: str | None = None,
    ) -> str:
        """Start a multipart upload; its upload id."""

    def upload_part(
        self, bucket: str, key: str, upload_id: str, number: int, body: PartBody, length: int
    ) -> str:
        """Send part *number* (1-based) of *length* bytes; its ETag without quotes."""

    def list_parts(self, bucket: str, key: str, upload_id: str) -> list[PartInfo]:
        """Every part the upload holds (all pages). Raises NoSuchUpload."""

    def complete_multipart(
        self, bucket: str, key: str, upload_id: str, etags: Sequence[str]
    ) -> None:
        """Assemble parts ``1..len(etags)`` (ETags without quotes). Raises NoSuchUpload."""

    def abort_multipart(self, bucket: str, key: str, upload_id: str) -> bool:
        """Abort the upload: True if it was aborted, False if it was already gone."""

    def list_uploads(self, bucket: str, prefix: str = "") -> Iterator[UploadInfo]:
        """In-progress uploads under *prefix*, page by page (errors mapped mid-iteration)."""

    def list_objects(self, bucket: str, prefix: str = "") -> Iterator[ObjectInfo]:
        """Objects under *prefix*, page by page (errors mapped mid-iteration)."""
