"""The scenarios, in the order a run executes them: name -> run(ctx) -> ScenarioResult."""

from __future__ import annotations

from collections.abc import Callable

from bench.context import BenchContext
from bench.model import ScenarioResult
from bench.scenarios import (
    janitor,
    prefetch,
    results,
    resume,
    scale,
    smallfiles,
    stage,
    startup,
    tiny,
    upload,
)

SCENARIOS: dict[str, Callable[[BenchContext], ScenarioResult]] = {
    "upload": upload.run,
    "stage": stage.run,
    "upload_small": smallfiles.run_upload,
    "stage_small": smallfiles.run_stage,
    "resume": resume.run,
    "tiny": tiny.run,
    "janitor": janitor.run,
    "startup": startup.run,
    "prefetch_1to3": prefetch.run_1to3,
    "prefetch_1to1": prefetch.run_1to1,
    "results_1m": results.run,
}

# ``python -m bench.run --scale``: opt-in, ~30 minutes and ~30 GiB of disk (bench/scenarios/scale.py).
SCALE_SCENARIOS: dict[str, Callable[[BenchContext], ScenarioResult]] = {
    "scale_upload": scale.run_upload,
    "scale_resume": scale.run_resume,
    "scale_stage": scale.run_stage,
}
