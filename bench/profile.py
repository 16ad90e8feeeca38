"""``--profile``: what bounds stagerd, by measurement (py-spy), saved beside the results.

After a scenario's measured rounds, one extra stagerd run goes under
``py-spy record --format raw`` (PyPI ``py-spy``, a dev dependency); that run is never one of
the samples, since the sampler costs CPU. Each profiled command is one Python process
(``transfer upload``, ``bench.stage_runner``); add ``--subprocesses`` through
``$BENCH_PYSPY_ARGS`` for a command that forks Python children. From py-spy's collapsed stacks this
module writes, into ``<results-dir>/profiles/``:

- ``<scenario>.svg``: a flame graph (width = share of samples; hover for the frame),
- ``<scenario>-top.txt``: the top functions by self and by inclusive samples,
- ``<scenario>.raw.txt``: the collapsed stacks themselves (for speedscope, flamegraph.pl...).

Samples are of threads running Python or native code (py-spy's default: idle threads are left
out, so the picture is where the CPU goes, which is the bound on two shared cores). Extra
py-spy flags come from ``$BENCH_PYSPY_ARGS`` (e.g. ``--idle`` to see waits too, ``--native``).
Covered: upload, stage, upload_small, stage_small and the --scale runs (one stagerd process
each); the daemons of ``tiny`` are not profiled here.
"""

from __future__ import annotations

import html
import os
import shlex
import shutil
import sys
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.peers import Command

RATE = 199  # samples/s: enough for a 10 s run, cheap enough not to change its shape


@dataclass(frozen=True)
class Spy:
    """Where one profiled run writes its collapsed stacks."""

    raw: Path


def pyspy() -> str | None:
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


def wrap(cmd: Command, spy: Spy | None) -> Command:
    """*cmd* under ``py-spy record`` when *spy* is given, else *cmd* itself."""
    if spy is None:
        return cmd
    exe = pyspy()
    if exe is None:
        raise RuntimeError("py-spy not found (pip install py-spy)")
    argv = [exe, "record", "--format", "raw", "--rate", str(RATE)]
    argv += ["--output", str(spy.raw), *shlex.split(os.environ.get("BENCH_PYSPY_ARGS", ""))]
    return Command([*argv, "--", *cmd.argv], cmd.env)


def maybe_profile(ctx: Any, name: str, run_once: Callable[[Spy], object]) -> str | None:
    """With ``--profile``: run *run_once* under py-spy and write the flame graph and the
    top functions; return a note for the report (None without ``--profile``)."""
    if ctx.profile_dir is None:
        return None
    out = Path(ctx.profile_dir)
    out.mkdir(parents=True, exist_ok=True)
    spy = Spy(out / f"{name}.raw.txt")
    try:
        run_once(spy)
        stacks = read_collapsed(spy.raw)
    except Exception as exc:  # a failed profile must not sink the scenario's measurements
        return f"profile: not taken ({type(exc).__name__}: {str(exc)[:300]})"
    if not stacks:
        return f"profile: py-spy recorded no samples ({spy.raw})"
    svg, top = out / f"{name}.svg", out / f"{name}-top.txt"
    svg.write_text(flamegraph_svg(stacks, f"stagerd, scenario {name}"))
    top.write_text(top_functions(stacks))
    total = sum(stacks.values())
    own: Counter[str] = Counter()
    for stack, count in stacks.items():
        own[stack[-1]] += count
    hot = "; ".join(f"{c / total:.0%} `{frame}`" for frame, c in own.most_common(5))
    where = ", ".join(_shown(x) for x in (svg, top))
    return f"profile (py-spy, one extra run; {where}): top self samples: {hot}"


def _shown(path: Path) -> str:
    """*path* relative to the checkout when it is inside it (the report is committed)."""
    from bench.context import ROOT

    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def read_collapsed(path: Path) -> Counter[tuple[str, ...]]:
    """py-spy's raw output: ``frame;frame;...;leaf COUNT`` per line -> stack -> samples."""
    stacks: Counter[tuple[str, ...]] = Counter()
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks[tuple(stack.split(";"))] += int(count)
    return stacks


def top_functions(stacks: Counter[tuple[str, ...]], n: int = 30) -> str:
    """Top *n* frames by self samples (the leaf) and by inclusive samples (anywhere)."""
    total = sum(stacks.values())
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for stack, count in stacks.items():
        own[stack[-1]] += count
        for frame in set(stack):
            inclusive[frame] += count
    lines = [f"{total} samples at {RATE}/s (threads on CPU; see bench/profile.py)", ""]
    for title, counter in (("self", own), ("inclusive", inclusive)):
        lines += [f"top {n} by {title} samples:", ""]
        lines += [f"{c / total:7.1%}  {c:7d}  {frame}" for frame, c in counter.most_common(n)]
        lines.append("")
    return "\n".join(lines)


def flamegraph_svg(stacks: Counter[tuple[str, ...]], title: str, width: int = 1200) -> str:
    """A self-contained flame graph: root at the bottom, children sorted by name, frames
    narrower than 0.1 px dropped, the full frame and its share in each ``<title>``."""
    tree: dict[str, Any] = {"n": 0, "kids": {}}
    for stack, count in stacks.items():
        node = tree
        node["n"] += count
        for frame in stack:
            node = node["kids"].setdefault(frame, {"n": 0, "kids": {}})
            node["n"] += count
    depth = max((len(s) for s in stacks), default=0) + 1
    row, total = 16, max(1, tree["n"])
    height = depth * row + 40
    scale = (width - 20) / total
    rects: list[str] = []

    def draw(name: str, node: dict[str, Any], x: float, level: int) -> None:
        w = node["n"] * scale
        if w < 0.1:
            return
        y = height - 10 - (level + 1) * row
        hue = 10 + (zlib.crc32(name.encode()) % 40)
        label = html.escape(name)
        share = node["n"] / total
        rects.append(
            f"<g><title>{label} ({node['n']} samples, {share:.1%})</title>"
            f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{row - 1}" '
            f'fill="hsl({hue},80%,60%)"/>'
            + (
                f'<text x="{x + 3:.1f}" y="{y + row - 4}">{html.escape(name[: int(w / 7)])}</text>'
                if w > 30
                else ""
            )
            + "</g>"
        )
        cx = x
        for kid_name in sorted(node["kids"]):
            kid = node["kids"][kid_name]
            draw(kid_name, kid, cx, level + 1)
            cx += kid["n"] * scale

    draw("all", tree, 10.0, 0)
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        'font-family="monospace" font-size="11">'
        f'<text x="10" y="20" font-size="14">{html.escape(title)}: {total} samples</text>'
        + "".join(rects)
        + "</svg>\n"
    )
