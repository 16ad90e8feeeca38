"""stage: download + verify + extract, stagerd streaming beside pipelines and the naive flow.

Peers: ``s5cmd cat | tar -x``, ``rclone cat | tar -x``, boto3 ``download_fileobj`` (its
concurrent ranged GETs, reordered) ``| tar -x``, obstore ``get`` ``| tar -x``, the verifying
peer ``s5cmd cat | tee >(sha256sum) | tar -x`` (digest checked: what stagerd verifies), the
seed's naive flow (boto3 ``download_file`` then ``tarfile.extractall``) and the local floor
``cat archive | tar -x`` (no network: what the disk alone allows). The archive is uploaded once
per scenario; every run extracts into its own empty scratch dir, whose allocated bytes are
polled for the peak.

Targets: stagerd's time <= *limit* x the fastest peer pipeline of this run (1.0; 1.2 for the
small-file archive) and <= *floor_limit* x the local floor (1.25, WAV archive only); CPU s/GiB
<= 1.3x the verifying peer's; the naive flow's 0.5x; peak scratch <= 1.05x the extracted
size; peak RSS <= 200 MB.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path

from bench import data, peers, profile
from bench.context import BenchContext, stagerd_has, sync_disks
from bench.data import Archive
from bench.measure import Sample, tree_bytes
from bench.model import Check, Contender, RunFailed, ScenarioResult, interleave
from bench.peers import Command
from bench.scenarios.common import clear, dir_stats, last_json, run_command, with_extra
from bench.scenarios.upload import QUICK_SKIP

NAME = "stage"


def run(ctx: BenchContext) -> ScenarioResult:
    archive = data.wav_archive(ctx.data_dir, ctx.sizes.big_archive, ctx.sizes.member)
    return measure_stage(ctx, NAME, "Stage (download + verify + extract) a WAV archive", archive)


NAIVE = "naive (boto3 download_file + extractall)"


def measure_stage(
    ctx: BenchContext,
    name: str,
    title: str,
    archive: Archive,
    limit: float = 1.0,
    floor_limit: float | None = 1.25,
    trim_quick: bool = False,
) -> ScenarioResult:
    result = ScenarioResult(
        name,
        title,
        {
            "archive_bytes": archive.size,
            "members": archive.members,
            "extracted_bytes": archive.extracted_bytes,
        },
        nbytes=archive.size,
    )
    batch = f"bench-st-{uuid.uuid4().hex[:8]}"
    key = f"archives/{batch}.tar"
    with ctx.bucket("st") as bucket:
        ctx.s3_client().upload_file(str(archive.path), bucket, key)
        contenders: list[Contender] = []
        missing = stagerd_has("gpu.stage", "scratch")
        if missing:
            result.notes.append(f"stagerd not measured: {missing}")
        else:
            contenders.append(Contender("stagerd", _stagerd(ctx, bucket, batch, archive), True))
        pipes: dict[str, tuple[Callable[[Path], Command], str]] = {
            "s5cmd cat | tar -x": (lambda d: peers.s5cmd_stage(ctx, bucket, key, d), "peer"),
            "rclone cat | tar -x": (lambda d: peers.rclone_stage(ctx, bucket, key, d), "peer"),
            "boto3 download_fileobj | tar -x": (
                lambda d: peers.boto3_stage(ctx, bucket, key, d),
                "peer",
            ),
            "obstore get | tar -x": (lambda d: peers.obstore_stage(ctx, bucket, key, d), "peer"),
            peers.VERIFYING_STAGE: (
                lambda d: peers.verifying_stage(ctx, bucket, key, d, archive.sha256),
                "verify",
            ),
            NAIVE: (lambda d: peers.naive_stage(ctx, bucket, key, d), "peer"),
            "local floor (cat | tar -x)": (
                lambda d: peers.local_floor(ctx, archive.path, d),
                "floor",
            ),
        }
        if why := peers.obstore_missing():
            del pipes["obstore get | tar -x"]
            result.notes.append(f"obstore not measured: {why}")
        elif ctx.quick and trim_quick:
            for skipped in QUICK_SKIP:
                pipes.pop(skipped, None)
            result.notes.append("obstore not measured: --quick runs it in upload and stage only")
        for peer, (build, role) in pipes.items():
            contenders.append(Contender(peer, _peer(ctx, build, archive), role=role))
        result.contenders = interleave(contenders, ctx.rounds)
        if not missing and (
            note := profile.maybe_profile(
                ctx, name, lambda spy: _stagerd(ctx, bucket, batch, archive, spy)(0)
            )
        ):
            result.notes.append(note)
    result.add_ratios()
    _checks(result, missing is None, limit, floor_limit)
    return result


def _checks(
    result: ScenarioResult, measured: bool, limit: float, floor_limit: float | None
) -> None:
    if not measured or not result.contender("stagerd").ok:
        return
    result.add_fastest_check("stage time", limit)
    if floor_limit is not None:
        result.add_fastest_check("stage time", floor_limit, roles=("floor",))
    result.add_cpu_check()
    # The seed's flow, the first issue's target (downloads, then extracts: two passes).
    ratio = result.ratios.get(f"stagerd/{NAIVE}", float("nan"))
    result.checks.append(Check(f"stage time vs {NAIVE}", ratio, "<=", 0.5))
    worst = max(s.extra["scratch_over_extracted"] for s in result.contender("stagerd").samples)
    result.checks.append(Check("stagerd peak scratch / extracted size on disk", worst, "<=", 1.05))
    result.add_rss_check()


def _expect(path: Path, archive: Archive) -> None:
    files, size = dir_stats(path)
    if (files, size) != (archive.members, archive.extracted_bytes):
        raise RunFailed(
            f"extracted {files} files / {size} bytes into {path}, "
            f"expected {archive.members} / {archive.extracted_bytes}"
        )


def _stagerd(
    ctx: BenchContext, bucket: str, batch: str, archive: Archive, spy: profile.Spy | None = None
) -> Callable[[int], Sample]:
    def once(_round: int) -> Sample:
        scratch = ctx.fresh_dir("stage-stagerd")
        env = ctx.stagerd_env(bucket, scratch)
        cmd = Command([ctx.python, "-m", "bench.stage_runner", batch, archive.sha256], env)
        sync_disks(ctx)
        cmd = profile.wrap(cmd, spy)
        sample, out = run_command(cmd, scratch=[scratch], server=ctx.server_pids)
        _expect(scratch / batch / "input", archive)
        # What the members occupy on disk once extracted (blocks, not lengths: 10,000 2 KiB
        # files take 4 KiB each), the floor any staging must reach.
        allocated = tree_bytes(scratch / batch / "input")
        clear(ctx, scratch)
        report = last_json(out)
        return with_extra(
            sample,
            extracted_bytes=report.get("extracted_bytes"),
            extracted_allocated=allocated,
            scratch_over_extracted=sample.peak_scratch / allocated,
        )

    return once


def _peer(
    ctx: BenchContext, build: Callable[[Path], Command], archive: Archive
) -> Callable[[int], Sample]:
    def once(_round: int) -> Sample:
        scratch = ctx.fresh_dir("stage-peer")
        sync_disks(ctx)
        sample, _ = run_command(build(scratch), scratch=[scratch], server=ctx.server_pids)
        naive_input = scratch / "input"
        _expect(naive_input if naive_input.exists() else scratch, archive)
        clear(ctx, scratch)
        return sample

    return once
