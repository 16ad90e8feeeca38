"""The benchmark harness: its measuring parts on known workloads, and one --quick run end to
end (real SeaweedFS, Redis, PostgreSQL, real peers) so the harness cannot rot.

Nothing here asserts on speed; the --quick run asserts on the shape of what it writes.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from bench import profile, scratchfs, services
from bench.measure import Sample, run_measured, tree_cpu
from bench.model import Check, Contender, ContenderResult, ScenarioResult, interleave
from bench.scenarios import SCENARIOS, scale
from bench.scenarios.prefetch import processor_gaps

# The transfer scenarios: CPU per GiB, server CPU and the role-based targets apply to these.
TRANSFER = ("upload", "stage", "upload_small", "stage_small", "resume")
BURN = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass"

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


def test_run_measured_counts_the_cpu_of_the_whole_pipeline() -> None:
    # Two processes burning 0.3 s each behind a shell pipe: the tree's CPU is their sum.
    burn = f"{sys.executable} -c {shlex.quote(BURN)}"
    sample, _, _ = run_measured(["bash", "-c", f"{burn} | {burn}"])
    assert sample.returncode == 0
    assert sample.cpu_seconds is not None and 0.55 <= sample.cpu_seconds < 3.0
    assert sample.server_cpu_seconds is None  # no server pids given


def test_tree_cpu_reads_a_running_process_and_its_children() -> None:
    code = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {BURN!r}])"
    proc = subprocess.Popen([sys.executable, "-c", code + "; import time; time.sleep(30)"])
    try:
        deadline = time.monotonic() + 20
        while tree_cpu([proc.pid]) < 0.3 and time.monotonic() < deadline:
            time.sleep(0.1)
        # The grandchild burned 0.3 s and was reaped: it is in the child's cutime now.
        assert tree_cpu([proc.pid]) >= 0.3
    finally:
        proc.kill()
        proc.wait()
    assert tree_cpu([proc.pid]) == 0.0  # gone: nothing to count


def test_listening_pids_finds_the_server_of_a_port() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert services.listening_pids(port) == [os.getpid()]
    assert services.listening_pids(port) == []


def test_listening_pids_survives_an_fd_that_vanishes_mid_scan(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A busy server closes fds between the listing and the readlink: the fds that vanish
    are skipped, the process holding the socket is still found (one vanished fd used to
    hide the whole server, and the run reported no server CPU)."""
    real = os.readlink
    vanished: list[str] = []

    def flaky(path: str) -> str:
        target = real(path)
        # The first other fd of this process vanishes (never the socket itself).
        if path.startswith(f"/proc/{os.getpid()}/fd/") and not vanished and "socket" not in target:
            vanished.append(path)
            raise FileNotFoundError(path)
        return target

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        monkeypatch.setattr(os, "readlink", flaky)
        assert services.listening_pids(s.getsockname()[1]) == [os.getpid()]
    assert vanished, "the fake never fired: the test proved nothing"


def _result(name: str, seconds: float, cpu: float, role: str) -> ContenderResult:
    sample = Sample(seconds=seconds, peak_rss=1, cpu_seconds=cpu, server_cpu_seconds=cpu / 2)
    return ContenderResult(name, role == "stagerd", [sample], None, role)


def test_targets_divide_by_the_fastest_contender_of_the_run() -> None:
    r = ScenarioResult("x", "X", {}, nbytes=2 * 1024**3)
    r.contenders = [
        _result("stagerd", 10.0, 4.0, "stagerd"),
        _result("slow", 20.0, 1.0, "peer"),
        _result("fast", 8.0, 1.0, "peer"),
        _result("verifying", 12.0, 2.0, "verify"),
        _result("floor", 5.0, 0.5, "floor"),  # faster, but never "the fastest peer"
    ]
    r.add_fastest_check("t", 1.0)
    r.add_fastest_check("t", 1.25, roles=("floor",))
    r.add_cpu_check()
    by_label = {c.label: c for c in r.checks}
    assert by_label["t vs fastest peer (fast)"].value == pytest.approx(1.25)
    assert by_label["t vs floor"].value == pytest.approx(2.0)
    assert by_label["CPU s/GiB vs verifying peer (verifying)"].value == pytest.approx(2.0)
    summary = r.to_dict()["contenders"][0]
    assert summary["role"] == "stagerd" and summary["cpu_s_per_gib"] == pytest.approx(2.0)
    assert summary["server_cpu_s_per_gib"] == pytest.approx(1.0)


def test_scale_targets_compare_seconds_per_gib_and_rss_across_sizes() -> None:
    small, large = scale.QUICK_SIZES
    archives = [type("A", (), {"size": n})() for n in (small, large)]
    r = ScenarioResult("scale_x", "X", {})

    def at(name: str, nbytes: int, seconds: float, rss: int) -> ContenderResult:
        s = scale._per_gib(Sample(seconds=seconds, peak_rss=rss, cpu_seconds=seconds), nbytes)
        return ContenderResult(f"{name} @ {scale.label(nbytes)}", name == "stagerd", [s], None)

    r.contenders = [
        at("stagerd", small, 1.0, 100),
        at("peer", small, 1.0, 50),
        at("stagerd", large, 1.2 * large / small, 105),  # 1.2x the seconds per GiB: not linear
        at("peer", large, 1.0 * large / small, 50),
    ]
    scale._finish(r, archives, "peer")  # type: ignore[arg-type]
    checks = {c.label: c for c in r.checks}
    lo, hi = scale.label(small), scale.label(large)
    assert not checks[f"stagerd seconds per GiB at {hi} / at {lo}"].passed
    assert checks[f"stagerd peak RSS at {hi} / at {lo}"].passed
    assert r.ratios[f"stagerd @ {hi}/peer @ {hi}"] == pytest.approx(1.2)
    assert scale.label(2 * 1024**3 - 16 * 1024**2) == "2 GiB"  # rounded down to whole members


def test_profile_turns_collapsed_stacks_into_a_flame_graph_and_top_list(tmp_path: Path) -> None:
    raw = tmp_path / "p.raw.txt"
    raw.write_text("main (a.py:1);read (b.py:2) 30\nmain (a.py:1);sha <hash> (c.py:3) 70\n")
    stacks = profile.read_collapsed(raw)
    assert stacks == Counter(
        {("main (a.py:1)", "read (b.py:2)"): 30, ("main (a.py:1)", "sha <hash> (c.py:3)"): 70}
    )
    top = profile.top_functions(stacks)
    assert "70.0%" in top and "100.0%" in top
    svg = profile.flamegraph_svg(stacks, "t")
    assert svg.startswith("<svg") and "sha &lt;hash&gt;" in svg and svg.count("<rect") == 4


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


# ~2-3 minutes on a quiet 2-core machine (the shiv build of the startup scenario is most of
# it on a fresh checkout); the margin is for a machine shared with other work.
QUICK_TIMEOUT = 420


def test_scratch_clear_empties_a_run_dir_but_keeps_lost_and_found(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    (runs / "stage-peer" / "a").mkdir(parents=True)
    (runs / "stage-peer" / "a" / "f").write_bytes(b"x")
    (runs / "loose").write_bytes(b"y")
    (runs / "lost+found").mkdir()
    scratchfs.clear(runs)
    assert sorted(p.name for p in runs.iterdir()) == ["lost+found"]


def test_scratch_is_the_host_filesystem_in_quick_runs_and_says_so(tmp_path: Path) -> None:
    with scratchfs.scratch_filesystem(tmp_path, quick=True) as desc:
        assert not os.path.ismount(tmp_path / "runs")
    assert desc.startswith("host filesystem ") and "(no fresh ext4: --quick)" in desc


def _journaled(device_of: Path) -> bool:
    dev = next(
        line.split()[0]
        for line in Path("/proc/self/mounts").read_text().splitlines()
        if line.split()[1] == str(device_of)
    )
    out = subprocess.run(["dumpe2fs", "-h", dev], capture_output=True, text=True, check=True)
    return "has_journal" in out.stdout


@pytest.mark.skipif(
    os.geteuid() != 0 or scratchfs._usable(quick=False) is not None,
    reason="needs root, mkfs.ext4 and loop devices",
)
def test_scratch_is_a_fresh_journaled_ext4_for_the_run_and_gone_after(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    with scratchfs.scratch_filesystem(tmp_path, quick=False, wanted=8 << 30) as desc:
        assert os.path.ismount(runs), desc
        assert desc.startswith("fresh ext4 (journaled, 8 GiB")
        assert _journaled(runs)
        (runs / "stage" / "x").mkdir(parents=True)
        scratchfs.clear(runs)
        assert [p.name for p in runs.iterdir()] == ["lost+found"]
    assert not os.path.ismount(runs)
    assert not (tmp_path / "scratch-ext4.img").exists()


@pytest.mark.timeout(QUICK_TIMEOUT + 60)
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
        timeout=QUICK_TIMEOUT,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    check_quick_output(results_dir, report)
    assert "PASS" in proc.stdout or "FAIL" in proc.stdout


def check_quick_output(results_dir: Path, report: Path) -> None:
    """The shape of a --quick run's results and report (callable on any run's output)."""
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
            if name in TRANSFER or name == "tiny":
                # The CPU columns: the contender's tree and the S3 server, never silently gone.
                assert c["median_cpu_seconds"] > 0, f"{name}: {c['name']}"
                assert c["median_server_cpu_seconds"] is not None, f"{name}: {c['name']}"
            if name in TRANSFER:
                assert c["cpu_s_per_gib"] > 0, f"{name}: {c['name']}"
        assert scenario["checks"], f"{name}: no target lines"
        if name in TRANSFER and name != "resume":  # --quick resume: its usual three peers
            roles = {c["role"] for c in contenders}
            assert {"stagerd", "peer", "verify"} <= roles, f"{name}: {roles}"
        labels = [c["label"] for c in scenario["checks"]]
        if name in ("upload", "stage", "upload_small", "stage_small"):
            assert any(" vs fastest peer (" in x for x in labels), f"{name}: {labels}"
            assert any(x.startswith("CPU s/GiB vs verifying peer (") for x in labels), labels
            names = {c["name"] for c in contenders}
            assert any("obstore" in n for n in names) or any(
                "obstore not measured" in n for n in scenario["notes"]
            ), f"{name}: obstore neither measured nor explained"
        if name in ("stage", "upload"):
            assert any(c["role"] == "floor" for c in contenders), name
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
    assert "CPU s/GiB | server CPU s/GiB" in text
