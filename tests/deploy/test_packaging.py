"""packaging/: the systemd units, timer, cron file, tmpfiles.d snippet and env example."""

from __future__ import annotations

import configparser
import fcntl
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from stagerd.config.settings import Settings, read_env_file

ROOT = Path(__file__).resolve().parents[2]
PACKAGING = ROOT / "packaging"
UNITS = ("stagerd-gpu.service", "stagerd-transfer.service", "stagerd-janitor.service")
BIN = "/usr/local/bin/stagerd"


def load_unit(name: str) -> configparser.ConfigParser:
    """Parse a unit file; repeated keys (ReadWritePaths=...) are kept, joined by newlines."""
    parser = configparser.ConfigParser(
        strict=False, interpolation=None, delimiters=("=",), comment_prefixes=("#", ";")
    )
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string((PACKAGING / name).read_text())
    return parser


def seconds(value: str) -> float:
    """systemd time span ("11min", "660", "2min 30s") in seconds."""
    units = {"": 1, "s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600, "ms": 0.001}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value):
        total += float(number) * units[unit]
    return total


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_analyze_verify_is_clean(tmp_path: Path) -> None:
    # A root with systemd's own units (for the targets ours depend on) and an executable
    # at the ExecStart path: verify checks both.
    root = tmp_path / "root"
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    (root / "usr/local/bin").mkdir(parents=True)
    (root / "usr/local/bin/stagerd").write_text("#!/bin/sh\n")
    (root / "usr/local/bin/stagerd").chmod(0o755)
    unit_dir = root / "etc/systemd/system"
    unit_dir.mkdir(parents=True)
    for name in (*UNITS, "stagerd-janitor.timer"):
        shutil.copy(PACKAGING / name, unit_dir / name)
    done = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", f"--root={root}"]
        + [f"/etc/systemd/system/{name}" for name in (*UNITS, "stagerd-janitor.timer")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    # verify exits 0 on unknown keys and bad values, printing a warning: any output fails.
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == "" and done.stdout.strip() == ""


def test_gpu_unit_is_notify_with_watchdog_restart_limits_and_drain() -> None:
    unit = load_unit("stagerd-gpu.service")
    service = unit["Service"]
    assert service["Type"] == "notify"
    assert seconds(service["WatchdogSec"]) > 0
    assert service["Restart"] == "on-failure"
    assert int(unit["Unit"]["StartLimitBurst"]) >= 1
    assert seconds(unit["Unit"]["StartLimitIntervalSec"]) > 0
    assert service["KillSignal"] == "SIGTERM"
    # SIGTERM to the worker only; its processor group is drained by the worker.
    assert service["KillMode"] == "mixed"
    assert service["ExecStart"].startswith(f"{BIN} gpu --concurrency 1")
    drain = re.search(r"--drain-timeout (\d+)", service["ExecStart"])
    assert drain is not None
    assert seconds(service["TimeoutStopSec"]) > int(drain.group(1))
    assert service["EnvironmentFile"] == "/etc/stagerd/stagerd.env"
    assert "/data/scratch" in unit["Unit"]["RequiresMountsFor"].split()


@pytest.mark.parametrize("name", UNITS)
def test_units_are_hardened_and_need_no_home(name: str) -> None:
    service = load_unit(name)["Service"]
    assert service["ProtectSystem"] == "strict"
    assert service["NoNewPrivileges"] == "yes"
    assert service["PrivateTmp"] == "yes"
    assert service["User"] == "stagerd"
    assert service["EnvironmentFile"] == "/etc/stagerd/stagerd.env"
    assert service["CacheDirectory"] == "stagerd"
    assert service["Environment"] == "SHIV_ROOT=%C/stagerd"
    assert service["ExecStart"].startswith(BIN + " ")


def test_gpu_unit_keeps_the_gpu_reachable() -> None:
    service = load_unit("stagerd-gpu.service")["Service"]
    # PrivateDevices= would hide /dev/nvidia*; W^X would break CUDA's JIT.
    assert "PrivateDevices" not in service
    assert "MemoryDenyWriteExecute" not in service
    assert "DevicePolicy" not in service
    assert service["ReadWritePaths"] == "/data/scratch"


def test_transfer_unit_watches_its_inbox() -> None:
    service = load_unit("stagerd-transfer.service")["Service"]
    assert service["ExecStart"] == f"{BIN} transfer watch /srv/stagerd/inbox"
    assert service["ReadWritePaths"] == "/srv/stagerd/inbox"
    assert service["Restart"] == "on-failure"
    assert service["KillSignal"] == "SIGTERM"


def test_janitor_timer_and_cron_run_the_same_command_every_15_minutes() -> None:
    service = load_unit("stagerd-janitor.service")["Service"]
    assert service["Type"] == "oneshot"
    assert service["ExecStart"] == f"{BIN} janitor"
    timer = load_unit("stagerd-janitor.timer")["Timer"]
    assert timer["OnCalendar"] == "*:0/15"
    assert timer["Persistent"] == "true"
    assert load_unit("stagerd-janitor.timer")["Install"]["WantedBy"] == "timers.target"

    lines = [
        line
        for line in (PACKAGING / "stagerd.cron").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    env = dict(line.split("=", 1) for line in lines if re.match(r"^[A-Z_]+=", line))
    assert env["SHIV_ROOT"] == "/var/cache/stagerd"
    jobs = [line for line in lines if not re.match(r"^[A-Z_]+=", line)]
    assert len(jobs) == 1
    fields = jobs[0].split(None, 6)
    assert fields[:5] == ["*/15", "*", "*", "*", "*"]
    assert fields[5] == "stagerd"
    assert fields[6].startswith(f"{BIN} janitor")


def test_tmpfiles_ages_scratch_without_creating_it() -> None:
    rules = [
        line.split()
        for line in (PACKAGING / "stagerd-tmpfiles.conf").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert rules == [["e", "/data/scratch", "-", "-", "-", "1d"], ["x", "/data/scratch/.stagerd"]]


@pytest.mark.skipif(shutil.which("systemd-tmpfiles") is None, reason="no systemd-tmpfiles")
def test_tmpfiles_clean_skips_locked_batches_and_bookkeeping(tmp_path: Path) -> None:
    # Our snippet with the age set to 0 ("clean unconditionally"): ctime cannot be
    # back-dated, so this is how a test sees what a day-old tree would lose.
    snippet = (PACKAGING / "stagerd-tmpfiles.conf").read_text()
    (tmp_path / "etc/tmpfiles.d").mkdir(parents=True)
    (tmp_path / "etc/tmpfiles.d/stagerd.conf").write_text(
        re.sub(r" 1d$", " 0", snippet, flags=re.M)
    )
    scratch = tmp_path / "data/scratch"
    for rel in ("dead-batch/input/a.wav", "live-batch/input/a.wav", ".stagerd/res.json"):
        (scratch / rel).parent.mkdir(parents=True, exist_ok=True)
        (scratch / rel).write_text("x")
    (scratch / "stray.tar.part").write_text("x")
    fd = os.open(scratch / "live-batch", os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # what a worker holds on its batch dir
        done = subprocess.run(
            ["systemd-tmpfiles", f"--root={tmp_path}", "--clean"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        os.close(fd)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in scratch.iterdir()) == [".stagerd", "live-batch"]
    assert (scratch / "live-batch/input/a.wav").is_file()
    assert (scratch / ".stagerd/res.json").is_file()
    # "e" never creates: without the volume nothing appears on the root filesystem.
    shutil.rmtree(tmp_path / "data")
    done = subprocess.run(
        ["systemd-tmpfiles", f"--root={tmp_path}", "--create", "--clean"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert not (tmp_path / "data").exists()


def test_env_example_parses_with_stagerd_itself() -> None:
    values = read_env_file(PACKAGING / "stagerd.env.example")
    for name in ("S3_ENDPOINT", "S3_ACCESS_KEY", "S3_SECRET_KEY", "S3_BUCKET", "REDIS_URL"):
        assert values[name]
    settings = Settings.from_env(environ={}, env_file=PACKAGING / "stagerd.env.example")
    assert settings.require_s3().bucket == "audio-archives"
    assert settings.scratch_dir == Path("/data/scratch")
