"""upload: stagerd ``transfer upload --no-enqueue`` beside s5cmd cp, rclone copyto, boto3.

Every run gets its own bucket (created and deleted outside the timed region) so no tool ever
finds the object already there, and SeaweedFS gives the disk back after each run.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

from bench import data
from bench.context import BenchContext, stagerd_has, sync_disks
from bench.data import Archive
from bench.measure import Sample
from bench.model import Check, Contender, RunFailed, ScenarioResult, interleave
from bench.peers import UPLOADERS, Command, Uploader
from bench.scenarios.common import last_json, run_command, with_extra

NAME = "upload"


def run(ctx: BenchContext) -> ScenarioResult:
    archive = data.wav_archive(ctx.data_dir, ctx.sizes.big_archive, ctx.sizes.member)
    return measure_upload(ctx, NAME, "Upload a WAV archive (members of WAV size)", archive)


def measure_upload(ctx: BenchContext, name: str, title: str, archive: Archive) -> ScenarioResult:
    result = ScenarioResult(name, title, _params(archive))
    contenders: list[Contender] = []
    missing = stagerd_has("commands.transfer")
    if missing:
        result.notes.append(f"stagerd not measured: {missing}")
    else:
        contenders.append(Contender("stagerd", lambda r: _stagerd(ctx, archive), True))
    for peer, build in UPLOADERS.items():
        contenders.append(Contender(peer, _peer_runner(ctx, archive, build)))
    result.contenders = interleave(contenders, ctx.rounds)
    result.add_ratios()
    peers = [c.median() for c in result.contenders if not c.is_stagerd and c.ok]
    if not missing and result.contender("stagerd").ok and peers:
        fastest = min(peers)
        ratio = result.contender("stagerd").median() / fastest
        result.checks.append(Check("upload time vs fastest peer", ratio, "<=", 1.0))
    result.add_rss_check()
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


def _stagerd(ctx: BenchContext, archive: Archive) -> Sample:
    batch = f"bench-up-{uuid.uuid4().hex[:8]}"
    with ctx.bucket("up") as bucket:
        scratch = ctx.fresh_dir("upload-scratch")
        argv = ctx.stagerd("transfer", "upload", str(archive.path), "--batch-id", batch)
        cmd = Command([*argv, "--no-enqueue"], ctx.stagerd_env(bucket, scratch))
        sync_disks(ctx)
        sample, out = run_command(cmd)
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
            sample, _ = run_command(cmd)
            _verify(ctx, bucket, key, archive)
        return sample

    return once
