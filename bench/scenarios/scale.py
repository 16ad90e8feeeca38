"""The scale set (``python -m bench.run --scale``): upload, resume and stage at 2 and 8 GiB.

Production archives reach 40 GiB; 8 GiB is what fits beside everything else on this VM (the
set needs ~30 GiB free: the 8 GiB archive, its copy in the S3 server, its extraction). Each
scenario runs stagerd at both sizes, interleaved with s5cmd at both sizes (upload and stage:
the server's and the disk's own scaling, as a reference), and reports seconds per GiB and
peak RSS at each size.

Targets: stagerd's seconds per GiB at 8 GiB <= 1.1x its seconds per GiB at 2 GiB (time linear
in size), its peak RSS at 8 GiB <= 1.1x at 2 GiB (flat), <= 200 MB, and for resume bytes
re-sent <= 0.55 of the file at 8 GiB. ``--quick --scale`` runs the same code at 24 and 48 MiB,
where nothing is measured seriously (the test suite uses it to keep the set working).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

from bench import data, peers, profile
from bench.context import BenchContext, GiB, MiB, stagerd_has
from bench.data import Archive
from bench.measure import Sample
from bench.model import Check, Contender, ScenarioResult, interleave
from bench.scenarios import resume, stage, upload
from bench.scenarios.common import with_extra

FULL_SIZES = (2 * GiB, 8 * GiB)
# --quick: the archives the quick profile already generates (stage, resume), big enough for
# resume to see 50% of its 5 MiB parts before the upload ends.
QUICK_SIZES = (24 * MiB, 48 * MiB)
LINEAR_LIMIT = 1.1
FLAT_LIMIT = 1.1


def sizes(ctx: BenchContext) -> tuple[int, int]:
    return QUICK_SIZES if ctx.quick else FULL_SIZES


def label(nbytes: int) -> str:
    """The nominal size an archive was asked for: wav_archive rounds down to whole members
    plus tar headers, so "2 GiB" is 2 GiB minus a member at most."""
    for nominal in (*FULL_SIZES, *QUICK_SIZES):
        if nominal * 0.75 <= nbytes <= nominal:
            nbytes = nominal
            break
    return f"{nbytes / GiB:g} GiB" if nbytes >= GiB else f"{nbytes / MiB:g} MiB"


def _per_gib(sample: Sample, nbytes: int) -> Sample:
    gib = nbytes / GiB
    return with_extra(
        sample,
        s_per_gib=sample.seconds / gib,
        cpu_s_per_gib=None if sample.cpu_seconds is None else sample.cpu_seconds / gib,
        server_cpu_s_per_gib=(
            None if sample.server_cpu_seconds is None else sample.server_cpu_seconds / gib
        ),
    )


def _measured(run: Callable[[int], Sample], nbytes: int) -> Callable[[int], Sample]:
    return lambda r: _per_gib(run(r), nbytes)


def _archives(ctx: BenchContext) -> list[Archive]:
    return [data.wav_archive(ctx.data_dir, n, ctx.sizes.member) for n in sizes(ctx)]


def _result(ctx: BenchContext, name: str, title: str, archives: list[Archive]) -> ScenarioResult:
    at = " and ".join(label(a.size) for a in archives)
    result = ScenarioResult(
        name,
        f"{title} at {at}",
        {f"archive_{i}_bytes": a.size for i, a in enumerate(archives)},
    )
    result.columns = ["cpu_s_per_gib", "server_cpu_s_per_gib"]
    return result


def _finish(result: ScenarioResult, archives: list[Archive], peer: str | None) -> None:
    """Ratios (large/small for stagerd, stagerd/peer at each size) and the scale targets."""
    result.metric = "s_per_gib"
    small, large = (label(a.size) for a in archives)
    mine = {a.size: f"stagerd @ {label(a.size)}" for a in archives}
    ok = {c.name: c for c in result.contenders if c.ok}
    for a in archives:
        theirs = f"{peer} @ {label(a.size)}" if peer else None
        if theirs and mine[a.size] in ok and theirs in ok:
            ratio = ok[mine[a.size]].median("s_per_gib") / ok[theirs].median("s_per_gib")
            result.ratios[f"{mine[a.size]}/{theirs}"] = ratio
    s, big = mine[archives[0].size], mine[archives[1].size]
    if s in ok and big in ok:
        for key, what, limit in (
            ("s_per_gib", "seconds per GiB", LINEAR_LIMIT),
            ("peak_rss", "peak RSS", FLAT_LIMIT),
        ):
            if key == "peak_rss":
                value = max(ok[big].metric(key)) / max(ok[s].metric(key))
            else:
                value = ok[big].median(key) / ok[s].median(key)
            result.ratios[f"{big}/{s} ({what})"] = value
            result.checks.append(
                Check(f"stagerd {what} at {large} / at {small}", value, "<=", limit)
            )
    result.add_rss_check()


def run_upload(ctx: BenchContext) -> ScenarioResult:
    archives = _archives(ctx)
    result = _result(ctx, "scale_upload", "Scale: upload", archives)
    missing = stagerd_has("commands.transfer")
    contenders = []
    for a in archives:
        if missing is None:
            run = _measured(lambda r, a=a: upload._stagerd(ctx, a), a.size)
            contenders.append(Contender(f"stagerd @ {label(a.size)}", run, True))
        peer = _measured(upload._peer_runner(ctx, a, peers.s5cmd_upload), a.size)
        contenders.append(Contender(f"s5cmd cp @ {label(a.size)}", peer))
    if missing:
        result.notes.append(f"stagerd not measured: {missing}")
    result.contenders = interleave(contenders, ctx.rounds)
    _finish(result, archives, "s5cmd cp")
    big = archives[-1]
    if missing is None and (
        note := profile.maybe_profile(
            ctx, "scale_upload", lambda spy: upload._stagerd(ctx, big, spy)
        )
    ):
        result.notes.append(note)
    return result


def run_stage(ctx: BenchContext) -> ScenarioResult:
    archives = _archives(ctx)
    result = _result(ctx, "scale_stage", "Scale: stage", archives)
    missing = stagerd_has("gpu.stage", "scratch")
    if missing:
        result.notes.append(f"stagerd not measured: {missing}")
    with ctx.bucket("sc") as bucket:
        contenders = []
        keys = {}
        for a in archives:
            batch = f"bench-sc-{uuid.uuid4().hex[:8]}"
            keys[a.size] = batch
            ctx.s3_client().upload_file(str(a.path), bucket, f"archives/{batch}.tar")
            if missing is None:
                run = _measured(stage._stagerd(ctx, bucket, batch, a), a.size)
                contenders.append(Contender(f"stagerd @ {label(a.size)}", run, True))
            key = f"archives/{batch}.tar"
            build = lambda d, key=key: peers.s5cmd_stage(ctx, bucket, key, d)  # noqa: E731
            peer = _measured(stage._peer(ctx, build, a), a.size)
            contenders.append(Contender(f"s5cmd cat | tar -x @ {label(a.size)}", peer))
        result.contenders = interleave(contenders, ctx.rounds)
        big = archives[-1]
        if missing is None and (
            note := profile.maybe_profile(
                ctx,
                "scale_stage",
                lambda spy: stage._stagerd(ctx, bucket, keys[big.size], big, spy)(0),
            )
        ):
            result.notes.append(note)
    _finish(result, archives, "s5cmd cat | tar -x")
    return result


def run_resume(ctx: BenchContext) -> ScenarioResult:
    archives = _archives(ctx)
    result = _result(
        ctx, "scale_resume", "Scale: resume after SIGKILL at 50% (rerun time)", archives
    )
    missing = stagerd_has("commands.transfer")
    if missing:
        result.notes.append(f"stagerd not measured: {missing}")
        return result
    contenders = []
    for a in archives:
        runner = resume._runner(ctx, a, resume._stagerd_cmd(ctx, a), stagerd=True)
        contenders.append(Contender(f"stagerd @ {label(a.size)}", _measured(runner, a.size), True))
    result.contenders = interleave(contenders, ctx.rounds)
    result.columns = ["resent_fraction", *result.columns]
    _finish(result, archives, None)
    big = result.contenders[-1]
    if big.ok:
        resent = big.median("resent_fraction")
        result.checks.append(
            Check(
                f"stagerd bytes re-sent / file size at {label(archives[-1].size)}",
                resent,
                "<=",
                0.55,
            )
        )
    return result
