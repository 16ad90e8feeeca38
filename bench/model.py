"""What a scenario produces: contenders' samples, ratios and PASS/FAIL checks.

Every scenario returns one :class:`ScenarioResult`. Contenders are run interleaved (A B A B
...) by :func:`interleave` so that the machine's drift (other tenants, page cache, thermal)
spreads over all of them instead of biasing the one that happened to run last.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from bench.measure import Sample

STAGERD = "stagerd"
RSS_LIMIT = 200 * 1000 * 1000  # "200 MB": decimal, as written in the issue
GiB = 1024**3
# What a contender is, for the targets: a "peer" (another tool doing the job its own way), the
# "verify" peer (a peer pipeline doing stagerd's verification too: the CPU baseline) or the
# "floor" (no network: what the disk alone allows). stagerd's contenders are role "stagerd".
ROLES = ("stagerd", "peer", "verify", "floor")


@dataclass(frozen=True)
class Contender:
    """One side of a comparison: a name and how to run it once (round number given)."""

    name: str
    run: Callable[[int], Sample]
    is_stagerd: bool = False
    max_rounds: int | None = None  # fewer rounds for a peer whose result is known by design
    role: str = "peer"  # see ROLES; stagerd's contenders get "stagerd"


@dataclass(frozen=True)
class ContenderResult:
    name: str
    is_stagerd: bool
    samples: list[Sample]
    error: str | None = None
    role: str = "peer"

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.samples)

    def metric(self, key: str = "seconds") -> list[float]:
        if key in ("seconds", "peak_rss", "peak_scratch"):
            return [float(getattr(s, key)) for s in self.samples]
        if key in ("cpu_seconds", "server_cpu_seconds"):
            values = (getattr(s, key) for s in self.samples)
            return [float(v) for v in values if v is not None]
        return [float(s.extra[key]) for s in self.samples if s.extra.get(key) is not None]

    def median(self, key: str = "seconds") -> float:
        values = self.metric(key)
        return statistics.median(values) if values else float("nan")

    def _median_or_none(self, key: str) -> float | None:
        values = self.metric(key)
        return statistics.median(values) if values else None

    def summary(self) -> dict[str, Any]:
        secs = self.metric()
        return {
            "name": self.name,
            "is_stagerd": self.is_stagerd,
            "role": self.role,
            "error": self.error,
            "rounds": len(self.samples),
            "median_seconds": statistics.median(secs) if secs else None,
            "min_seconds": min(secs) if secs else None,
            "max_seconds": max(secs) if secs else None,
            "median_cpu_seconds": self._median_or_none("cpu_seconds"),
            "median_server_cpu_seconds": self._median_or_none("server_cpu_seconds"),
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
    nbytes: int = 0  # bytes each run moves: CPU is then reported per GiB of them

    def cpu_per_gib(self, c: ContenderResult, key: str = "cpu_seconds") -> float:
        """Median CPU seconds (``cpu_seconds`` or ``server_cpu_seconds``) per GiB moved."""
        if not self.nbytes:
            return float("nan")
        return c.median(key) / (self.nbytes / GiB)

    def fastest(self, roles: tuple[str, ...] = ("peer", "verify")) -> ContenderResult | None:
        """The contender of *roles* with the lowest median time (None if none produced data)."""
        rows = [c for c in self.contenders if c.ok and c.role in roles]
        return min(rows, key=lambda c: c.median("seconds"), default=None)

    def stagerd_result(self) -> ContenderResult | None:
        return next((c for c in self.contenders if c.is_stagerd and c.ok), None)

    def add_fastest_check(
        self, what: str, limit: float, roles: tuple[str, ...] = ("peer", "verify")
    ) -> None:
        """stagerd's median time / the fastest contender's of *roles* <= *limit*.

        The fastest is chosen from this run's medians, so the target follows whichever tool
        is fastest here today (not a fixed peer); its name goes into the label.
        """
        mine, best = self.stagerd_result(), self.fastest(roles)
        if mine is None:
            return
        floor = roles == ("floor",)
        if best is None:
            kind = "local floor" if floor else "fastest peer"
            self.checks.append(Check(f"{what} vs {kind} (none measured)", math.nan, "<=", limit))
            return
        ratio = mine.median() / best.median()
        against = best.name if floor else f"fastest peer ({best.name})"
        self.checks.append(Check(f"{what} vs {against}", ratio, "<=", limit))

    def add_cpu_check(self, limit: float = 1.3) -> None:
        """stagerd's CPU s/GiB (its whole process tree) / the verifying peer's <= *limit*."""
        mine = self.stagerd_result()
        verify = next((c for c in self.contenders if c.role == "verify" and c.ok), None)
        if mine is None:
            return
        if verify is None:
            self.checks.append(Check("CPU s/GiB vs verifying peer (none)", math.nan, "<=", limit))
            return
        theirs = self.cpu_per_gib(verify)
        ratio = self.cpu_per_gib(mine) / theirs if theirs else math.inf
        self.checks.append(
            Check(f"CPU s/GiB vs verifying peer ({verify.name})", ratio, "<=", limit)
        )

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

    def _summary(self, c: ContenderResult) -> dict[str, Any]:
        out = c.summary()
        if self.nbytes:
            for key, name in (("cpu_seconds", "cpu"), ("server_cpu_seconds", "server_cpu")):
                value = self.cpu_per_gib(c, key)
                out[f"{name}_s_per_gib"] = None if math.isnan(value) else value
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "title": self.title,
            "params": self.params,
            "metric": self.metric,
            "columns": self.columns,
            "skipped": self.skipped,
            "nbytes": self.nbytes,
            "contenders": [self._summary(c) for c in self.contenders],
            "ratios": self.ratios,
            "checks": [c.to_dict() for c in self.checks],
            "notes": self.notes,
        }


def scenario_from_dict(d: dict[str, Any]) -> ScenarioResult:
    """Rebuild a ScenarioResult from its JSON (``--update`` folds new scenarios into old runs)."""
    contenders = [
        ContenderResult(
            c["name"],
            c["is_stagerd"],
            [Sample(**s) for s in c["samples"]],
            c["error"],
            c.get("role", _role_of(c)),
        )
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
        d.get("nbytes", 0),
    )


def _role_of(c: dict[str, Any]) -> str:
    """A role for a contender from a results file older than roles."""
    if c["is_stagerd"]:
        return "stagerd"
    return "floor" if str(c["name"]).startswith("local floor") else "peer"


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
        ContenderResult(
            c.name,
            c.is_stagerd,
            samples[c.name],
            errors.get(c.name),
            "stagerd" if c.is_stagerd else c.role,
        )
        for c in contenders
    ]


class RunFailed(RuntimeError):
    """A contender's command exited non-zero; the message carries the tail of its stderr."""

    @classmethod
    def of(cls, what: str, sample: Sample, stderr: str, stdout: str = "") -> RunFailed:
        tail = (stderr.strip() or stdout.strip())[-800:]
        return cls(f"{what} exited {sample.returncode}: {tail}")
