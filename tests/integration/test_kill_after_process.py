"""Issue 17: a worker that dies at any moment after its processor finished never makes the
batch run on the GPU again, and one that dies while the processor runs takes the
processor's whole tree with it.

The resume marker (``processed.json``) appears through the processor's reaper the moment
the processor exits 0, before the worker hears of it (:mod:`stagerd.gpu.resume`). The
test makes that moment explicit: the processor itself SIGSTOPs the worker (its reaper's
parent) just before exiting, so the worker cannot write anything; then the worker is
SIGKILLed and restarted under the same identity.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
from pathlib import Path
from typing import Any

from tests.reliability_support import Proc, assert_done, run_lines, watching
from tests.worker_support import WAVINFO, make_tar, put_batch, scratch_leftovers, wait_for


def _stopping_processor(runs: Path) -> str:
    """Counts starts and ends like start_end_processor; SIGSTOPs the worker before exit."""
    quoted = shlex.quote(str(runs))
    script = (
        f'echo "start $STAGERD_BATCH_ID" >> {quoted}; {WAVINFO}; rc=$?; '
        # $PPID is the reaper; the 4th field of its stat is the worker.
        "kill -STOP $(cut -d' ' -f4 /proc/$PPID/stat); "
        f'echo "end $STAGERD_BATCH_ID" >> {quoted}; exit $rc'
    )
    return f"sh -c {shlex.quote(script)}"


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return "gone"


def test_a_worker_killed_after_the_processor_exited_commits_without_a_second_run(
    stagerd_env: dict[str, str],
    s3_client: Any,
    s3_bucket: str,
    redis_client: Any,
    queue_name: str,
    database_url: str,
    scratch_dir: Path,
    tmp_path: Path,
) -> None:
    runs = tmp_path / "runs"
    put_batch(s3_client, redis_client, s3_bucket, queue_name, "ka1", make_tar(files=2))
    marker = scratch_dir / "ka1" / "processed.json"
    with watching([]) as procs:
        first = Proc({**stagerd_env, "STAGERD_PROCESSOR": _stopping_processor(runs)},
                     tmp_path / "w1.log", "gpu", "--burst")  # fmt: skip
        procs.append(first)
        wait_for(lambda: run_lines(runs, "end") == ["ka1"], 60, "the processor finished")
        assert _state(first.popen.pid) == "T"  # stopped before it could learn of the exit
        wait_for(marker.exists, 30, "the reaper's marker")
        pending = json.loads(marker.read_text())
        assert pending["batch_id"] == "ka1" and pending["process_seconds"] is None
        # No SIGCONT first (Proc.kill sends one): the worker must not run another step.
        os.killpg(first.popen.pid, signal.SIGKILL)
        first.popen.wait(30)
        # The same identity again, now with a processor that would count a second run.
        second = Proc({**stagerd_env, "STAGERD_PROCESSOR": _stopping_processor(runs)},
                      tmp_path / "w2.log", "gpu", "--burst")  # fmt: skip
        procs.append(second)
        assert second.popen.wait(120) == 0, second.tail()
        assert second.has("commit_resumed", "ka1"), second.tail()

    assert run_lines(runs, "start") == ["ka1"]
    assert_done(database_url, "ka1", 2)
    assert redis_client.llen(queue_name) == 0
    assert scratch_leftovers(scratch_dir) == []


def test_a_worker_killed_while_the_processor_runs_ends_its_tree_and_marks_nothing(
    stagerd_env: dict[str, str],
    s3_client: Any,
    s3_bucket: str,
    redis_client: Any,
    queue_name: str,
    scratch_dir: Path,
    tmp_path: Path,
) -> None:
    pids = tmp_path / "pids"
    # A processor that leaves a detached helper behind and keeps running.
    script = (
        f"(setsid sleep 600 & echo $! >> {pids}) ; echo $$ >> {pids}; "
        f"touch {tmp_path}/running; sleep 600"
    )
    put_batch(s3_client, redis_client, s3_bucket, queue_name, "ka2", make_tar(files=1))
    env = {**stagerd_env, "STAGERD_PROCESSOR": f"sh -c {shlex.quote(script)}"}
    with watching([]) as procs:
        worker = Proc(env, tmp_path / "w.log", "gpu", "--burst")
        procs.append(worker)
        wait_for((tmp_path / "running").exists, 60, "the processor running")
        tree = [int(p) for p in pids.read_text().split()]
        assert len(tree) == 2 and all(_state(p) not in ("gone", "Z") for p in tree)
        os.kill(worker.popen.pid, signal.SIGKILL)  # the worker alone: its reaper must act
        worker.popen.wait(30)
        # A bound, not a speed claim: the reaper reacts to its parent's death at once.
        wait_for(lambda: all(_state(p) in ("gone", "Z") for p in tree), 30, "the tree ended")
    batch_dir = scratch_dir / "ka2"
    assert not (batch_dir / "processed.json").exists()
    assert (batch_dir / ".processed.json.pending").exists()  # never promoted
