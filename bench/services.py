"""Bring up what the benchmark talks to: the local SeaweedFS (or a Swift endpoint), Redis,
PostgreSQL, via the project's idempotent ``build/services.sh``."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

from bench.context import ROOT, S3Target

SEAWEEDFS = S3Target("seaweedfs", "http://127.0.0.1:8333", "stagerd-dev", "stagerd-dev-secret")


def swift_target() -> S3Target:
    """Swift's s3api: $BENCH_SWIFT_ENDPOINT (+ _ACCESS_KEY/_SECRET_KEY) when set, else the
    loopback all-in-one that ``build/swift.sh start current`` starts (idempotent) and
    describes with ``export STAGERD_TEST_SWIFT...=`` lines."""
    if "BENCH_SWIFT_ENDPOINT" in os.environ:
        return S3Target(
            "swift",
            os.environ["BENCH_SWIFT_ENDPOINT"],
            os.environ.get("BENCH_SWIFT_ACCESS_KEY", "test:tester"),
            os.environ.get("BENCH_SWIFT_SECRET_KEY", "testing"),
        )
    script = ROOT / "build" / "swift.sh"
    if not script.exists():
        raise RuntimeError("--s3 swift: set BENCH_SWIFT_ENDPOINT (build/swift.sh is not here)")
    proc = subprocess.run(
        [str(script), "start", "current"], capture_output=True, text=True, check=False
    )
    env = dict(
        line.removeprefix("export ").split("=", 1)
        for line in proc.stdout.splitlines()
        if line.startswith("export ") and "=" in line
    )
    if proc.returncode != 0 or "STAGERD_TEST_SWIFT" not in env:
        raise RuntimeError(f"build/swift.sh start current failed: {proc.stderr[-500:]}")
    return S3Target(
        "swift",
        env["STAGERD_TEST_SWIFT"],
        env.get("STAGERD_TEST_SWIFT_ACCESS_KEY", "test:tester"),
        env.get("STAGERD_TEST_SWIFT_SECRET_KEY", "testing"),
    )


def reachable(url: str) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 80), 2):
            return True
    except OSError:
        return False


def ensure(target: S3Target) -> None:
    """Start SeaweedFS/Redis/PostgreSQL when they are not answering (no-op when they are).

    Raises RuntimeError naming what could not be reached; Swift is never started here.
    """
    wanted = ["redis", "postgres"] + (["seaweedfs"] if target.name == "seaweedfs" else [])
    env = {**os.environ, "STAGERD_VENV": os.environ.get("STAGERD_VENV", _venv())}
    proc = subprocess.run(
        [str(ROOT / "build" / "services.sh"), *wanted],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"build/services.sh {' '.join(wanted)} failed: {proc.stderr[-500:]}")
    if not reachable(target.endpoint):
        raise RuntimeError(f"S3 target {target.name} is not reachable at {target.endpoint}")


def _venv() -> str:
    return str(Path(sys.executable).parent.parent)


def listening_pids(port: int) -> list[int]:
    """The processes holding a listening TCP socket on *port* (any address), from /proc."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            # local_address is HEXIP:HEXPORT; state 0A is LISTEN; field 9 is the inode.
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":
                inodes.add(f"socket:[{fields[9]}]")
    procs = (e.name for e in os.scandir("/proc") if e.name.isdigit())
    return sorted(int(pid) for pid in procs if _holds(pid, inodes))


def _holds(pid: str, inodes: set[str]) -> bool:
    """Whether process *pid* has one of *inodes* open.

    Each fd is read on its own: a busy server (weed opens and closes connections all the
    time) loses fds between the listing and the readlink, and one vanished fd must not hide
    the whole process (it did: the run then reported no server CPU at all).
    """
    try:
        fds = list(os.scandir(f"/proc/{pid}/fd"))
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(fd.path) in inodes:
                return True
        except OSError:
            continue
    return False


def server_pids(target: S3Target) -> tuple[int, ...]:
    """The S3 server's processes, whose CPU the harness reports apart from the contenders'.

    $BENCH_S3_SERVER_PIDS (comma-separated) when set; else whoever listens on the endpoint's
    port (SeaweedFS: one ``weed server`` process holds master, volume, filer and S3 gateway),
    plus, for the Swift all-in-one, every server of its instance (account, container and
    object servers listen on ports of their own; build/swift.sh records their pids). Empty
    when nothing is found locally (a remote endpoint): server CPU is then not reported.
    """
    if os.environ.get("BENCH_S3_SERVER_PIDS"):
        return tuple(int(p) for p in os.environ["BENCH_S3_SERVER_PIDS"].split(",") if p)
    parts = urlsplit(target.endpoint)
    if parts.hostname not in ("127.0.0.1", "localhost", "::1"):
        return ()
    pids = set(listening_pids(parts.port or 80))
    if target.name == "swift":
        pids.update(_swift_instance_pids())
    return tuple(sorted(pids))


def _swift_instance_pids() -> list[int]:
    envfile = Path(os.environ.get("STAGERD_SWIFT_DIR", "/tmp/stagerd-swift")) / "swift.env"
    try:
        data = next(
            line.removeprefix("# data=")
            for line in envfile.read_text().splitlines()
            if line.startswith("# data=")
        )
    except (OSError, StopIteration):
        return []
    pids = []
    for pidfile in Path(data, "run").glob("*.pid"):
        try:
            pid = int(pidfile.read_text().strip())
        except (OSError, ValueError):
            continue
        if Path(f"/proc/{pid}").exists():
            pids.append(pid)
    return pids
