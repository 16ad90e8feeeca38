"""upload: stagerd ``transfer upload --no-enqueue`` beside s5cmd cp, rclone copyto, boto3
``upload_file``, obstore ``put``, the verifying peer (SHA-256 + MD5 beside s5cmd cp) and the
local floor (``cp`` of the file to this disk: no network, no hashing).

Every run gets its own bucket (created and deleted outside the timed region) so no tool ever
finds the object already there, and SeaweedFS gives the disk back after each run.

Targets: stagerd's time <= *limit* x the fastest peer of this run (1.0 for the WAV archive,
1.2 for the small-file one, whose one-shot start-up is included), CPU s/GiB <= 1.3x the
verifying peer's, peak RSS <= 200 MB.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

from bench import data, peers, profile
from bench.context import BenchContext, stagerd_has, sync_disks
from bench.data import Archive
from bench.measure import Sample
from bench.model import Contender, RunFailed, ScenarioResult, interleave
from bench.peers import Command, Uploader
from bench.scenarios.common import clear, last_json, run_command, with_extra

NAME = "upload"


def run(ctx: BenchContext) -> ScenarioResult:
    archive = data.wav_archive(ctx.data_dir, ctx.sizes.big_archive, ctx.sizes.member)
    return measure_upload(ctx, NAME, "Upload a WAV archive (members of WAV size)", archive)


# --quick runs the SDK peers in upload/stage only: on the small-file archive they are the
# same commands, and each costs an interpreter start the smoke run cannot spare.
QUICK_SKIP = ("obstore put", "obstore get | tar -x", "boto3 download_fileobj | tar -x")


def measure_upload(
    ctx: BenchContext,
    name: str,
    title: str,
    archive: Archive,
    limit: float = 1.0,
    trim_quick: bool = False,
) -> ScenarioResult:
    result = ScenarioResult(name, title, _params(archive), nbytes=archive.size)
    contenders: list[Contender] = []
    missing = stagerd_has("commands.transfer")
    if missing:
        result.notes.append(f"stagerd not measured: {missing}")
    else:
        contenders.append(Contender("stagerd", lambda r: _stagerd(ctx, archive), True))
    skip = QUICK_SKIP if ctx.quick and trim_quick else ()
    for peer, (build, role) in peers.uploaders().items():
        if peer not in skip:
            contenders.append(Contender(peer, _peer_runner(ctx, archive, build), role=role))
    if why := peers.obstore_missing():
        result.notes.append(f"obstore not measured: {why}")
    elif skip:
        result.notes.append("obstore not measured: --quick runs it in upload and stage only")
    contenders.append(Contender("local floor (cp to disk)", _floor(ctx, archive), role="floor"))
    result.contenders = interleave(contenders, ctx.rounds)
    result.add_ratios()
    result.add_fastest_check("upload time", limit)
    result.add_cpu_check()
    result.add_rss_check()
    if not missing and (
        note := profile.maybe_profile(ctx, name, lambda spy: _stagerd(ctx, archive, spy))
    ):
        result.notes.append(note)
    return result


def _params(archive: Archive) -> dict[str, object]:
    return {
        "archive_bytes": archive.size,
        "members": archive.members,
        "member_bytes": archive.extracted_bytes // max(1, archive.members),
    }


def _verify(ctx: BenchContext, bucket: str, key: str, archive: Archive) -> None:
    size = ctx.s3_client().head_object(Bucket=bucket, Key=key)["ContentLength"]
    if size != archive.size:
        raise RunFailed(f"uploaded object is {size} bytes, expected {archive.size}")


def _stagerd(ctx: BenchContext, archive: Archive, spy: profile.Spy | None = None) -> Sample:
    batch = f"bench-up-{uuid.uuid4().hex[:8]}"
    with ctx.bucket("up") as bucket:
        scratch = ctx.fresh_dir("upload-scratch")
        argv = ctx.stagerd("transfer", "upload", str(archive.path), "--batch-id", batch)
        cmd = Command([*argv, "--no-enqueue"], ctx.stagerd_env(bucket, scratch))
        sync_disks(ctx)
        sample, out = run_command(profile.wrap(cmd, spy), server=ctx.server_pids)
        _verify(ctx, bucket, f"archives/{batch}.tar", archive)
    report = last_json(out)
    keep = ("uploaded_bytes", "resumed_bytes", "parts", "part_size", "seconds")
    return with_extra(sample, **{k: report.get(k) for k in keep})


def _peer_runner(ctx: BenchContext, archive: Archive, build: Uploader) -> Callable[[int], Sample]:
    def once(_round: int) -> Sample:
        key = f"archives/bench-{uuid.uuid4().hex[:8]}.tar"
        with ctx.bucket("up") as bucket:
            cmd = build(ctx, archive.path, bucket, key)
            sync_disks(ctx)
            sample, _ = run_command(cmd, server=ctx.server_pids)
            _verify(ctx, bucket, key, archive)
        return sample

    return once


def _floor(ctx: BenchContext, archive: Archive) -> Callable[[int], Sample]:
    def once(_round: int) -> Sample:
        dest = ctx.fresh_dir("upload-floor")
        sync_disks(ctx)
        sample, _ = run_command(peers.upload_floor(ctx, archive.path, dest), server=ctx.server_pids)
        clear(ctx, dest)
        return sample

    return once
