"""Issue 17, item 6: a second process with the same worker id on one host is refused at
once, in one line (it used to wait ~1.5 x TTL, minutes in production); the first one
keeps working."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.reliability_support import Proc
from tests.worker_support import WAVINFO, wait_for


def test_a_duplicate_worker_id_on_one_host_is_refused_at_once(
    stagerd_env: dict[str, str], redis_client: Any, run_cli: Any, tmp_path: Path
) -> None:
    # A long TTL: the old behaviour (wait for the heartbeat to expire) would take 90 s.
    env = {**stagerd_env, "STAGERD_HEARTBEAT_TTL": "60s", "STAGERD_PROCESSOR": WAVINFO}
    first = Proc(env, tmp_path / "first.log", "gpu")
    try:
        wait_for(lambda: any("ready" in str(r.get("msg")) for r in first.events()), 60, "ready")
        second = run_cli(["gpu"], env=env, timeout=40)
        assert second.returncode == 1
        lines = second.stderr.strip().splitlines()
        assert lines[-1] == (
            f"stagerd: error: worker id {env['STAGERD_WORKER_ID']!r} is already running on "
            f"this host (pid {first.popen.pid}); give each process its own STAGERD_WORKER_ID"
        ), second.stderr
        assert "Traceback" not in second.stderr
        assert first.popen.poll() is None  # the first one is untouched
    finally:
        first.kill()
