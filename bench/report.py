"""Write the results: a JSON document per run, ``latest.json``, and REPORT.md with PNG plots.

The report quotes ratios (stagerd / peer, medians over interleaved rounds) first, absolute
times second: on a shared two-core machine the absolute numbers drift from run to run, the
ratios measured side by side do not. ``bench/analysis.md`` (hand-written: what bounds each
result) is appended verbatim when present.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bench.context import ROOT, BenchContext
from bench.model import ContenderResult, ScenarioResult

ANALYSIS = ROOT / "bench" / "analysis.md"


def _git_commit() -> str:
    proc = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    )
    return proc.stdout.strip() or "unknown"


def document(
    ctx: BenchContext, results: list[ScenarioResult], started: datetime, host: dict[str, Any]
) -> dict[str, Any]:
    checks = [{"scenario": r.name, **c.to_dict()} for r in results for c in r.checks]
    return {
        "started_at": started.isoformat(),
        "finished_at": datetime.now(timezone.utc).isoformat(),
        "quick": ctx.quick,
        "scale": ctx.scale,
        "rounds": ctx.rounds,
        "s3": ctx.s3.name,
        "git_commit": _git_commit(),
        "host": host,
        "scenarios": [r.to_dict() for r in results],
        "summary": {
            "checks": checks,
            "passed": sum(1 for c in checks if c["passed"]),
            "failed": sum(1 for c in checks if not c["passed"]),
        },
    }


def _fastest_peer(scenario: dict[str, Any]) -> dict[str, Any] | None:
    rows = [
        c
        for c in scenario["contenders"]
        if not c["is_stagerd"]
        and not c.get("error")
        and c.get("role", "peer") in ("peer", "verify")
    ]
    return min(rows, key=lambda c: c["median_seconds"] or math.inf, default=None)


def beside(doc: dict[str, Any], other: dict[str, Any], source: str) -> dict[str, Any]:
    """This run's scenarios next to the same scenarios of *other* (e.g. Swift beside
    SeaweedFS): stagerd's median, the fastest peer's, their ratio, on each server."""
    theirs = {s["name"]: s for s in other.get("scenarios", [])}
    rows = []
    for mine in doc["scenarios"]:
        there = theirs.get(mine["name"])
        if there is None:
            continue
        row: dict[str, Any] = {"scenario": mine["name"]}
        for side, scenario in (("here", mine), ("there", there)):
            stagerd = next((c for c in scenario["contenders"] if c["is_stagerd"]), None)
            best = _fastest_peer(scenario)
            row[f"{side}_stagerd_seconds"] = stagerd and stagerd["median_seconds"]
            row[f"{side}_fastest_peer"] = best and best["name"]
            row[f"{side}_fastest_seconds"] = best and best["median_seconds"]
        rows.append(row)
    return {
        "source": source,
        "s3": other.get("s3"),
        "started_at": other.get("started_at"),
        "quick": other.get("quick"),
        "rows": rows,
    }


def _beside_md(doc: dict[str, Any]) -> list[str]:
    b = doc.get("beside")
    if not b or not b["rows"]:
        return []
    here, there = doc["s3"], b["s3"]
    out = [
        f"## Beside {there}",
        "",
        f"The same scenarios from `{b['source']}` ({there}, {str(b['started_at'])[:19]}Z"
        f"{', --quick' if b.get('quick') else ''}): different runs, so compare the ratios.",
        "",
        f"| Scenario | stagerd on {here} | fastest peer on {here} | ratio | "
        f"stagerd on {there} | fastest peer on {there} | ratio |",
        "|---|---|---|---|---|---|---|",
    ]

    def ratio(a: float | None, b_: float | None) -> str:
        return f"{a / b_:.3f}x" if a and b_ else "-"

    for r in b["rows"]:
        cells = []
        for side in ("here", "there"):
            s, f = r[f"{side}_stagerd_seconds"], r[f"{side}_fastest_seconds"]
            peer = cell(str(r[f"{side}_fastest_peer"] or "-"))
            cells += [f"{fmt_num(s)}s", f"{peer} {fmt_num(f)}s", ratio(s, f)]
        out.append(f"| {r['scenario']} | " + " | ".join(cells) + " |")
    return [*out, ""]


def write(
    doc: dict[str, Any], results: list[ScenarioResult], results_dir: Path, report_path: Path
) -> tuple[Path, Path]:
    """Write <stamp>.json, latest.json, the plots and the Markdown report; return the paths."""
    results_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.fromisoformat(doc["started_at"]).strftime("%Y%m%dT%H%M%SZ")
    text = json.dumps(doc, indent=2, default=str) + "\n"
    json_path = results_dir / f"{stamp}.json"
    json_path.write_text(text)
    (results_dir / "latest.json").write_text(text)
    plots = plot_all(results, results_dir / "plots")
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(markdown(doc, results, plots, report_path.parent))
    return json_path, report_path


# -- text ----------------------------------------------------------------------------------


def fmt_bytes(n: float | None) -> str:
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "-"
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def fmt_num(x: float | None, digits: int = 3) -> str:
    if x is None or math.isnan(x):
        return "-"
    return f"{x:.{digits}g}" if abs(x) < 1000 else f"{x:,.0f}"


def cell(text: str) -> str:
    """Text safe inside a Markdown table cell (tool names contain pipes)."""
    return text.replace("|", "\\|").replace("\n", " ")


def result_lines(result: ScenarioResult) -> list[str]:
    """What the console shows for a scenario: ratios, then PASS/FAIL per target line."""
    lines = [f"{k} = {v:.3f}x" for k, v in result.ratios.items()]
    for c in result.contenders:
        if c.error:
            lines.append(f"{c.name}: ERROR {c.error[:300]}")
    lines += [
        f"{'PASS' if c.passed else 'FAIL'}  {c.label}: {fmt_num(c.value)} {c.unit} "
        f"(target {c.op} {fmt_num(c.limit)})"
        for c in result.checks
    ]
    lines += [f"note: {n}" for n in result.notes]
    return lines


def _cpu_cells(r: ScenarioResult, c: ContenderResult) -> str:
    """CPU of the contender's process tree and the S3 server's: per GiB moved when the
    scenario moves a known number of bytes, else seconds per run."""
    if r.nbytes:
        mine, server = r.cpu_per_gib(c), r.cpu_per_gib(c, "server_cpu_seconds")
    else:
        mine, server = c.median("cpu_seconds"), c.median("server_cpu_seconds")
    return f" {fmt_num(mine)} | {fmt_num(server)} |"


def _contender_row(r: ScenarioResult, c: ContenderResult) -> str:
    key = r.metric
    values = c.metric(key)
    unit = "s" if key == "seconds" else ""
    wall = key != "seconds"
    width = 7 + int(wall) + len(r.columns)  # the cells after the name
    if not c.ok:
        error = cell((c.error or "no samples")[:200])
        return f"| {cell(c.name)} | {c.role} | error: {error} |" + " |" * (width - 1)
    stagerd = next((x for x in r.contenders if x.is_stagerd and x.ok), None)
    # stagerd's median over this contender's (the scale set pairs each size with its own).
    found = next((v for k, v in r.ratios.items() if k.endswith(f"/{c.name}")), math.nan)
    ratio = "" if c.is_stagerd or stagerd is None else f"{found:.3f}x"
    span = f"{fmt_num(min(values))}-{fmt_num(max(values))}" if values else "-"
    peak_rss = max(s.peak_rss for s in c.samples)
    peak_scratch = max(s.peak_scratch for s in c.samples)
    name = f"**{cell(c.name)}**" if c.is_stagerd else cell(c.name)
    wall_cell = f" {fmt_num(c.median())} |" if wall else ""
    extra = "".join(f" {fmt_num(c.median(k))} |" for k in r.columns)
    return (
        f"| {name} | {c.role} | {fmt_num(c.median(key))}{unit} | {span} | {ratio} |{wall_cell}"
        f"{_cpu_cells(r, c)} {fmt_bytes(peak_rss)} | "
        f"{fmt_bytes(peak_scratch) if peak_scratch else '-'} |{extra}"
    )


def _scenario_md(r: ScenarioResult, plot: Path | None, base: Path) -> list[str]:
    metric = "time" if r.metric == "seconds" else r.metric
    out = [f"## {r.name}: {r.title}", ""]
    params = ", ".join(
        f"{k}={fmt_bytes(v) if k.endswith('bytes') else v}" for k, v in r.params.items()
    )
    out += [f"Parameters: {params}.", ""]
    if r.skipped:
        return [*out, f"Skipped: {r.skipped}", ""]
    cpu = "CPU s/GiB | server CPU s/GiB" if r.nbytes else "CPU s | server CPU s"
    wall = " median wall s |" if r.metric != "seconds" else ""
    head = (
        f"| Contender | role | median {metric} | min-max | stagerd / this |{wall} {cpu} | "
        "peak RSS | peak scratch |" + "".join(f" median {k} |" for k in r.columns)
    )
    out += [head, "|" + "---|" * head.count(" |")]
    out += [_contender_row(r, c) for c in r.contenders]
    out.append("")
    for c in r.checks:
        out.append(
            f"- **{'PASS' if c.passed else 'FAIL'}** {c.label}: {fmt_num(c.value)} {c.unit} "
            f"(target {c.op} {fmt_num(c.limit)} {c.unit})"
        )
    out += [f"- {n}" for n in r.notes]
    if plot:
        out += ["", f"![{r.name}]({os.path.relpath(plot, base)})"]
    return [*out, ""]


def _flags(doc: dict[str, Any]) -> str:
    flags = [" --quick"] if doc["quick"] else []
    flags += [" --scale"] if doc.get("scale") else []
    flags += [f" --s3 {doc['s3']}"] if doc["s3"] != "seaweedfs" else []
    return "".join(flags)


def markdown(
    doc: dict[str, Any], results: list[ScenarioResult], plots: dict[str, Path], base: Path
) -> str:
    host = doc["host"]
    out = [
        "# stagerd benchmarks",
        "",
        f"Generated by `python -m bench.run{_flags(doc)}` on "
        f"{doc['started_at'][:19]}Z, commit `{doc['git_commit']}`: {host['cpus']} CPUs, "
        f"{fmt_bytes(host['memory_bytes'])} RAM, Python {host['python']}, S3 = {doc['s3']}, "
        f"{doc['rounds']} interleaved round(s) per contender, load average at start "
        f"{', '.join(f'{x:.1f}' for x in host['load_average'])}. Scratch (where every "
        f"contender extracts): {host.get('scratch_fs', 'not recorded')}.",
        "",
        "Ratios are stagerd's median divided by the peer's median over the same interleaved "
        "rounds (below 1 = stagerd is faster or smaller). Absolute times drift on this shared "
        'machine; the ratios are the result. A target "vs fastest peer" divides by the '
        "fastest contender of that scenario in this run, named in the label.",
        "",
        "Roles: *peer* does the job its own way; *verify* is a peer pipeline that also does "
        "stagerd's verification (SHA-256 of every byte; MD5 of every byte on upload), the "
        "baseline of the CPU target; *floor* touches no network. CPU is user + system seconds "
        "of the contender's whole process tree (every process it started and reaped), per GiB "
        "of archive; the S3 server's CPU over the same run is counted apart (server CPU).",
        "",
        "## Targets",
        "",
        "| Scenario | Target | Measured | Limit | Result |",
        "|---|---|---|---|---|",
    ]
    for c in doc["summary"]["checks"]:
        out.append(
            f"| {c['scenario']} | {cell(c['label'])} | {fmt_num(c['value'])} {c['unit']} | "
            f"{c['op']} {fmt_num(c['limit'])} {c['unit']} | "
            f"{'PASS' if c['passed'] else '**FAIL**'} |"
        )
    out += ["", f"{doc['summary']['passed']} PASS, {doc['summary']['failed']} FAIL.", ""]
    if "summary" in plots:
        out += [f"![targets]({os.path.relpath(plots['summary'], base)})", ""]
    others = [n for n in ("REPORT-scale.md", "REPORT-swift.md") if (base / n).exists()]
    if others and not doc.get("scale") and doc["s3"] == "seaweedfs":
        links = ", ".join(f"[{n}]({n})" for n in others)
        out += [f"Other runs (`--scale`, `--s3 swift`), each its own report: {links}.", ""]
    out += _beside_md(doc)
    for r in results:
        out += _scenario_md(r, plots.get(r.name), base)
    if ANALYSIS.exists() and not doc["quick"] and not doc.get("scale") and doc["s3"] == "seaweedfs":
        out += [ANALYSIS.read_text().strip(), ""]
    return "\n".join(out)


# -- plots ---------------------------------------------------------------------------------


def plot_all(results: list[ScenarioResult], plot_dir: Path) -> dict[str, Path]:
    """One PNG per scenario (median with min-max bars) and one of every target's margin."""
    import matplotlib

    matplotlib.use("Agg")
    plot_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for r in results:
        if any(c.ok for c in r.contenders):
            paths[r.name] = _plot_scenario(r, plot_dir / f"{r.name}.png")
    checks = [(r.name, c) for r in results for c in r.checks]
    if checks:
        paths["summary"] = _plot_targets(checks, plot_dir / "targets.png")
    return paths


def _plot_scenario(r: ScenarioResult, path: Path) -> Path:
    import matplotlib.pyplot as plt

    rows = [c for c in r.contenders if c.ok]
    medians = [c.median(r.metric) for c in rows]
    lows = [m - min(c.metric(r.metric)) for m, c in zip(medians, rows, strict=True)]
    highs = [max(c.metric(r.metric)) - m for m, c in zip(medians, rows, strict=True)]
    fig, ax = plt.subplots(figsize=(7, 0.6 * len(rows) + 1.2))
    colors = ["#d95f02" if c.is_stagerd else "#7570b3" for c in rows]
    ax.barh([c.name for c in rows], medians, xerr=[lows, highs], color=colors, capsize=3)
    ax.invert_yaxis()
    ax.set_xlabel("seconds (median, min-max)" if r.metric == "seconds" else r.metric)
    ax.set_title(r.title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _plot_targets(checks: list[tuple[str, Any]], path: Path) -> Path:
    """Each target as measured/limit (for >= targets limit/measured): below 1 meets it."""
    import matplotlib.pyplot as plt

    labels, values, colors = [], [], []
    for scenario, c in checks:
        margin = c.value / c.limit if c.op.startswith("<") else c.limit / max(c.value, 1e-9)
        labels.append(f"{scenario}: {c.label}")
        values.append(margin if not math.isnan(margin) else 0.0)
        colors.append("#1b9e77" if c.passed else "#d95f02")
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(labels) + 1.2))
    ax.barh(labels, values, color=colors)
    ax.axvline(1.0, color="black", linewidth=1)
    ax.invert_yaxis()
    ax.tick_params(axis="y", labelsize=7)
    ax.set_xlabel("measured / target (left of the line = PASS)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
