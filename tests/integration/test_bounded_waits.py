"""Issue 17 (e): a stopped process (SIGSTOP) holding the scratch admission lock, as a
janitor stopped inside its critical section does. The worker logs the wait, naming the
holder's pid, within 30 s; the systemd watchdog stops being fed while the slot makes no
progress (WatchdogSec would restart it: never a silent hang); once the holder is resumed
and lets go, the worker carries on, the batch ends done and the watchdog is fed again."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from stagerd.db import ledger as db
from tests.conftest import ROOT, base_env
from tests.reliability_support import Proc
from tests.worker_support import WAVINFO, make_tar, put_batch, wait_for

# Takes the admission lock through the scratch manager's own code path, then holds it.
HOLDER = """
import sys
from pathlib import Path
from stagerd.scratch.space import ScratchManager
manager = ScratchManager(Path(sys.argv[1]), 1 << 30, 0)
with manager.admission_lock():
    print("held", flush=True)
    sys.stdin.read()
"""


class Notify:
    """A systemd notify socket that keeps reading, as systemd does."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.5)
        self.messages: list[str] = []
        self._on = True
        self._thread = threading.Thread(target=self._listen, daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        while self._on:
            with contextlib.suppress(TimeoutError, OSError):
                self.messages.append(self.sock.recv(300).decode())

    def watchdogs(self) -> int:
        return self.messages.count("WATCHDOG=1")

    def close(self) -> None:
        self._on = False
        self._thread.join(5)
        self.sock.close()


def test_worker_waits_visibly_for_a_stopped_lock_holder_and_carries_on(
    stagerd_env: dict[str, str],
    s3_client: Any,
    s3_bucket: str,
    redis_client: Any,
    queue_name: str,
    database_url: str,
    scratch_dir: Path,
    tmp_path: Path,
) -> None:
    notify = Notify(tmp_path / "notify.sock")
    env = {
        **stagerd_env,
        "STAGERD_PROCESSOR": WAVINFO,
        "NOTIFY_SOCKET": notify.path,
        "WATCHDOG_USEC": "8000000",  # WatchdogSec=8s: starved after 6 s without progress
    }
    worker = Proc(env, tmp_path / "worker.log", "gpu")
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(scratch_dir)],
        env=base_env(),
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: any(m.startswith("READY=1") for m in notify.messages), 60, "READY")
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        holder.send_signal(signal.SIGSTOP)
        put_batch(s3_client, redis_client, s3_bucket, queue_name, "bw1", make_tar(files=2))
        waits = wait_for(
            lambda: [r for r in worker.events() if r.get("event") == "lock_wait"], 30, "lock_wait"
        )
        assert waits[0]["pid"] == holder.pid and f"pid {holder.pid}" in waits[0]["msg"]
        wait_for(lambda: worker.has("watchdog_starved"), 60, "watchdog starved")
        starved_at = notify.watchdogs()
        time.sleep(3)  # the slot is still stuck: no tick may arrive meanwhile
        assert notify.watchdogs() <= starved_at + 1  # at most one tick in flight
        holder.send_signal(signal.SIGCONT)
        assert holder.stdin is not None
        holder.stdin.close()
        assert holder.wait(30) == 0
        ledger = db.Ledger(database_url)
        try:
            wait_for(
                lambda: getattr(ledger.batch("bw1"), "state", None) == "done",
                60,
                "bw1 done",
                interval=0.5,
            )
        finally:
            ledger.close()
        wait_for(lambda: notify.watchdogs() > starved_at + 2, 30, "watchdog fed again")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{worker.tail()}") from None
    finally:
        holder.send_signal(signal.SIGCONT)
        holder.kill()
        holder.wait(10)
        worker.kill()
        notify.close()
