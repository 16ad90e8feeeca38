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
