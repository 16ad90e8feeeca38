"""start-up: ``stagerd --version`` from the shiv artifact beside ``python3 -c pass``.

The artifact is built by ``build/shiv.sh`` into bench/work/dist (not the repo's dist/, so the
benchmark never replaces an artifact someone is about to ship), and run once untimed: its
first start unpacks the libraries under SHIV_ROOT, which the target ("after the first run")
excludes. Both contenders resolve ``python3`` through the same PATH, as the shebang does.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

from bench.context import ROOT, BenchContext
from bench.measure import Sample
from bench.model import Check, Contender, ScenarioResult, interleave
from bench.peers import Command
from bench.scenarios.common import run_command

NAME = "startup"
SHIV_SH = ROOT / "build" / "shiv.sh"


def run(ctx: BenchContext) -> ScenarioResult:
    rounds = max(ctx.rounds, ctx.sizes.startup_runs)
    python3 = pick_python3(ctx)
    result = ScenarioResult(
        NAME, "Start-up: `stagerd --version`", {"runs": rounds, "python3": python3}
    )
    env = {**ctx.base_env(), "SHIV_ROOT": str(ctx.work / "shiv-root")}
    env["PATH"] = f"{Path(python3).parent}:{env.get('PATH', '')}"
    contenders: list[Contender] = []
    artifact, why = build_artifact(ctx)
    if artifact is None:
        result.notes.append(f"stagerd artifact not measured: {why}")
    else:
        cmd = Command([artifact, "--version"], env)
        run_command(cmd)  # the first run unpacks into SHIV_ROOT: not what is measured
        contenders.append(Contender("stagerd (shiv artifact) --version", _once(cmd), True))
    contenders.append(Contender("python3 -c pass", _once(Command(["python3", "-c", "pass"], env))))
    checkout = Command([ctx.python, "-m", "stagerd", "--version"], env)
    contenders.append(Contender("python -m stagerd --version (checkout)", _once(checkout)))
    result.contenders = interleave(contenders, rounds)
    result.add_ratios()
    if artifact is not None and result.contenders[0].ok:
        median = result.contenders[0].median()
        result.checks.append(Check("artifact --version median", median, "<=", 0.25, "s"))
        result.add_rss_check()
    return result


def pick_python3(ctx: BenchContext) -> str:
    """The interpreter ``/usr/bin/env python3`` should find: $BENCH_PYTHON3, else the system's
    /usr/bin/python3 when it is the build's minor version (what a GPU VM runs), else the venv's
    base interpreter. Never a pyenv shim: its bash wrapper alone costs ~0.2 s per start."""
    if os.environ.get("BENCH_PYTHON3"):
        return os.environ["BENCH_PYTHON3"]
    system = Path("/usr/bin/python3")
    probe = [ctx.python, "-c", "import sys; print(sys.version_info[:2])"]
    mine = subprocess.run(probe, capture_output=True, text=True, check=False).stdout
    if system.exists():
        probe[0] = str(system)
        theirs = subprocess.run(probe, capture_output=True, text=True, check=False).stdout
        if theirs == mine:
            return str(system)
    return str(Path(ctx.python).resolve().parent / "python3")


def _once(cmd: Command) -> Callable[[int], Sample]:
    def once(_round: int) -> Sample:
        return run_command(cmd, timeout=60)[0]

    return once


def build_artifact(ctx: BenchContext) -> tuple[str | None, str]:
    """Build the artifact with build/shiv.sh; (path, "") or (None, why not)."""
    if not SHIV_SH.exists():
        return None, "build/shiv.sh not in this checkout yet"
    out = ctx.work / "dist" / "stagerd"
    env = {**os.environ, "STAGERD_VENV": os.environ.get("STAGERD_VENV", _venv(ctx))}
    proc = subprocess.run(
        [str(SHIV_SH), "-o", str(out), "--work", str(ctx.work / "shiv-build")],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=900,
    )
    if proc.returncode != 0 or not out.exists():
        return None, f"build/shiv.sh failed: {proc.stderr.strip()[-400:]}"
    return str(out), ""


def _venv(ctx: BenchContext) -> str:
    return str(Path(ctx.python).parent.parent)
