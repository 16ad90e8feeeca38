"""The 10,000-small-file archive: upload and stage, where per-member costs dominate.

Targets: stagerd within 1.2x the fastest peer for each, one-shot start-up included (every
contender is a fresh process, interpreter and imports billed to it).
"""

from __future__ import annotations

from bench import data
from bench.context import BenchContext
from bench.model import ScenarioResult
from bench.scenarios.stage import measure_stage
from bench.scenarios.upload import measure_upload


def _archive(ctx: BenchContext) -> data.Archive:
    return data.small_archive(ctx.data_dir, ctx.sizes.small_files, ctx.sizes.small_file_bytes)


def run_upload(ctx: BenchContext) -> ScenarioResult:
    archive = _archive(ctx)
    title = f"Upload an archive of {archive.members:,} small files"
    return measure_upload(ctx, "upload_small", title, archive, limit=1.2, trim_quick=True)


def run_stage(ctx: BenchContext) -> ScenarioResult:
    archive = _archive(ctx)
    title = f"Stage an archive of {archive.members:,} small files"
    return measure_stage(
        ctx, "stage_small", title, archive, limit=1.2, floor_limit=None, trim_quick=True
    )
