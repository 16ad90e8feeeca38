"""Resumable, verified multipart upload of one local file to one S3 key.

Contract of :func:`upload_file`:

- Idempotent: rerunning it for the same file and key ends with the same object. An object
  already complete (same size, multipart ETag recomputed from the local bytes) is not
  re-sent; an interrupted upload (ListMultipartUploads + ListParts) is continued, each listed
  part verified by MD5 == ETag before it is skipped. S3 is the only state: nothing local is
  needed to resume, so a crash, reboot or another host can pick the upload up.
- Never completes an object whose bytes differ from the file: a listed part that does not
  match is re-sent (the verified ones are kept), an upload with more parts than the file is
  aborted, and a file that changes during the upload (size/mtime/inode) aborts it.
- Small files (one part, at most ``SINGLE_PUT_MAX``) go up in one PutObject with
  Content-MD5, whose ETag is checked against the bytes read: two requests instead of six,
  which is what makes a stream of tiny batches fast. They need no resume.
- Memory is bounded: at most ``concurrency`` parts are in flight, each streamed from the
  file, and the reader that computes SHA-256 stays at most ``concurrency`` parts ahead.
- Errors: :class:`PermanentError` (403, NoSuchBucket, a changed file) fails at once;
  transient ones are retried per part by the :class:`RetryPolicy`, and if they persist
  surface as :class:`TransientError`; a set *stop* event ends it with
  :class:`UploadInterrupted`, leaving the upload in S3 to resume.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import TypeVar

from stagerd.errors import BatchIdReused, NoSuchUpload, ObjectNotFound, PermanentError
from stagerd.log import get_logger
from stagerd.progress import NullProgress, Progress
from stagerd.s3.partio import (
    FileSlice,
    Part,
    SequentialHasher,
    multipart_etag,
    plan_part_size,
    split_parts,
    verify_layout,
)
from stagerd.s3.parts import (
    PART_SIZE_META,
    FileState,
    StaleUpload,
    UploadInterrupted,
    UploadOptions,
    UploadResult,
    UploadTarget,
    either,
    strip_etag,
)
from stagerd.s3.store import ObjectHead, PartInfo, UploadInfo

T = TypeVar("T")
__all__ = [
    "PART_SIZE_META",
    "UploadInterrupted",
    "UploadOptions",
    "UploadResult",
    "UploadTarget",
    "upload_file",
]

log = get_logger(__name__)
# A file this small is read into memory and sent in one request (see the contract above).
SINGLE_PUT_MAX = 16 * 1024 * 1024
# Concurrent runs of one file can make each other's uploads vanish; each round re-lists,
# so a few rounds settle any realistic race without looping on a server that misbehaves.
VANISHED_ROUNDS = 4
_EPOCH = datetime.fromtimestamp(0, timezone.utc)  # an upload listed without its start time


def upload_file(
    target: UploadTarget,
    path: Path,
    options: UploadOptions,
    *,
    stop: threading.Event | None = None,
    progress: Progress | None = None,
) -> UploadResult:
    """Upload *path* to *target* (see the module contract). Raises StagerdError subclasses
    and OSError (unreadable file)."""
    return _Uploader(target, path, options, stop or threading.Event(), progress).run()


class _Uploader:
    def __init__(
        self,
        target: UploadTarget,
        path: Path,
        options: UploadOptions,
        stop: threading.Event,
        progress: Progress | None,
    ) -> None:
        self.t = target
        self.path = path
        self.opts = options
        self.stop = stop
        self.progress: Progress = progress or NullProgress()
        self.state = FileState.of(path)
        self.part_size = plan_part_size(self.state.size, options.part_size, options.max_parts)
        self.parts = split_parts(self.state.size, self.part_size)

    def run(self) -> UploadResult:
        if not self.opts.force:
            done = self._existing_object()
            if done is None and self.opts.keep_existing:
                done = self._refuse_if_present()
            if done is not None:
                return done
        if len(self.parts) == 1 and self.state.size <= SINGLE_PUT_MAX:
            return self._put_whole()
        for _ in range(VANISHED_ROUNDS - 1):
            try:
                return self._resume_or_start()
            except NoSuchUpload:
                pass
            # A concurrent run for the same file completed (or aborted) the upload we were
            # listing or adding parts to, at any step from ListParts to Complete: accept
            # its object if it matches, else look again (it may have started a newer one).
            log.info(
                "upload of s3://%s/%s vanished; checking the object", self.t.bucket, self.t.key
            )
            done = self._existing_object()
            if done is not None:
                return done
        return self._resume_or_start()

    def _resume_or_start(self) -> UploadResult:
        upload_id, listed = self._find_resumable()
        try:
            return self._upload(upload_id, listed)
        except StaleUpload as why:
            assert upload_id is not None
            log.warning(
                "aborting stale upload of s3://%s/%s: %s; starting clean",
                self.t.bucket,
                self.t.key,
                why,
                extra={"upload_id": upload_id},
            )
            self._abort(upload_id)
            return self._upload(None, {})

    def _existing_object(self) -> UploadResult | None:
        head = self._head()
        if head is None or head.size != self.state.size:
            return None
        try:
            part_size = int(head.metadata.get(PART_SIZE_META, ""))
        except ValueError:
            return None  # not ours (or pre-metadata): cannot verify it cheaply, re-send
        etag = strip_etag(head.etag)
        matched = verify_layout(self.path, self.state.size, part_size, etag, self._check_stop)
        if matched is None:
            log.info("s3://%s/%s exists but differs from the file", self.t.bucket, self.t.key)
            return None
        sha256, nparts = matched
        log.info("s3://%s/%s already complete and verified", self.t.bucket, self.t.key)
        self.progress.advance(self.state.size)
        return self._result(sha256, etag, self.state.size, (nparts, part_size), complete=True)

    def _refuse_if_present(self) -> UploadResult | None:
        """Batch ids are immutable: an object that is not this file is never overwritten.
        One that appeared since the first look may be a concurrent run of this very file
        finishing: verified again, it is accepted if it is this file. None: no object."""
        head = self._head()
        if head is None:
            return None
        done = self._existing_object()
        if done is not None:
            return done
        raise BatchIdReused(
            f"batch id already holds a different archive: s3://{self.t.bucket}/{self.t.key} is "
            f"{head.size} bytes and differs from {self.path} "
            f"({self.state.size} bytes); nothing was changed (--force replaces it and the "
            "batch is processed again)"
        )

    def _head(self) -> ObjectHead | None:
        def head() -> ObjectHead | None:
            try:
                return self.t.store.head(self.t.bucket, self.t.key)
            except ObjectNotFound:
                return None

        return self._call("HeadObject", head)

    def _put_whole(self) -> UploadResult:
        """One PutObject for a small file; md5 and sha256 come from the very bytes sent."""
        self._check_stop()
        data = self.path.read_bytes()
        if len(data) != self.state.size or FileState.of(self.path) != self.state:
            raise PermanentError(f"{self.path} changed while it was being read; not uploaded")
        md5 = hashlib.md5(data)
        metadata = {**self.opts.metadata, PART_SIZE_META: str(self.part_size)}
        etag = self._call(
            "PutObject",
            lambda: self.t.store.put(
                self.t.bucket,
                self.t.key,
                data,
                content_md5=base64.b64encode(md5.digest()).decode(),
                metadata=metadata,
                content_type="application/x-tar",
            ),
        )
        if etag != md5.hexdigest():
            raise PermanentError(
                f"s3://{self.t.bucket}/{self.t.key}: ETag {etag} after PutObject, "
                f"expected {md5.hexdigest()}"
            )
        self.progress.advance(self.state.size)
        return self._result(hashlib.sha256(data).hexdigest(), etag, 0)

    def _find_resumable(self) -> tuple[str | None, dict[int, PartInfo]]:
        def newest() -> UploadInfo | None:
            uploads = self.t.store.list_uploads(self.t.bucket, self.t.key)
            mine = [u for u in uploads if u.key == self.t.key]
            # Several uploads happen after crashes during CreateMultipartUpload or
            # concurrent runs; the newest is the one most likely to hold our parts.
            return max(mine, key=lambda u: u.initiated or _EPOCH) if mine else None

        upload = self._call("ListMultipartUploads", newest)
        if upload is None:
            return None, {}
        upload_id = upload.upload_id

        def parts() -> dict[int, PartInfo]:
            listed = self.t.store.list_parts(self.t.bucket, self.t.key, upload_id)
            return {p.number: p for p in listed}

        listed = self._call("ListParts", parts)
        log.info(
            "resuming upload of s3://%s/%s: %d part(s) already in S3",
            self.t.bucket,
            self.t.key,
            len(listed),
            extra={"upload_id": upload_id},
        )
        return upload_id, listed

    def _upload(self, upload_id: str | None, listed: dict[int, PartInfo]) -> UploadResult:
        if any(n > len(self.parts) for n in listed):
            raise StaleUpload("it has more parts than the file")
        if upload_id is None:
            upload_id = self._create()
        etags, resumed, sha256 = self._send_parts(upload_id, listed)
        if FileState.of(self.path) != self.state:
            self._abort(upload_id)
            raise PermanentError(f"{self.path} changed while it was being uploaded; not completed")
        ordered = [etags[p.number] for p in self.parts]
        etag = self._complete(upload_id, ordered)
        return self._result(sha256, etag, resumed)

    def _send_parts(
        self, upload_id: str, listed: dict[int, PartInfo]
    ) -> tuple[dict[int, str], int, str]:
        """Hash every part in order; skip verified listed parts, send the others."""
        etags: dict[int, str] = {}
        resumed = 0
        cancel = threading.Event()
        slots = threading.Semaphore(self.opts.concurrency)
        pending: set[Future[tuple[int, str]]] = set()
        pool = ThreadPoolExecutor(self.opts.concurrency, thread_name_prefix="part")
        try:
            with SequentialHasher(self.path) as hasher:
                for part in self.parts:
                    have = listed.get(part.number)
                    md5 = hasher.read_part(part, md5=have is not None)
                    if have is not None and have.size == part.length and have.etag == md5:
                        etags[part.number] = have.etag
                        resumed += part.length
                        self.progress.advance(part.length)
                        continue
                    if have is not None:
                        # Listed but not this file's bytes (a body cut mid-flight that the
                        # server kept, as moto does; another file's upload): re-sent under
                        # its number, which replaces it. Every kept part is verified.
                        log.info("part %d does not match the file: re-sending it", part.number)
                    self._wait_for_slot(slots, pending, etags)
                    pending.add(pool.submit(self._send_part, upload_id, part, cancel, slots))
                sha256 = hasher.sha256()
            for fut in pending:
                number, etag = fut.result()
                etags[number] = etag
        except BaseException:
            cancel.set()
            self._check_stop()  # a stop makes in-flight parts fail with Cancelled: say why
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        self._check_stop()
        return etags, resumed, sha256

    def _wait_for_slot(
        self,
        slots: threading.Semaphore,
        pending: set[Future[tuple[int, str]]],
        etags: dict[int, str],
    ) -> None:
        # Poll so a failed part or a stop request is noticed while all slots are busy.
        while True:
            got = slots.acquire(timeout=0.2)
            for fut in [f for f in pending if f.done()]:
                pending.discard(fut)
                number, etag = fut.result()  # re-raises the part's error
                etags[number] = etag
            if got:
                break
            self._check_stop()
        self._check_stop()

    def _send_part(
        self, upload_id: str, part: Part, cancel: threading.Event, slots: threading.Semaphore
    ) -> tuple[int, str]:
        try:
            cancelled = either(cancel, self.stop)
            with FileSlice(self.path, part.offset, part.length, cancelled) as body:
                etag = self._call(
                    f"UploadPart {part.number}/{len(self.parts)}",
                    lambda: self.t.store.upload_part(
                        self.t.bucket, self.t.key, upload_id, part.number, body, part.length
                    ),
                )
        finally:
            slots.release()
        self.progress.advance(part.length)
        return part.number, etag

    def _create(self) -> str:
        metadata = {**self.opts.metadata, PART_SIZE_META: str(self.part_size)}
        return self._call(
            "CreateMultipartUpload",
            lambda: self.t.store.create_multipart(
                self.t.bucket, self.t.key, metadata=metadata, content_type="application/x-tar"
            ),
        )

    def _complete(self, upload_id: str, etags: list[str]) -> str:
        expected = multipart_etag(etags)
        # NoSuchUpload: a concurrent run for the same file (or our own retried request) may
        # have completed this very upload; the HEAD below decides.
        with contextlib.suppress(NoSuchUpload):
            self._call(
                "CompleteMultipartUpload",
                lambda: self.t.store.complete_multipart(
                    self.t.bucket, self.t.key, upload_id, etags
                ),
            )
        head = self._head()
        if head is None or head.size != self.state.size:
            raise PermanentError(
                f"s3://{self.t.bucket}/{self.t.key}: object size after upload is "
                f"{None if head is None else head.size}, expected {self.state.size}"
            )
        etag = strip_etag(head.etag)
        if "-" in etag and etag != expected:
            raise PermanentError(
                f"s3://{self.t.bucket}/{self.t.key}: ETag {etag} after upload, expected {expected}"
            )
        return etag

    def _abort(self, upload_id: str) -> None:
        self._call(
            "AbortMultipartUpload",
            lambda: self.t.store.abort_multipart(self.t.bucket, self.t.key, upload_id),
        )

    def _result(
        self, sha256: str, etag: str, resumed: int, layout: tuple[int, int] | None = None,
        *, complete: bool = False,
    ) -> UploadResult:  # fmt: skip
        """This run's result: *resumed* bytes were in S3 already, the rest were sent;
        *layout* is (parts, part size) when the object's own differs from this run's."""
        parts, part_size = layout or (len(self.parts), self.part_size)
        size = self.state.size
        return UploadResult(
            size, sha256, etag, parts, part_size, uploaded_bytes=size - resumed,
            resumed_bytes=resumed, already_complete=complete,
        )  # fmt: skip

    def _check_stop(self) -> None:
        if self.stop.is_set():
            raise UploadInterrupted(
                f"upload of {self.path} stopped; rerun to resume from the parts in S3"
            )

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        """Run one store request under the retry policy (the store raised stagerd errors)."""
        return self.opts.policy.call(fn, what=f"S3 {what}", stop=self.stop)
