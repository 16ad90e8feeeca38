"""What a scenario produces: contenders' samples, ratios and PASS/FAIL checks.

Every scenario returns one :class:`ScenarioResult`. Contenders are run interleaved (A B A B
...) by :func:`interleave` so that the machine's drift (other tenants, page cache, thermal)
spreads over all of them instead of biasing the one that happened to run last.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from bench.measure import Sample

STAGERD = "stagerd"
RSS_LIMIT = 200 * 1000 * 1000  # "200 MB": decimal, as written in the issue


@dataclass(frozen=True)
class Contender:
    """One side of a comparison: a name and how to run it once (round number given)."""

    name: str
    run: Callable[[int], Sample]
    is_stagerd: bool = False
    max_rounds: int | None = None  # fewer rounds for a peer whose result is known by design


@dataclass(frozen=True)
class ContenderResult:
    name: str
    is_stagerd: bool
    samples: list[Sample]
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.samples)

    def metric(self, key: str = "seconds") -> list[float]:
        if key in ("seconds", "peak_rss", "peak_scratch"):
            return [float(getattr(s, key)) for s in self.samples]
        return [float(s.extra[key]) for s in self.samples if key in s.extra]

    def median(self, key: str = "seconds") -> float:
        values = self.metric(key)
        return statistics.median(values) if values else float("nan")

    def summary(self) -> dict[str, Any]:
        secs = self.metric()
        return {
            "name": self.name,
            "is_stagerd": self.is_stagerd,
            "error": self.error,
            "rounds": len(self.samples),
            "median_seconds": statistics.median(secs) if secs else None,
            "min_seconds": min(secs) if secs else None,
            "max_seconds": max(secs) if secs else None,
            "peak_rss": max((s.peak_rss for s in self.samples), default=None),
            "peak_scratch": max((s.peak_scratch for s in self.samples), default=None),
            "samples": [asdict(s) for s in self.samples],
        }


@dataclass(frozen=True)
class Check:
    """One target line: ``value op limit`` -> PASS/FAIL."""

    label: str
    value: float
    op: str  # "<=" or ">=" or "<"
    limit: float
    unit: str = "x"

    @property
    def passed(self) -> bool:
        if self.value != self.value:  # NaN: nothing was measured, so nothing was met
            return False
        if self.op == "<=":
            return self.value <= self.limit
        if self.op == "<":
            return self.value < self.limit
        return self.value >= self.limit

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


@dataclass
class ScenarioResult:
    name: str
    title: str
    params: dict[str, Any]
    contenders: list[ContenderResult] = field(default_factory=list)
    ratios: dict[str, float] = field(default_factory=dict)  # "stagerd/<peer>" -> median ratio
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    metric: str = "seconds"  # what the ratios compare
    columns: list[str] = field(default_factory=list)  # extra keys whose medians the report shows
    skipped: str | None = None

    def contender(self, name: str) -> ContenderResult:
        return next(c for c in self.contenders if c.name == name)

    def add_ratios(self, key: str = "seconds") -> None:
        """stagerd's median / each peer's median, for every contender that produced data."""
        self.metric = key
        mine = [c for c in self.contenders if c.is_stagerd and c.ok]
        if not mine:
            return
        base = mine[0].median(key)
        for peer in self.contenders:
            if peer.is_stagerd or not peer.ok:
                continue
            theirs = peer.median(key)
            self.ratios[f"{mine[0].name}/{peer.name}"] = base / theirs if theirs else float("inf")

    def add_rss_check(self) -> None:
        """The issue's "peak RSS <= 200 MB in every scenario", for stagerd's contenders."""
        for c in self.contenders:
            if c.is_stagerd and c.ok:
                peak = max(s.peak_rss for s in c.samples)
                self.checks.append(Check(f"{c.name} peak RSS", peak / 1e6, "<=", 200, "MB"))

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "title": self.title,
            "params": self.params,
            "metric": self.metric,
            "columns": self.columns,
            "skipped": self.skipped,
            "contenders": [c.summary() for c in self.contenders],
            "ratios": self.ratios,
            "checks": [c.to_dict() for c in self.checks],
            "notes": self.notes,
        }


def scenario_from_dict(d: dict[str, Any]) -> ScenarioResult:
    """Rebuild a ScenarioResult from its JSON (``--update`` folds new scenarios into old runs)."""
    contenders = [
        ContenderResult(c["name"], c["is_stagerd"], [Sample(**s) for s in c["samples"]], c["error"])
        for c in d["contenders"]
    ]
    checks = [
        Check(c["label"], c["value"], c["op"], c["limit"], c.get("unit", "x")) for c in d["checks"]
    ]
    return ScenarioResult(
        d["name"],
        d["title"],
        d["params"],
        contenders,
        d["ratios"],
        checks,
        d["notes"],
        d.get("metric", "seconds"),
        d.get("columns", []),
        d.get("skipped"),
    )


def interleave(contenders: Sequence[Contender], rounds: int) -> list[ContenderResult]:
    """Run A B C A B C ... for *rounds*; a contender that fails stops only itself."""
    samples: dict[str, list[Sample]] = {c.name: [] for c in contenders}
    errors: dict[str, str] = {}
    for r in range(rounds):
        for c in contenders:
            if c.name in errors or (c.max_rounds is not None and r >= c.max_rounds):
                continue
            try:
                samples[c.name].append(c.run(r))
            except Exception as exc:  # one broken contender must not sink the whole report
                errors[c.name] = f"{type(exc).__name__}: {exc}"[:2000]
    return [
        ContenderResult(c.name, c.is_stagerd, samples[c.name], errors.get(c.name))
        for c in contenders
    ]


class RunFailed(RuntimeError):
    """A contender's command exited non-zero; the message carries the tail of its stderr."""

    @classmethod
    def of(cls, what: str, sample: Sample, stderr: str, stdout: str = "") -> RunFailed:
        tail = (stderr.strip() or stdout.strip())[-800:]
        return cls(f"{what} exited {sample.returncode}: {tail}")
