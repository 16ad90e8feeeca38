"""QEMU guests for the VM test (build/vmtest.sh): boot, SSH, power cut, Ansible.

Every wait is bounded and every failure says what it waited for, with the tail of the
guest's serial console (saved beside the disks in the run directory). Guests are
killed by their own pid (QEMU's -pidfile) whatever happens: the fixtures' finalizers
call :meth:`Guest.kill`, and build/vmtest.sh kills whatever pidfile is left.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

ROOT = Path(__file__).resolve().parents[2]
ANSIBLE_DIR = ROOT / "ansible"
VENV_BIN = Path(sys.executable).parent
T = TypeVar("T")

RECAP = re.compile(
    r"^(?P<host>\S+)\s*:\s*ok=(?P<ok>\d+)\s+changed=(?P<changed>\d+)\s+"
    r"unreachable=(?P<unreachable>\d+)\s+failed=(?P<failed>\d+)",
    re.M,
)

# What the guest's own services answer to (build/vm/guest: SeaweedFS keys, trust auth).
S3_ACCESS_KEY = "vmtest-access"
S3_SECRET_KEY = "vmtest-secret"
BUCKET = "audio-archives"
PROCESSOR = "/usr/local/lib/vmtest/processor"
PROCESSOR_DELAY = "/etc/vmtest-processor-delay"
SCRATCH = "/data/scratch"
# The guest's root runs the CLI from the extraction the role's verification made.
STAGERD = "SHIV_ROOT=/var/cache/stagerd-deploy /usr/local/bin/stagerd --log-level warning"


class VMTestError(AssertionError):
    """A bounded wait ran out or a guest command failed; the message says which."""


def log(msg: str) -> None:
    print(f"[vmtest {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(what: str, check: Callable[[], T | None], timeout: float, interval: float = 1.0,
             on_fail: Callable[[], str] | None = None) -> T:  # fmt: skip
    """Poll *check* until it returns something truthy, for at most *timeout* seconds."""
    deadline = time.monotonic() + timeout
    last_error = ""
    while True:
        try:
            value = check()
            if value:
                return value
        except Exception as exc:  # a poll that fails is just not ready yet
            last_error = f" (last error: {exc})"
        if time.monotonic() > deadline:
            extra = on_fail() if on_fail else ""
            raise VMTestError(
                f"timed out after {timeout:.0f} s waiting for {what}{last_error}\n{extra}"
            )
        time.sleep(interval)


@dataclass(frozen=True)
class Distro:
    name: str  # also the guest's name and the Ansible inventory host
    suite: str
    python: str  # X.Y of the guest's /usr/bin/python3, the artifact's target


DISTROS = (Distro("debian12", "bookworm", "3.11"), Distro("debian13", "trixie", "3.13"))


@dataclass
class Guest:
    """One QEMU/TCG guest: a qcow2 overlay on the cached base image, a blank 4 GiB data
    disk (/dev/vdb) and a foreign disk (/dev/vdc: ext2 with a file, built on the host)."""

    distro: Distro
    image: Path
    run_dir: Path
    ssh_key: Path
    artifact: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    boots: int = 0
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.distro.name

    def path(self, suffix: str) -> Path:
        return self.run_dir / f"{self.name}-{suffix}"

    @property
    def serial_log(self) -> Path:
        return self.path("serial.log")

    @property
    def pidfile(self) -> Path:
        return self.path("qemu.pid")

    # --- disks -------------------------------------------------------------------------

    def create_disks(self) -> None:
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b",
             str(self.image / "rootfs.raw"), str(self.path("root.qcow2"))],
            check=True,
        )  # fmt: skip
        with open(self.path("data.raw"), "wb") as fh:
            fh.truncate(4 * 1024**3)
        foreign = self.path("foreign")
        foreign.mkdir(exist_ok=True)
        (foreign / "precious.txt").write_text(f"data of another service on {self.name}\n")
        with open(self.path("foreign.raw"), "wb") as fh:
            fh.truncate(64 * 1024**2)
        subprocess.run(
            ["mkfs.ext2", "-q", "-F", "-L", "precious", "-d", str(foreign), str(self.path("foreign.raw"))],
            check=True,
        )  # fmt: skip

    # --- power -------------------------------------------------------------------------

    def qemu_argv(self) -> list[str]:
        pub = base64.b64encode(self.ssh_key.with_suffix(".pub").read_bytes().strip()).decode()
        cmdline = (
            "root=/dev/vda rw console=ttyS0,115200 net.ifnames=0 panic=-1 "
            # TCG: the kernel finds the TSCs "unsynchronized" and falls back to the HPET, an
            # emulated MMIO read under QEMU's big lock on every clock_gettime; and with
            # -cpu max it turns on PTI, a full softmmu TLB flush per syscall. A throw-away
            # test guest needs neither.
            "clocksource=tsc tsc=reliable mitigations=off "
            # On a loaded 2-core host a TCG boot can take minutes: no unit may time out.
            "systemd.default_timeout_start_sec=600 "
            f"systemd.hostname={self.name} vmtest.sshkey={pub}"
        )
        drives = []
        for i, (name, fmt) in enumerate(
            (("root.qcow2", "qcow2"), ("data.raw", "raw"), ("foreign.raw", "raw"))
        ):
            drives += [
                "-drive", f"file={self.path(name)},format={fmt},if=none,id=d{i},cache=writeback",
                "-device", f"virtio-blk-pci,drive=d{i},serial=vmtest-{i}",
            ]  # fmt: skip
        return [
            "qemu-system-x86_64", "-name", f"stagerd-vmtest-{self.name}",
            "-accel", "tcg", "-cpu", "max", "-smp", "2", "-m", "2048",
            "-nodefaults", "-display", "none", "-no-reboot", "-monitor", "none",
            "-kernel", str(self.image / "vmlinuz"), "-initrd", str(self.image / "initrd.img"),
            "-append", cmdline, *drives,
            "-netdev", f"user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:{self.port}-:22",
            "-device", "virtio-net-pci,netdev=n0",
            "-chardev", f"file,id=ser0,path={self.serial_log},append=on",
            "-serial", "chardev:ser0",
            "-pidfile", str(self.pidfile),
        ]  # fmt: skip

    def start(self) -> None:
        """Power on (the disks keep their state across power cycles)."""
        assert self.proc is None or self.proc.poll() is not None, "guest already running"
        self.boots += 1
        with self.serial_log.open("a") as fh:
            fh.write(f"\n===== vmtest: power on #{self.boots} {time.strftime('%H:%M:%S')} =====\n")
        self.proc = subprocess.Popen(
            self.qemu_argv(), stdin=subprocess.DEVNULL,
            stdout=self.path("qemu.log").open("ab"), stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip

    def boot(self, timeout: float = 900) -> float:
        """Power on and wait for SSH and ``systemctl is-system-running`` = running."""
        t0 = time.monotonic()
        self.start()
        wait_for(
            f"{self.name}: SSH on 127.0.0.1:{self.port}",
            lambda: self._alive() and self.ssh("true", timeout=20, check=False).returncode == 0,
            timeout, interval=2, on_fail=self.diagnostics,
        )  # fmt: skip
        left = max(30.0, timeout - (time.monotonic() - t0))
        state = self.ssh(
            f"timeout {int(left)} systemctl is-system-running --wait",
            timeout=left + 20,
            check=False,
        ).stdout.strip()
        if state != "running":
            failed = self.ssh("systemctl --failed --no-legend; journalctl -b -p err -n 40 --no-pager",
                              check=False).stdout  # fmt: skip
            raise VMTestError(f"{self.name}: system state {state!r} after boot, not running:\n{failed}\n"
                              + self.diagnostics())  # fmt: skip
        took = time.monotonic() - t0
        log(f"{self.name}: booted (#{self.boots}) in {took:.0f} s")
        return took

    def _alive(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise VMTestError(f"{self.name}: QEMU exited with {self.proc.returncode}\n"
                              f"{self.path('qemu.log').read_text(errors='replace')[-2000:]}")  # fmt: skip
        return True

    def kill(self) -> None:
        """Pull the plug: SIGKILL to QEMU, nothing flushed by the guest survives."""
        self._close_master()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                log(f"{self.name}: QEMU pid {self.proc.pid} did not die within 30 s")
        with contextlib.suppress(FileNotFoundError):
            self.pidfile.unlink()

    def _close_master(self) -> None:
        cm = self.path("ssh.cm")
        if cm.exists():
            subprocess.run(["ssh", *self._ssh_opts(), "-O", "exit", "root@127.0.0.1"],
                           capture_output=True, timeout=10, check=False)  # fmt: skip
            with contextlib.suppress(FileNotFoundError):
                cm.unlink()

    # --- SSH ---------------------------------------------------------------------------

    def _ssh_opts(self) -> list[str]:
        return [
            "-i", str(self.ssh_key), "-p", str(self.port),
            "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
            "-o", "ConnectTimeout=15", "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=6",
            "-o", "ControlMaster=auto", "-o", f"ControlPath={self.path('ssh.cm')}",
            "-o", "ControlPersist=300",
        ]  # fmt: skip

    def ssh(self, command: str, *, timeout: float = 120, check: bool = True,
            input: bytes | None = None) -> subprocess.CompletedProcess[str]:  # fmt: skip
        """Run *command* (a shell line) as root in the guest."""
        try:
            proc = subprocess.run(
                ["ssh", *self._ssh_opts(), "root@127.0.0.1", command],
                input=input, capture_output=True, timeout=timeout, check=False,
            )  # fmt: skip
        except subprocess.TimeoutExpired as exc:
            raise VMTestError(
                f"{self.name}: `{command}` did not finish within {timeout:.0f} s"
            ) from exc
        out = subprocess.CompletedProcess(
            proc.args, proc.returncode, proc.stdout.decode(errors="replace"),
            proc.stderr.decode(errors="replace"),
        )  # fmt: skip
        if check and out.returncode != 0:
            raise VMTestError(f"{self.name}: `{command}` exited {out.returncode}\n"
                              f"stdout: {out.stdout[-3000:]}\nstderr: {out.stderr[-3000:]}")  # fmt: skip
        return out

    def put(self, data: bytes, dest: str, mode: str = "0644") -> None:
        self.ssh(f"install -D -m {mode} /dev/stdin {shlex.quote(dest)}", input=data)

    def unit(self, name: str, *props: str) -> dict[str, str]:
        out = self.ssh(f"systemctl show {name} " + " ".join(f"-p {p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def stagerd_json(self, args: str, timeout: float = 120) -> Any:
        return json.loads(self.ssh(f"{STAGERD} {args}", timeout=timeout).stdout)

    def batch(self, batch_id: str) -> dict[str, Any] | None:
        out = self.ssh(f"{STAGERD} db results {shlex.quote(batch_id)}", check=False, timeout=120)
        return json.loads(out.stdout) if out.returncode == 0 else None

    def scratch_entries(self) -> list[str]:
        out = self.ssh(f"find {SCRATCH} -mindepth 1 -maxdepth 1 -not -name '.*' -printf '%f\\n'")
        return out.stdout.split()

    # --- failure output ----------------------------------------------------------------

    def console_tail(self, lines: int = 60) -> str:
        try:
            text = self.serial_log.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return "(no serial console log)"
        return f"--- {self.serial_log} (last {lines} lines) ---\n" + "\n".join(text[-lines:])

    def diagnostics(self) -> str:
        parts = []
        if self.proc is not None and self.proc.poll() is None:
            out = self.ssh(
                "systemctl --failed --no-legend; systemctl status --no-pager -n 0 stagerd-gpu stagerd-transfer;"
                " journalctl --no-pager -n 60 -u stagerd-gpu -u stagerd-transfer -u stagerd-janitor",
                timeout=30, check=False,
            ) if self._ssh_possible() else None  # fmt: skip
            if out is not None:
                parts.append(f"--- {self.name}: units and journal ---\n{out.stdout}{out.stderr}")
        parts.append(self.console_tail())
        return "\n".join(parts)

    def _ssh_possible(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=2):
                return True
        except OSError:
            return False


def on_each(
    guests: Sequence[Guest], scenario: Callable[[Guest], T], parallel: bool = True
) -> list[T]:
    """Run *scenario* on every guest (in threads unless told not to); a failure names its
    guest and carries that guest's diagnostics."""
    results: dict[str, T] = {}
    errors: dict[str, BaseException] = {}

    def one(guest: Guest) -> None:
        try:
            results[guest.name] = scenario(guest)
        except BaseException as exc:
            errors[guest.name] = exc

    if parallel and len(guests) > 1:
        threads = [threading.Thread(target=one, args=(g,), name=g.name) for g in guests]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        for g in guests:
            one(g)
    if errors:
        by_name = {g.name: g for g in guests}
        report = []
        for name, exc in errors.items():
            diag = (
                ""
                if isinstance(exc, VMTestError) and "---" in str(exc)
                else by_name[name].diagnostics()
            )
            report.append(f"=== {name}: {type(exc).__name__}: {exc}\n{diag}")
        raise VMTestError("\n".join(report))
    return [results[g.name] for g in guests]


# --- Ansible -----------------------------------------------------------------------------


def role_vars() -> dict[str, Any]:
    """The inventory of the test: the guest's own services, a small scratch budget."""
    return {
        "ansible_user": "root",
        "ansible_python_interpreter": "/usr/bin/python3",
        "stagerd_s3_endpoint": "http://127.0.0.1:8333",
        "stagerd_s3_bucket": BUCKET,
        "stagerd_s3_access_key": S3_ACCESS_KEY,
        "stagerd_s3_secret_key": S3_SECRET_KEY,
        "stagerd_redis_url": "redis://127.0.0.1:6379/0",
        "stagerd_database_url": "postgresql://postgres@127.0.0.1:5432/postgres",
        "stagerd_env": {
            "STAGERD_PROCESSOR": PROCESSOR,
            "STAGERD_SCRATCH_BUDGET": "1GiB",
            "STAGERD_SCRATCH_HEADROOM": "256MiB",
        },
    }


@dataclass(frozen=True)
class PlayResult:
    returncode: int
    output: str
    recap: dict[str, dict[str, int]]
    seconds: float
    log: Path


def run_playbook(playbook: str, guests: Iterable[Guest], run_dir: Path, tag: str,
                 extra_vars: dict[str, Any] | None = None, timeout: float = 900) -> PlayResult:  # fmt: skip
    """ansible-playbook from the host over SSH to the guests' forwarded ports."""
    guests = list(guests)
    hosts = {
        g.name: {
            "ansible_host": "127.0.0.1",
            "ansible_port": g.port,
            "ansible_ssh_private_key_file": str(g.ssh_key),
            "stagerd_artifact_src": str(g.artifact),
        }
        for g in guests
    }
    inventory = run_dir / f"inventory-{tag}.yml"
    inventory.write_text(yaml.safe_dump({"all": {
        "vars": role_vars(),
        "children": {"gpu_workers": {"hosts": hosts}, "transfer_hosts": {"hosts": hosts}},
    }}))  # fmt: skip
    home = run_dir / "ansible-home"
    (home / "tmp").mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "ANSIBLE_CONFIG": str(ANSIBLE_DIR / "ansible.cfg"),
        "ANSIBLE_HOME": str(home),
        "ANSIBLE_LOCAL_TEMP": str(home / "tmp"),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_FORKS": "5",
        "ANSIBLE_TIMEOUT": "30",
        "ANSIBLE_SSH_ARGS": "-o ControlMaster=auto -o ControlPersist=120s -o StrictHostKeyChecking=no "
        "-o UserKnownHostsFile=/dev/null -o ServerAliveInterval=5 -o ServerAliveCountMax=12",
        "ANSIBLE_SSH_CONTROL_PATH_DIR": str(home / "cp"),
        "ANSIBLE_HOST_KEY_CHECKING": "0",
    }
    argv = [str(VENV_BIN / "ansible-playbook"), "-i", str(inventory), str(ANSIBLE_DIR / playbook)]
    if extra_vars:
        argv += ["-e", json.dumps(extra_vars)]
    logfile = run_dir / f"ansible-{tag}.log"
    log(f"ansible-playbook {playbook} ({tag}) on {', '.join(hosts)}; log {logfile}")
    t0 = time.monotonic()
    # Streamed to the log file as it runs (tail -f it to watch a slow play).
    with logfile.open("w") as out:
        proc = subprocess.Popen(argv, cwd=ANSIBLE_DIR, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
        try:
            rc = proc.wait(timeout=timeout)
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            output = logfile.read_text(errors="replace")
            raise VMTestError(f"ansible-playbook {playbook} ({tag}) did not finish within "
                              f"{timeout:.0f} s (or was interrupted); log {logfile}:\n{output[-4000:]}") from None  # fmt: skip
    took = time.monotonic() - t0
    output = logfile.read_text(errors="replace")
    recap = {
        m["host"]: {k: int(v) for k, v in m.groupdict().items() if k != "host"}
        for m in RECAP.finditer(output)
    }
    log(f"ansible-playbook {playbook} ({tag}): rc {rc} in {took:.0f} s, recap {recap}")
    return PlayResult(rc, output, recap, took, logfile)
