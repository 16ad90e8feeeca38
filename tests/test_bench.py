"""The benchmark harness: its measuring parts on known workloads, and one --quick run end to
end (real SeaweedFS, Redis, PostgreSQL, real peers) so the harness cannot rot.

Nothing here asserts on speed; the --quick run asserts on the shape of what it writes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.measure import Sample, run_measured
from bench.model import Check, Contender, ScenarioResult, interleave
from bench.scenarios import SCENARIOS
from bench.scenarios.prefetch import processor_gaps

ROOT = Path(__file__).resolve().parent.parent


def test_run_measured_sees_the_child_memory_not_the_harness() -> None:
    grow = "b = bytearray(80 * 1024 * 1024); b[::4096] = b'x' * len(b[::4096])"
    big, _, _ = run_measured([sys.executable, "-c", grow])
    small, _, _ = run_measured(["true"])
    assert big.returncode == 0 and big.peak_rss >= 80 * 1024 * 1024
    # The harness itself holds far more than this; a launcher keeps it out of the child's figure.
    assert small.peak_rss < 30 * 1024 * 1024


def test_run_measured_polls_peak_scratch_and_exit_status(tmp_path: Path) -> None:
    script = (
        f"dd if=/dev/zero of={tmp_path}/f bs=1M count=16 status=none && sync && sleep 0.3 "
        f"&& rm {tmp_path}/f && exit 3"
    )
    sample, _, _ = run_measured(["sh", "-c", script], scratch=[tmp_path])
    assert sample.returncode == 3
    assert 16 * 1024 * 1024 <= sample.peak_scratch < 18 * 1024 * 1024


def test_interleave_alternates_contenders_and_isolates_a_failure() -> None:
    order: list[str] = []

    def runner(name: str, fail: bool = False):  # type: ignore[no-untyped-def]
        def once(r: int) -> Sample:
            order.append(f"{name}{r}")
            if fail:
                raise RuntimeError("boom")
            return Sample(seconds=1.0 + r, peak_rss=1)

        return once

    results = interleave(
        [
            Contender("a", runner("a"), True),
            Contender("b", runner("b")),
            Contender("c", runner("c", True)),
        ],
        rounds=2,
    )
    assert order == ["a0", "b0", "c0", "a1", "b1"]
    assert [r.ok for r in results] == [True, True, False]
    assert "boom" in (results[2].error or "")
    scenario = ScenarioResult("x", "X", {}, contenders=results)
    scenario.add_ratios()
    assert scenario.ratios == {"a/b": 1.0}


def test_check_pass_fail_and_nan() -> None:
    assert Check("t", 1.0, "<=", 1.0).passed
    assert not Check("t", 1.01, "<=", 1.0).passed
    assert Check("t", 25, ">=", 20).passed
    assert not Check("t", 0.05, "<", 0.05).passed
    assert not Check("t", float("nan"), "<=", 1.0).passed


def test_processor_gaps_from_the_processor_log(tmp_path: Path) -> None:
    log = tmp_path / "p.log"
    log.write_text(
        "start b1 10.0\nend b1 13.0\nstart b2 13.5\nend b2 16.5\nstart b3 16.6\nend b3 19.6\n"
    )
    durations, gaps, span = processor_gaps(log)
    assert durations == pytest.approx([3.0, 3.0, 3.0])
    assert gaps == pytest.approx([0.5, 0.1])
    assert span == pytest.approx(9.6)


def test_quick_run_writes_json_report_and_plots_with_ratios(tmp_path: Path) -> None:
    results_dir, report = tmp_path / "results", tmp_path / "REPORT.md"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.run",
            "--quick",
            "--rounds",
            "1",
            "--results-dir",
            str(results_dir),
            "--report",
            str(report),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    doc = json.loads((results_dir / "latest.json").read_text())
    assert [s["name"] for s in doc["scenarios"]] == list(SCENARIOS)
    assert {"started_at", "host", "rounds", "git_commit", "summary"} <= doc.keys()
    for scenario in doc["scenarios"]:
        name = scenario["name"]
        assert scenario["skipped"] is None, f"{name}: {scenario['skipped']}"
        contenders = scenario["contenders"]
        errors = {c["name"]: c["error"] for c in contenders if c["error"]}
        assert not errors, f"{name}: {errors}"
        stagerd = [c for c in contenders if c["is_stagerd"]]
        peers = [c for c in contenders if not c["is_stagerd"]]
        assert stagerd and peers, f"{name}: stagerd and at least one peer must be measured"
        for peer in peers:
            ratio = scenario["ratios"][f"{stagerd[0]['name']}/{peer['name']}"]
            assert ratio > 0, f"{name}: {peer['name']}"
        for c in contenders:
            assert c["rounds"] >= 1 and c["median_seconds"] > 0 and c["peak_rss"] > 0
        assert scenario["checks"], f"{name}: no target lines"
    for check in doc["summary"]["checks"]:
        assert {"label", "value", "op", "limit", "passed"} <= check.keys()
    assert len(list(results_dir.glob("2*.json"))) == 1
    text = report.read_text()
    assert "## Targets" in text and text.count("PASS") + text.count("FAIL") >= len(
        doc["summary"]["checks"]
    )
    for scenario in doc["scenarios"]:
        assert f"## {scenario['name']}:" in text
        assert (results_dir / "plots" / f"{scenario['name']}.png").stat().st_size > 1000
    assert "PASS" in proc.stdout or "FAIL" in proc.stdout
