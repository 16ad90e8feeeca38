"""The scenarios, in the order a run executes them; each module has ``run(ctx)``."""

from __future__ import annotations

from types import ModuleType

from bench.scenarios import stage, upload

SCENARIOS: dict[str, ModuleType] = {
    "upload": upload,
    "stage": stage,
}
