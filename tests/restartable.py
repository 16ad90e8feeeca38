"""Private Redis and PostgreSQL servers a test may stop, kill and restart at will.

The shared services of build/services.sh must never be restarted by a test, so restart
tests run their own instance on a free loopback port:

    with RedisServer(tmp_path / "redis") as redis_srv:
        url = redis_srv.url          # redis://127.0.0.1:PORT/0
        redis_srv.restart()          # same port, same data (append-only file)
        redis_srv.kill()             # SIGKILL, as a crash; start() brings it back

    with PostgresServer(tmp_path / "pg") as pg:
        pg.url                        # postgresql://postgres@127.0.0.1:PORT/postgres (trust)
        pg.restart(mode="immediate")  # crash-like stop, recovery on start

Every wait is bounded; a server that does not come up raises RuntimeError with its log tail.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

START_TIMEOUT = 30.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _log_tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class RedisServer:
    """redis-server on a free port; ``durable`` keeps data across restarts (AOF, fsync always).

    Snapshots are off (``--save ""``) either way; without ``durable`` a restart starts empty.
    """

    def __init__(self, workdir: Path, *, durable: bool = True, port: int | None = None) -> None:
        self.workdir = workdir
        self.durable = durable
        self.port = port or free_port()
        self.log = workdir / "redis.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        if self.running:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        args = [binary, "--bind", "127.0.0.1", "--port", str(self.port), "--save", ""]
        args += ["--dir", str(self.workdir), "--logfile", str(self.log), "--daemonize", "no"]
        args += ["--appendonly", "yes", "--appendfsync", "always"] if self.durable else []
        self._proc = subprocess.Popen(args, stdin=subprocess.DEVNULL)
        self._wait_ready()

    def _wait_ready(self) -> None:
        import redis

        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                break
            try:
                with redis.Redis(port=self.port, socket_timeout=1) as client:
                    if client.ping():
                        return
            except redis.exceptions.RedisError:
                time.sleep(0.05)
        raise RuntimeError(
            f"redis-server on port {self.port} did not start:\n{_log_tail(self.log)}"
        )

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM and wait (a clean shutdown; the AOF is complete)."""
        self._signal(signal.SIGTERM, timeout)

    def kill(self) -> None:
        """SIGKILL: a crash. With ``durable``, fsync-always AOF keeps every acknowledged write."""
        self._signal(signal.SIGKILL, 10.0)

    def restart(self, *, down_for: float = 0.0, crash: bool = False) -> None:
        self.kill() if crash else self.stop()
        if down_for:
            time.sleep(down_for)
        self.start()

    def _signal(self, sig: signal.Signals, timeout: float) -> None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        # The port must be free before a restart binds it again.
        deadline = time.monotonic() + 10
        while _port_open(self.port) and time.monotonic() < deadline:
            time.sleep(0.05)

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


def postgres_bindir() -> Path:
    """The newest Debian PostgreSQL binaries (/usr/lib/postgresql/N/bin) or $PG_BINDIR."""
    env = os.environ.get("STAGERD_PG_BINDIR")
    if env:
        return Path(env)
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name)
    )
    if not found:
        raise RuntimeError(
            "no PostgreSQL binaries under /usr/lib/postgresql (apt install postgresql)"
        )
    return found[-1].parent


class PostgresServer:
    """A private PostgreSQL cluster on a free port, trust auth, superuser ``postgres``.

    initdb refuses to run as root, so as root the cluster belongs to the ``postgres`` OS user
    and lives in a directory of its own under the system temp dir (pytest's tmp_path is not
    reachable for other users); *workdir* then only holds the log. Removed by :meth:`close`.
    """

    def __init__(self, workdir: Path, *, port: int | None = None) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.bindir = postgres_bindir()
        self._as_root = os.geteuid() == 0
        self._home = Path(tempfile.mkdtemp(prefix="stagerd-pg-")) if self._as_root else workdir
        self.datadir = self._home / "data"
        self.log = self._home / "postgres.log"
        self._initialised = False

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if self._as_root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd="/")

    def _init(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self._as_root:
            shutil.chown(self._home, "postgres", "postgres")
        result = self._run(
            "initdb", "-D", str(self.datadir), "-U", "postgres", "-A", "trust", "-N",
            "--encoding", "UTF8", "--locale", "C",
        )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"initdb failed: {result.stderr.strip() or result.stdout.strip()}")
        self._initialised = True

    def start(self) -> None:
        if not self._initialised:
            self._init()
        if self.running:
            return
        # fsync off: only an OS crash could lose data, and these clusters never outlive one.
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={self._home}"
            " -c fsync=off -c full_page_writes=off"
        )
        result = self._run(
            "pg_ctl", "-D", str(self.datadir), "-l", str(self.log), "-o", options,
            "-w", "-t", str(int(START_TIMEOUT)), "start",
        )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(
                f"PostgreSQL on port {self.port} did not start: {result.stdout.strip()}\n"
                f"{_log_tail(self.log)}"
            )

    @property
    def running(self) -> bool:
        return (
            self._initialised
            and self._run("pg_ctl", "-D", str(self.datadir), "status").returncode == 0
        )

    def stop(self, mode: str = "fast") -> None:
        """pg_ctl stop: ``fast`` (disconnect clients, clean) or ``immediate`` (crash-like)."""
        if not self.running:
            return
        result = self._run("pg_ctl", "-D", str(self.datadir), "-m", mode, "-w", "-t", "30", "stop")
        if result.returncode != 0:
            raise RuntimeError(f"PostgreSQL did not stop: {result.stderr.strip()}")

    def restart(self, *, mode: str = "fast", down_for: float = 0.0) -> None:
        self.stop(mode)
        if down_for:
            time.sleep(down_for)
        self.start()

    def close(self) -> None:
        """Stop (immediately) and remove the cluster."""
        if self._initialised:
            self.stop("immediate")
        if self._as_root:
            shutil.rmtree(self._home, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
