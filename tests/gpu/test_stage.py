"""stage_batch end to end on real S3 (SeaweedFS) into real scratch reservations."""

from __future__ import annotations

import io
import tarfile
import threading
from pathlib import Path
from typing import Any

import pytest

from stagerd.errors import ArchiveRejected, ScratchBudgetExceeded, TransientError
from stagerd.gpu.stage import StageInterrupted, cleanup_scratch, download_archive, stage_batch
from stagerd.job import Job
from stagerd.retry import RetryPolicy
from stagerd.s3.boto import BotoStore
from stagerd.samples.makebatch import BatchInfo, make_batch
from stagerd.scratch.space import ScratchManager

FAST = RetryPolicy(attempts=5, base=0.001, max_delay=0.01, total=10)
MiB = 1024**2


class FlakyClient:
    """A real S3 client whose first *drops* GET bodies reset after one read."""

    def __init__(self, client: Any, drops: int) -> None:
        self._client = client
        self.drops = drops
        self.ranges: list[str] = []

    def head_object(self, **kw: Any) -> Any:
        return self._client.head_object(**kw)

    def get_object(self, **kw: Any) -> Any:
        self.ranges.append(kw["Range"])
        resp = self._client.get_object(**kw)
        if self.drops:
            self.drops -= 1
            body, reads = resp["Body"], [0]

            class Body:
                def read(self, amt: int | None = None) -> bytes:
                    reads[0] += 1
                    if reads[0] > 1:
                        raise ConnectionResetError(104, "Connection reset by peer (injected)")
                    return body.read(amt)  # type: ignore[no-any-return]

                def close(self) -> None:
                    body.close()

            resp = {**resp, "Body": Body()}
        return resp


@pytest.fixture
def scratch(scratch_dir: Path) -> ScratchManager:
    return ScratchManager(scratch_dir, budget=256 * MiB, headroom=0)


def upload_batch(
    tmp_path: Path, s3_client: Any, bucket: str, batch_id: str, files: int = 12, size: int = 300_000
) -> tuple[Job, BatchInfo]:
    info = make_batch(tmp_path / f"{batch_id}.tar", files, seed=7, file_bytes=size)
    job = Job.new(batch_id, file_count=files, size=info.size, sha256=info.sha256)
    s3_client.upload_file(str(info.path), bucket, job.s3_key)
    return job, info


def upload_tar(s3_client: Any, bucket: str, batch_id: str, members: list[tarfile.TarInfo]) -> Job:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for member in members:
            tar.addfile(member, io.BytesIO(b"x" * member.size) if member.size else None)
    job = Job.new(batch_id)
    s3_client.put_object(Bucket=bucket, Key=job.s3_key, Body=buf.getvalue())
    return job


def wavs(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def test_stream_mode_stages_into_input_with_1x_scratch(
    tmp_path: Path, s3_client: Any, s3_bucket: str, scratch: ScratchManager
) -> None:
    job, info = upload_batch(tmp_path, s3_client, s3_bucket, "b-stream")
    progress: list[int] = []
    with scratch.reserve(job.batch_id, info.size) as res:
        result = stage_batch(
            BotoStore(s3_client), s3_bucket, job, res, policy=FAST, on_progress=progress.append,
            range_size=MiB,
        )  # fmt: skip
        assert wavs(res.path / "input") == [f"{i:06d}.wav" for i in range(1, 13)]
        assert not (res.path / "archive.tar").exists()
        # ~1x the archive: only filesystem block rounding of the 300 kB files was added.
        assert info.size < res.nbytes < 1.2 * info.size
        assert (res.path / "input" / "000003.wav").stat().st_size == 300_000
    assert result.archive_bytes == info.size
    assert result.extracted_bytes == 12 * 300_000
    assert result.file_count == 12
    assert result.sha256 == info.sha256
    assert result.seconds > 0
    assert progress[-1] == info.size and progress == sorted(progress)


def test_keep_archive_mode_downloads_then_extracts(
    tmp_path: Path, s3_client: Any, s3_bucket: str, scratch: ScratchManager
) -> None:
    job, info = upload_batch(tmp_path, s3_client, s3_bucket, "b-keep")
    with scratch.reserve(job.batch_id, info.size) as res:
        result = stage_batch(
            BotoStore(s3_client), s3_bucket, job, res, keep_archive=True, policy=FAST
        )
        assert (res.path / "archive.tar").read_bytes() == info.path.read_bytes()
        assert len(wavs(res.path / "input")) == 12
        assert res.nbytes > info.size  # archive + extracted: the reservation was extended
    assert result.sha256 == info.sha256 and result.file_count == 12


@pytest.mark.parametrize("keep", [False, True])
def test_digest_mismatch_never_leaves_input(
    tmp_path: Path, s3_client: Any, s3_bucket: str, scratch: ScratchManager, keep: bool
) -> None:
    job, info = upload_batch(tmp_path, s3_client, s3_bucket, "b-digest")
    wrong = Job.new(job.batch_id, size=info.size, sha256="0" * 64)
    with scratch.reserve(job.batch_id, info.size) as res:
        with pytest.raises(ArchiveRejected, match="SHA-256 mismatch"):
            stage_batch(BotoStore(s3_client), s3_bucket, wrong, res, keep_archive=keep, policy=FAST)
        assert not (res.path / "input").exists()
        assert not (res.path / "archive.tar").exists()  # keep mode: not reusable either


def test_size_mismatch_and_missing_key_are_rejected(
    tmp_path: Path, s3_client: Any, s3_bucket: str, scratch: ScratchManager
) -> None:
    job, info = upload_batch(tmp_path, s3_client, s3_bucket, "b-size")
    with scratch.reserve(job.batch_id, info.size) as res:
        with pytest.raises(ArchiveRejected, match="the job says 5"):
            stage_batch(
                BotoStore(s3_client), s3_bucket, Job.new(job.batch_id, size=5), res, policy=FAST
            )
        with pytest.raises(ArchiveRejected, match="does not exist"):
            stage_batch(BotoStore(s3_client), s3_bucket, Job.new("b-missing"), res, policy=FAST)


def test_hostile_archive_is_rejected_and_input_removed(
    s3_client: Any, s3_bucket: str, scratch: ScratchManager
) -> None:
    ok = tarfile.TarInfo("ok.wav")
    ok.size = 1000
    link = tarfile.TarInfo("evil")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc"
    job = upload_tar(s3_client, s3_bucket, "b-hostile", [ok, link])
    with scratch.reserve(job.batch_id, MiB) as res:
        with pytest.raises(ArchiveRejected, match="symbolic link"):
            stage_batch(BotoStore(s3_client), s3_bucket, job, res, policy=FAST)
        assert not (res.path / "input").exists()


def test_dropped_connections_resume_and_stage_the_same_bytes(
    tmp_path: Path, s3_client: Any, s3_bucket: str, scratch: ScratchManager
) -> None:
    job, info = upload_batch(tmp_path, s3_client, s3_bucket, "b-flaky", files=8, size=MiB)
    flaky = FlakyClient(s3_client, drops=3)
    with scratch.reserve(job.batch_id, info.size) as res:
        store = BotoStore(flaky, "flaky")  # type: ignore[arg-type]
        result = stage_batch(store, s3_bucket, job, res, policy=FAST, range_size=4 * MiB)
        assert len(wavs(res.path / "input")) == 8
    assert result.sha256 == info.sha256
    assert flaky.ranges[:4] == [
        f"bytes=0-{4 * MiB - 1}", f"bytes={MiB}-{4 * MiB - 1}", f"bytes={2 * MiB}-{4 * MiB - 1}",
        f"bytes={3 * MiB}-{4 * MiB - 1}",
    ]  # fmt: skip


def test_planted_input_symlink_is_replaced_not_followed(
    tmp_path: Path, s3_client: Any, s3_bucket: str, scratch: ScratchManager
) -> None:
    job, info = upload_batch(tmp_path, s3_client, s3_bucket, "b-planted", files=2)
    outside = tmp_path / "outside"
    outside.mkdir()
    with scratch.reserve(job.batch_id, info.size) as res:
        (res.path / "input").symlink_to(outside)
        stage_batch(BotoStore(s3_client), s3_bucket, job, res, policy=FAST)
        assert not (res.path / "input").is_symlink()
        assert len(wavs(res.path / "input")) == 2
    assert list(outside.iterdir()) == []


def test_small_files_outgrowing_the_budget_fail_cleanly(
    s3_client: Any, s3_bucket: str, scratch_dir: Path
) -> None:
    members = []
    for i in range(200):
        member = tarfile.TarInfo(f"{i}.wav")
        member.size = 1
        members.append(member)
    job = upload_tar(s3_client, s3_bucket, "b-tiny", members)
    small = ScratchManager(scratch_dir, budget=400 * 1024, headroom=0)
    with small.reserve(job.batch_id, 300 * 1024) as res:
        # 200 one-byte files really cost 200 filesystem blocks (800 KiB) > the 400 KiB budget.
        with pytest.raises(ScratchBudgetExceeded):
            stage_batch(BotoStore(s3_client), s3_bucket, job, res, policy=FAST)
        assert not (res.path / "input").exists()


def test_member_cap_and_stop_event(
    tmp_path: Path, s3_client: Any, s3_bucket: str, scratch: ScratchManager
) -> None:
    job, info = upload_batch(tmp_path, s3_client, s3_bucket, "b-cap")
    with scratch.reserve(job.batch_id, info.size) as res:
        with pytest.raises(ArchiveRejected, match="more than 5 members"):
            stage_batch(BotoStore(s3_client), s3_bucket, job, res, policy=FAST, max_members=5)
        stop = threading.Event()
        stop.set()
        with pytest.raises(StageInterrupted):
            stage_batch(BotoStore(s3_client), s3_bucket, job, res, policy=FAST, stop=stop)
        assert not (res.path / "input").exists()


def test_seed_api_download_archive_and_cleanup_scratch(
    tmp_path: Path,
    s3_client: Any,
    s3_bucket: str,
    stagerd_env: dict[str, str],
    scratch_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    job, info = upload_batch(tmp_path, s3_client, s3_bucket, "b-seed")
    for name, value in stagerd_env.items():
        monkeypatch.setenv(name, value)
    path = download_archive(job.s3_key, job.batch_id)
    assert path == scratch_dir / "b-seed" / "archive.tar"
    assert path.read_bytes() == info.path.read_bytes()
    cleanup_scratch(job.batch_id)
    assert not (scratch_dir / "b-seed").exists()
    cleanup_scratch(job.batch_id)  # idempotent, like the seed's ignore_errors


def test_a_given_head_is_not_fetched_again_and_still_pins_the_reads(
    tmp_path: Path, s3_client: Any, s3_bucket: str, scratch: ScratchManager
) -> None:
    from stagerd.gpu.stage import head_archive

    job, info = upload_batch(tmp_path, s3_client, s3_bucket, "b-head", files=3)
    head = head_archive(BotoStore(s3_client), s3_bucket, job.s3_key)
    methods: list[str] = []
    s3_client.meta.events.register(
        "before-send.s3", lambda request, **_: methods.append(request.method)
    )
    with scratch.reserve(job.batch_id, info.size) as res:
        result = stage_batch(BotoStore(s3_client), s3_bucket, job, res, policy=FAST, head=head)
    assert "HEAD" not in methods and "GET" in methods
    assert result.sha256 == info.sha256
    # A head whose ETag no longer matches the object makes the pinned reads fail.
    stale = type(head)(size=head.size, etag='"0123456789abcdef0123456789abcdef"')
    with (
        scratch.reserve("b-head", info.size) as res,
        pytest.raises(TransientError, match="changed while staging"),
    ):
        stage_batch(BotoStore(s3_client), s3_bucket, job, res, policy=FAST, head=stale)
