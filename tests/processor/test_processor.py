"""stagerd.processor.runner with real child processes (the shipped wavinfo sample and sh)."""

from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import sys
import tarfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from stagerd.errors import ConfigError, ProcessorFailed, ResultsRejected
from stagerd.processor.runner import (
    PersistentProcessor,
    ProcessOutcome,
    ProcessRequest,
    make_processor,
    read_results,
    scrub_env,
)
from stagerd.results import ResultLimits
from stagerd.samples.makebatch import make_batch

PY = shlex.quote(sys.executable)
WAVINFO = f"{PY} -m stagerd.samples.wavinfo"
ROOT = Path(__file__).resolve().parents[2]
ENV = {"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT), "LANG": "C.UTF-8"}


def batch(tmp_path: Path, batch_id: str = "b1", files: int = 3) -> ProcessRequest:
    batch_dir = tmp_path / batch_id
    input_dir = batch_dir / "input"
    input_dir.mkdir(parents=True)
    archive = make_batch(tmp_path / f"{batch_id}.tar", files, seed=1)
    with tarfile.open(archive.path) as tar:
        tar.extractall(input_dir)
    return ProcessRequest(batch_id, batch_dir, input_dir, batch_dir / "results.jsonl")


def loaded(outcome: ProcessOutcome) -> list[tuple[str, Any]]:
    """The streamed, validated rows of *outcome*, parsed (small test files only)."""
    return [(item, json.loads(raw.text)) for item, raw in outcome.results]


def dead(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")


def wait_dead(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if dead(pid):
            return True
        time.sleep(0.05)
    return False


def test_oneshot_runs_wavinfo_and_returns_validated_results(tmp_path: Path) -> None:
    req = batch(tmp_path)
    proc = make_processor(WAVINFO, env=ENV)
    outcome = proc.run(req, timeout=30)
    proc.close()
    rows = loaded(outcome)
    assert [item for item, _ in rows] == ["000001.wav", "000002.wav", "000003.wav"]
    first = rows[0][1]
    assert first["sample_rate"] == 16000 and first["channels"] == 1
    assert first["duration"] == pytest.approx(1.0) and first["bytes"] == 32044
    assert outcome.seconds > 0


def test_child_env_has_batch_vars_and_no_secrets(tmp_path: Path) -> None:
    req = batch(tmp_path)
    script = (
        "import os, json; "
        "open(os.environ['STAGERD_RESULTS'], 'w').write(json.dumps("
        "{'item': 'env', 'env': dict(os.environ), 'cwd': os.getcwd()}) + '\\n')"
    )
    env = {
        **ENV,
        "S3_ACCESS_KEY": "AKIA-secret-id",
        "S3_SECRET_KEY": "s3-secret",
        "DATABASE_URL": "postgresql://u:pw@db/x",
        "REDIS_URL": "redis://:pw@r:6379/0",
        "PGPASSWORD": "pw",
        "SMTP_PASSWORD": "pw",
        "MY_SECRET_THING": "x",
        "aws_secret_access_key": "x",
        "HF_TOKEN": "x",
        "S3_ENDPOINT": "http://s3:8333",
        "CUDA_VISIBLE_DEVICES": "0",
    }
    outcome = make_processor(f"{PY} -c {shlex.quote(script)}", env=env).run(req, timeout=30)
    [(_, result)] = loaded(outcome)
    child = result["env"]
    for secret in ("S3_ACCESS_KEY", "S3_SECRET_KEY", "DATABASE_URL", "REDIS_URL", "PGPASSWORD",
                   "SMTP_PASSWORD", "MY_SECRET_THING", "aws_secret_access_key", "HF_TOKEN"):  # fmt: skip
        assert secret not in child
    assert child["S3_ENDPOINT"] == "http://s3:8333" and child["CUDA_VISIBLE_DEVICES"] == "0"
    assert child["STAGERD_BATCH_ID"] == "b1"
    assert child["STAGERD_INPUT_DIR"] == str(req.input_dir)
    assert child["STAGERD_RESULTS"] == str(req.results_path)
    assert result["cwd"] == str(req.batch_dir)
    dumped = json.dumps(child)
    assert "s3-secret" not in dumped and "AKIA-secret-id" not in dumped and ":pw@" not in dumped


def test_output_lines_are_logged_with_the_batch_id(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    req = batch(tmp_path, "b-log")
    command = "sh -c 'echo to-stdout; echo to-stderr >&2'"
    with (
        caplog.at_level(logging.INFO, logger="stagerd"),
        pytest.raises(ProcessorFailed, match="no results file"),
    ):
        make_processor(command, env=ENV).run(req, timeout=30)
    lines = {(r.stream, r.getMessage()) for r in caplog.records if hasattr(r, "stream")}  # type: ignore[attr-defined]
    assert ("stdout", "processor stdout [b-log]: to-stdout") in lines
    assert ("stderr", "processor stderr [b-log]: to-stderr") in lines
    assert all(r.batch_id == "b-log" for r in caplog.records if hasattr(r, "stream"))  # type: ignore[attr-defined]


def test_nonzero_exit_fails_with_the_last_stderr_line(tmp_path: Path) -> None:
    req = batch(tmp_path)
    with pytest.raises(ProcessorFailed, match=r"exited with status 1: wavinfo: batch b1: failing"):
        make_processor(f"{WAVINFO} --fail", env=ENV).run(req, timeout=30)


def test_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    req = batch(tmp_path)
    # The child ignores SIGTERM, so only the SIGKILL after the grace ends it.
    command = 'sh -c \'sh -c "trap \\"\\" TERM; sleep 30" & echo $! > child.pid; wait\''
    proc = make_processor(command, env=ENV, kill_grace=0.5)
    started = time.monotonic()
    with pytest.raises(ProcessorFailed, match="timed out after 1s"):
        proc.run(req, timeout=1)
    assert time.monotonic() - started < 10
    child = int((req.batch_dir / "child.pid").read_text())
    assert wait_dead(child)


def test_stop_event_kills_the_processor(tmp_path: Path) -> None:
    req = batch(tmp_path)
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    with pytest.raises(ProcessorFailed, match="shutting down"):
        make_processor("sleep 30", env=ENV, kill_grace=1).run(req, timeout=60, stop=stop)


@pytest.mark.parametrize(
    ("content", "why"),
    [
        ("not json\n", "line 1 is not JSON"),
        ('{"item": "a"}\n[1, 2]\n', "line 2 is not a JSON object"),
        ('{"item": 7}\n', "lacks a non-empty string 'item'"),
        ('{"item": "a"}\n{"item": "a"}\n', "repeat item 'a'"),
        ('{"item": "a", "v": NaN}\n', "NaN is not valid JSON"),
        ('{"item": "a", "v": "x\\u0000y"}\n', "NUL character"),
        ('{"item": "a", "v\\ud800": 1}\n', "lone UTF-16 surrogate"),
        ('{"item": "a", "v": "\\udc80"}\n', "lone UTF-16 surrogate"),
        ('{"item": "' + "x" * 2049 + '"}\n', "item is longer than 2048 bytes"),
        ("[" * 100_000 + "]" * 100_000 + "\n", "nested too deeply|not a JSON object"),
    ],
)
def test_bad_results_files_fail(tmp_path: Path, content: str, why: str) -> None:
    path = tmp_path / "results.jsonl"
    path.write_text(content)
    with pytest.raises(ResultsRejected, match=why):
        read_results(path)


def test_results_file_rules(tmp_path: Path) -> None:
    path = tmp_path / "results.jsonl"
    path.write_bytes(b'{"item": "a", "v": "\xff"}\n')
    with pytest.raises(ResultsRejected, match="not UTF-8"):
        read_results(path)
    path.write_text('{"item": "a"}\n{"stagerd": "end", "count": 2}\n')
    with pytest.raises(ProcessorFailed, match="truncated: the trailer says 2 rows"):
        read_results(path)
    path.write_text('{"item": "a"}\n' * 4)
    with pytest.raises(ResultsRejected, match="more than 3 results"):
        read_results(path, ResultLimits(max_results=3))
    path.write_text('{"item": "a", "pad": "' + "x" * 100 + '"}\n')
    with pytest.raises(ResultsRejected, match="longer than 64 bytes"):
        read_results(path, ResultLimits(max_row_bytes=64))
    (tmp_path / "elsewhere").write_text('{"item": "secret"}\n')
    path.unlink()
    path.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ProcessorFailed, match="unreadable"):
        read_results(path)


def test_zero_results_need_the_explicit_trailer(tmp_path: Path) -> None:
    req = batch(tmp_path)
    req.results_path.write_text("stale from an earlier attempt\n")
    with pytest.raises(ProcessorFailed, match="no results file"):
        make_processor("true", env=ENV).run(req, timeout=30)
    empty = make_processor("sh -c ': > \"$STAGERD_RESULTS\"'", env=ENV)
    with pytest.raises(ProcessorFailed, match="no results for a non-empty input"):
        empty.run(req, timeout=30)
    trailer = "import json, os; open(os.environ['STAGERD_RESULTS'], 'w').write(json.dumps({'stagerd': 'end', 'count': 0}))"
    said_so = f"{PY} -c {shlex.quote(trailer)}"
    assert len(make_processor(said_so, env=ENV).run(req, timeout=30).results) == 0
    for name in os.listdir(req.input_dir):
        (req.input_dir / name).unlink()
    assert len(make_processor("true", env=ENV).run(req, timeout=30).results) == 0


def test_bad_results_from_a_real_run_fail(tmp_path: Path) -> None:
    req = batch(tmp_path)
    outcome = make_processor("sh -c 'echo nope > \"$STAGERD_RESULTS\"'", env=ENV).run(
        req, timeout=30
    )
    with pytest.raises(ResultsRejected, match="not JSON"):
        loaded(outcome)


def test_bad_commands_and_modes_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="empty command"):
        make_processor("  ")
    with pytest.raises(ConfigError, match="cannot parse"):
        make_processor("echo 'unterminated")
    with pytest.raises(ConfigError, match="not found"):
        make_processor("/no/such/processor --flag")
    with pytest.raises(ConfigError, match="oneshot, persistent"):
        make_processor("true", "sometimes")


def test_scrub_env_is_pure() -> None:
    env = {"A": "1", "S3_SECRET_KEY": "x", "db_password": "y", "AWS_ACCESS_KEY_ID": "z"}
    assert scrub_env(env) == {"A": "1"}


def persistent(args: str = "", **kw: float) -> PersistentProcessor:
    proc = make_processor(f"{WAVINFO} --persistent {args}", "persistent", env=ENV, **kw)
    assert isinstance(proc, PersistentProcessor)
    return proc


def test_persistent_serves_many_batches_from_one_process(tmp_path: Path) -> None:
    proc = persistent()
    try:
        first = proc.run(batch(tmp_path, "p1", files=2), timeout=30)
        pid = proc.pid
        second = proc.run(batch(tmp_path, "p2", files=4), timeout=30)
        assert proc.pid == pid and pid is not None
        assert len(first.results) == 2 and len(second.results) == 4
    finally:
        proc.close()
    assert pid is not None and wait_dead(pid)
    assert proc.pid is None


def test_persistent_failure_answer_keeps_the_process(tmp_path: Path) -> None:
    proc = persistent("--fail")
    try:
        with pytest.raises(ProcessorFailed, match=r"failing as asked \(--fail\)"):
            proc.run(batch(tmp_path, "p1"), timeout=30)
        pid = proc.pid
        with pytest.raises(ProcessorFailed):
            proc.run(batch(tmp_path, "p2"), timeout=30)
        assert proc.pid == pid
    finally:
        proc.close()


def test_persistent_process_that_dies_is_replaced(tmp_path: Path) -> None:
    marker = tmp_path / "die-once"
    proc = persistent(f"--die-if-exists {marker}")
    try:
        proc.run(batch(tmp_path, "p0"), timeout=30)
        first_pid = proc.pid
        marker.touch()
        with pytest.raises(ProcessorFailed, match="died during batch p1"):
            proc.run(batch(tmp_path, "p1"), timeout=30)
        outcome = proc.run(batch(tmp_path, "p2"), timeout=30)  # a fresh process
        assert len(outcome.results) == 3
        assert proc.pid not in (None, first_pid)
    finally:
        proc.close()


def test_persistent_timeout_kills_and_restarts(tmp_path: Path) -> None:
    proc = persistent("--sleep 2", kill_grace=0.5)
    try:
        with pytest.raises(ProcessorFailed, match="timed out"):
            proc.run(batch(tmp_path, "p1"), timeout=0.5)
        assert proc.pid is None
        outcome = proc.run(batch(tmp_path, "p2"), timeout=30)
        assert len(outcome.results) == 3
    finally:
        proc.close()


def test_persistent_child_env_has_no_secrets(tmp_path: Path) -> None:
    script = (
        "import os, sys, json\n"
        "for line in sys.stdin:\n"
        "    req = json.loads(line)\n"
        "    open(req['results'], 'w').write(json.dumps({'item': 'env', 'env': dict(os.environ)}))\n"
        "    print(json.dumps({'batch_id': req['batch_id'], 'ok': True}), flush=True)\n"
    )
    env = {**ENV, "S3_SECRET_KEY": "s3-secret", "DATABASE_URL": "postgresql://u:pw@h/d"}
    proc = make_processor(f"{PY} -c {shlex.quote(script)}", "persistent", env=env)
    try:
        [(_, result)] = loaded(proc.run(batch(tmp_path, "p1"), timeout=30))
    finally:
        proc.close()
    assert "S3_SECRET_KEY" not in result["env"] and "DATABASE_URL" not in result["env"]
    assert result["env"]["STAGERD_PROCESSOR_MODE"] == "persistent"


def test_a_child_that_already_exited_counts_even_when_stop_was_set(tmp_path: Path) -> None:
    """A worker paused past its lease resumes to find its processor finished *and* its stop
    set: the exit status wins, so the finished results can be kept for the next owner."""
    from stagerd.processor.child import Child
    from stagerd.processor.outputcap import OutputCap

    output = OutputCap("b1")
    child = Child(["/bin/sh", "-c", "exit 0"], env=dict(os.environ), cwd=tmp_path,
                  output=output, grace=1.0)  # fmt: skip
    try:
        # Until the reaper has exited, without reaping it (WNOWAIT): wait() still sees it.
        os.waitid(os.P_PID, child.proc.pid, os.WEXITED | os.WNOWAIT)
        stop = threading.Event()
        stop.set()
        assert child.wait(time.monotonic() + 60, stop) == 0
    finally:
        child.reap()
        output.finish()


def test_a_running_child_is_given_up_when_stop_is_set(tmp_path: Path) -> None:
    from stagerd.processor.child import Child
    from stagerd.processor.outputcap import OutputCap

    output = OutputCap("b1")
    child = Child(["/bin/sh", "-c", "exec sleep 300"], env=dict(os.environ), cwd=tmp_path,
                  output=output, grace=1.0)  # fmt: skip
    try:
        stop = threading.Event()
        stop.set()
        assert child.wait(time.monotonic() + 60, stop) is None
    finally:
        child.kill(0.0)
        output.finish()


def _pidfds() -> int:
    """How many pidfds this test process holds open."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[pidfd]"
        except OSError:
            continue
    return count


def test_a_wait_wakes_on_the_pidfd_and_never_polls_popen(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Popen.wait(timeout) naps up to 50 ms at a time: every batch paid that as idle GPU
    time before its commit. With a pidfd the wait never calls it."""
    import subprocess

    from stagerd.processor.child import Child
    from stagerd.processor.outputcap import OutputCap

    def no_polling(self: subprocess.Popen[bytes], timeout: float | None = None) -> int:
        assert timeout is None, "Popen.wait(timeout) polls: the pidfd should have woken us"
        return real_wait(self)

    real_wait = subprocess.Popen.wait
    monkeypatch.setattr(subprocess.Popen, "wait", no_polling)
    output = OutputCap("b1")
    running = Child(["/bin/sh", "-c", "exec sleep 300"], env=dict(os.environ), cwd=tmp_path,
                    output=output, grace=1.0)  # fmt: skip
    exiting = Child(["/bin/sh", "-c", "sleep 0.2; exit 3"], env=dict(os.environ), cwd=tmp_path,
                    output=output, grace=1.0)  # fmt: skip
    try:
        assert running.wait(time.monotonic() + 0.3, None) is None  # deadline, still running
        assert exiting.wait(time.monotonic() + 60, None) == 3
    finally:
        running.kill(0.0)
        exiting.reap()
        output.finish()


def test_without_a_pidfd_the_wait_falls_back_to_popen(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stagerd.processor import child as child_mod
    from stagerd.processor.outputcap import OutputCap

    monkeypatch.setattr(child_mod, "_pidfd", lambda pid: None)  # a kernel before 5.3
    output = OutputCap("b1")
    running = child_mod.Child(["/bin/sh", "-c", "exec sleep 300"], env=dict(os.environ),
                              cwd=tmp_path, output=output, grace=1.0)  # fmt: skip
    exiting = child_mod.Child(["/bin/sh", "-c", "exit 4"], env=dict(os.environ), cwd=tmp_path,
                              output=output, grace=1.0)  # fmt: skip
    try:
        assert running.wait(time.monotonic() + 0.3, None) is None
        assert exiting.wait(time.monotonic() + 60, None) == 4
    finally:
        running.kill(0.0)
        exiting.reap()
        output.finish()


def test_runs_that_end_every_way_leave_no_pidfd_open(tmp_path: Path) -> None:
    before = _pidfds()
    oneshot = make_processor(WAVINFO, env=ENV)
    oneshot.run(batch(tmp_path, "ok"), timeout=30)
    with pytest.raises(ProcessorFailed, match="exited with status 5"):
        make_processor("/bin/sh -c 'exit 5'", env=ENV).run(batch(tmp_path, "bad"), timeout=30)
    with pytest.raises(ProcessorFailed, match="timed out"):
        make_processor("sleep 300", env=ENV, kill_grace=0.1).run(
            batch(tmp_path, "slow"), timeout=0.3
        )
    served = persistent()
    served.run(batch(tmp_path, "p1"), timeout=30)
    served.close()
    assert _pidfds() == before


# --- the standby reaper: the next batch's reaper starts while this one runs (issue 19) --

# Records who ran it and where; on batch "slow", leaves a daemon in its own session and
# hangs (the timeout must still end the whole tree).
RECORDER = r"""
echo "$PPID $STAGERD_BATCH_ID $(pwd)" >> ../runs.txt
if [ "$STAGERD_BATCH_ID" = slow ]; then setsid sleep 300 & echo $! > daemon.pid; sleep 300; fi
echo '{"item": "a"}' > "$STAGERD_RESULTS"
"""


def _recorder(tmp_path: Path) -> str:
    script = tmp_path / "recorder.sh"
    script.write_text(RECORDER)
    return f"sh {shlex.quote(str(script))}"


def _runs(tmp_path: Path) -> list[list[str]]:
    return [line.split() for line in (tmp_path / "runs.txt").read_text().splitlines()]


def test_the_next_batch_runs_in_the_reaper_started_during_the_one_before(tmp_path: Path) -> None:
    from dataclasses import replace

    proc = make_processor(_recorder(tmp_path), env=ENV)
    try:
        proc.run(batch(tmp_path, "b1", files=1), timeout=30)
        standby = proc._spares[0]  # type: ignore[attr-defined]  # white-box: which reaper
        assert standby is not None and standby.proc.poll() is None
        second = replace(batch(tmp_path, "b2", files=1), done_marker=DONE)
        (second.batch_dir / DONE[0]).write_text("b2")
        outcome = proc.run(second, timeout=30)
    finally:
        proc.close()
    assert len(outcome.results) == 1
    first, then = _runs(tmp_path)
    assert first[1:] == ["b1", str(tmp_path / "b1")]
    # Its own batch's id, env and cwd, below the reaper started during b1:
    assert then == [str(standby.proc.pid), "b2", str(second.batch_dir)]
    assert (second.batch_dir / DONE[1]).exists() and not (second.batch_dir / DONE[0]).exists()
    assert standby.proc.returncode == 0
    assert not proc._spares  # type: ignore[attr-defined]  # close() reaped the spares


def test_two_standbys_wait_ahead_and_each_batch_takes_the_oldest(tmp_path: Path) -> None:
    """A tiny batch ends before the reaper started during it is ready (~20-25 ms here), so
    two wait: batch 3 runs in a reaper started during batch 1."""
    from stagerd.processor.runner import SPARE_REAPERS

    proc = make_processor(_recorder(tmp_path), env=ENV)
    try:
        proc.run(batch(tmp_path, "b1", files=1), timeout=30)
        spares = list(proc._spares)  # type: ignore[attr-defined]
        assert len(spares) == SPARE_REAPERS == 2
        assert all(s.proc.poll() is None for s in spares)
        proc.run(batch(tmp_path, "b2", files=1), timeout=30)
        proc.run(batch(tmp_path, "b3", files=1), timeout=30)
        assert len(proc._spares) == 2  # type: ignore[attr-defined]
    finally:
        proc.close()
    runs = _runs(tmp_path)
    assert [r[1] for r in runs] == ["b1", "b2", "b3"]
    assert [r[0] for r in runs[1:]] == [str(s.proc.pid) for s in spares]
    assert all(s.proc.returncode == 0 for s in spares)


def test_close_reaps_the_unused_standby(tmp_path: Path) -> None:
    proc = make_processor(_recorder(tmp_path), env=ENV)
    proc.run(batch(tmp_path, "b1", files=1), timeout=30)
    standby = proc._spares[0]  # type: ignore[attr-defined]
    proc.close()
    assert standby.proc.returncode == 0 and dead(standby.proc.pid)


def test_a_standby_killed_before_its_batch_is_replaced_by_a_fresh_reaper(tmp_path: Path) -> None:
    proc = make_processor(_recorder(tmp_path), env=ENV)
    try:
        proc.run(batch(tmp_path, "b1", files=1), timeout=30)
        standby = proc._spares[0]  # type: ignore[attr-defined]
        os.kill(standby.proc.pid, 9)
        standby.proc.wait(10)
        outcome = proc.run(batch(tmp_path, "b2", files=1), timeout=30)
    finally:
        proc.close()
    assert len(outcome.results) == 1
    _, then = _runs(tmp_path)
    assert then[1] == "b2" and then[0] != str(standby.proc.pid)


def test_a_stopped_standby_is_killed_and_the_batch_runs_in_a_fresh_reaper(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The batch before runs as the same user and may SIGSTOP the waiting standby: it
    then never reports a pid. The worker must not wait for it for ever."""
    from stagerd.processor import child as child_mod

    monkeypatch.setattr(child_mod, "_REAPER_START", 1.0)
    proc = make_processor(_recorder(tmp_path), env=ENV)
    try:
        proc.run(batch(tmp_path, "b1", files=1), timeout=30)
        standby = proc._spares[0]  # type: ignore[attr-defined]
        os.kill(standby.proc.pid, signal.SIGSTOP)
        outcome = proc.run(batch(tmp_path, "b2", files=1), timeout=30)
    finally:
        proc.close()
    assert len(outcome.results) == 1
    _, then = _runs(tmp_path)
    assert then[1] == "b2" and then[0] != str(standby.proc.pid)
    assert standby.proc.returncode == -signal.SIGKILL and dead(standby.proc.pid)


def test_a_reaper_that_never_reports_fails_the_batch_instead_of_hanging(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stagerd.processor import child as child_mod
    from stagerd.processor import proctree

    monkeypatch.setattr(child_mod, "_REAPER_START", 1.0)
    # A "reaper" that stops itself before it reports the processor's pid.
    monkeypatch.setattr(proctree, "reaper_argv", lambda *a, **k: ["sh", "-c", "kill -STOP $$"])
    with pytest.raises(ProcessorFailed, match="did not start within 1s"):
        make_processor("true", env=ENV).run(batch(tmp_path, "b1", files=1), timeout=30)


def test_a_batch_in_a_standby_is_contained_like_any_other(tmp_path: Path) -> None:
    proc = make_processor(_recorder(tmp_path), env=ENV, kill_grace=0.2)
    try:
        proc.run(batch(tmp_path, "b1", files=1), timeout=30)
        standby = proc._spares[0]  # type: ignore[attr-defined]
        slow = batch(tmp_path, "slow", files=1)
        with pytest.raises(ProcessorFailed, match="timed out after 1s"):
            proc.run(slow, timeout=1)
    finally:
        proc.close()
    assert _runs(tmp_path)[1][:2] == [str(standby.proc.pid), "slow"]
    assert wait_dead(int((slow.batch_dir / "daemon.pid").read_text()))
    assert dead(standby.proc.pid)


def test_a_standby_dies_with_its_worker(tmp_path: Path) -> None:
    import subprocess

    code = (
        "import sys, time\n"
        "from stagerd.processor.child import Standby\n"
        "print(Standby(1.0, {'PATH': '/usr/bin:/bin'}).proc.pid, flush=True)\n"
        "time.sleep(300)\n"
    )
    worker = subprocess.Popen([sys.executable, "-c", code], env=ENV, stdout=subprocess.PIPE,
                              text=True)  # fmt: skip
    try:
        assert worker.stdout is not None
        standby = int(worker.stdout.readline())
        assert not dead(standby)
    finally:
        worker.kill()
        worker.wait(10)
    assert wait_dead(standby)  # PDEATHSIG: nothing waits on a dead worker's behalf


def test_a_waiting_standby_hides_its_pipes_from_its_own_user() -> None:
    """The batch before runs as the same user while the standby waits: /proc/<pid>/fd
    must not hand it the request pipe. Root reads it anyway, so this runs as the user."""
    import subprocess

    from tests.hostile_support import SITE, WORKER_PYTHON
    from tests.unpriv import as_user, remove_user_dir, user_dir

    home = user_dir("stagerd-standby-")
    try:
        code = (
            "import os, sys, time\n"
            "from stagerd.processor.child import Standby\n"
            "s = Standby(1.0, {'PATH': '/usr/bin:/bin'})\n"
            "deadline = time.monotonic() + 30\n"
            "while time.monotonic() < deadline:\n"
            "    try:\n"
            "        os.listdir(f'/proc/{s.proc.pid}/fd'); time.sleep(0.01)\n"
            "    except PermissionError:\n"
            "        break\n"
            "try:\n"
            "    os.listdir(f'/proc/{s.proc.pid}/fd'); print('open')\n"
            "except PermissionError:\n"
            "    print('hidden')\n"
            "print(open(f'/proc/{s.proc.pid}/task/{s.proc.pid}/children').read() == '')\n"
            "s.discard(); print(s.proc.returncode)\n"
        )
        out = subprocess.run(
            as_user(["env", f"PYTHONPATH={ROOT}:{SITE}", WORKER_PYTHON, "-c", code]),
            capture_output=True, text=True, check=False, timeout=60, cwd=home,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == ["hidden", "True", "0"]
    finally:
        remove_user_dir(home)


def test_a_standby_refuses_a_request_it_cannot_run_with_a_clear_message(tmp_path: Path) -> None:
    from stagerd.processor.child import Standby

    standby = Standby(1.0, {"PATH": "/usr/bin:/bin"})
    # No processor pid: the reaper gave up before starting anything.
    assert standby.go(["true"], env={}, cwd=tmp_path / "missing", done=None) is None
    assert standby.proc.wait(10) == 127
    assert standby.proc.stderr is not None
    assert "reaper standby: bad request" in standby.proc.stderr.read().decode()
    standby.discard()


# --- the done marker: renamed the moment the processor succeeds (issue 17) -------------

DONE = (".done.pending", "done")


def marked(tmp_path: Path, batch_id: str, files: int = 2) -> ProcessRequest:
    """A request whose batch dir holds the pending marker the worker writes first."""
    from dataclasses import replace

    req = replace(batch(tmp_path, batch_id, files=files), done_marker=DONE)
    (req.batch_dir / DONE[0]).write_text(batch_id)
    return req


def test_oneshot_success_renames_the_marker_through_the_reaper(tmp_path: Path) -> None:
    req = marked(tmp_path, "d1")
    # The processor takes its owner's write bit away; the reaper's fd gives it back.
    proc = make_processor(f"sh -c 'chmod 0555 . && exec {WAVINFO}'", env=ENV)
    proc.run(req, timeout=30)
    assert (req.batch_dir / DONE[1]).read_text() == "d1"
    assert not (req.batch_dir / DONE[0]).exists()


@pytest.mark.parametrize(
    "script",
    ["exit 1", "trap 'exit 0' TERM; touch started; sleep 60 & wait"],
    ids=["failed", "stopped-then-exit-0"],
)
def test_oneshot_failure_or_a_stopped_run_leaves_the_marker_pending(
    tmp_path: Path, script: str
) -> None:
    """A processor cut short by a stop may exit 0 on its SIGTERM: that is no success."""
    req = marked(tmp_path, "d2")
    stop = threading.Event()
    proc = make_processor(f"sh -c {shlex.quote(script)}", env=ENV, kill_grace=5.0)
    stopper = threading.Thread(
        target=lambda: (wait_for_file(req.batch_dir / "started"), stop.set()), daemon=True
    )
    stopper.start()
    with pytest.raises(ProcessorFailed):
        proc.run(req, timeout=60, stop=stop)
    stop.set()
    assert (req.batch_dir / DONE[0]).exists() and not (req.batch_dir / DONE[1]).exists()


def wait_for_file(path: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.02)


def test_persistent_ok_answer_renames_the_marker_and_a_failure_does_not(tmp_path: Path) -> None:
    good = persistent()
    try:
        req = marked(tmp_path, "d3")
        good.run(req, timeout=30)
        assert (req.batch_dir / DONE[1]).read_text() == "d3"
    finally:
        good.close()
    bad = persistent("--fail")
    try:
        req = marked(tmp_path, "d4")
        with pytest.raises(ProcessorFailed):
            bad.run(req, timeout=30)
        assert (req.batch_dir / DONE[0]).exists() and not (req.batch_dir / DONE[1]).exists()
    finally:
        bad.close()


def test_promote_restores_the_write_bit_as_an_unprivileged_user() -> None:
    """Root's DAC override would hide a missing chmod: run the rename as the user."""
    import subprocess

    from stagerd.processor import reaper
    from tests.unpriv import as_user, remove_user_dir, user_dir

    home = user_dir("stagerd-promote-")
    try:
        code = (
            "import importlib.util as u, os, sys\n"
            f"s = u.spec_from_file_location('reaper', {str(Path(reaper.__file__))!r})\n"
            "m = u.module_from_spec(s); s.loader.exec_module(m)\n"
            "d = os.path.join(sys.argv[1], 'batch'); os.mkdir(d)\n"
            "open(os.path.join(d, 'p'), 'w').close()\n"
            "fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY); os.chmod(d, 0o500)\n"
            "print(m.promote(fd, 'p', 'f'), sorted(os.listdir(d)), oct(os.stat(d).st_mode & 0o777))\n"
        )
        python = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable
        out = subprocess.run(
            as_user([python, "-I", "-S", "-c", code, str(home)]),
            capture_output=True, text=True, check=False, timeout=60,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == ["True", "['f']", "0o700"]
    finally:
        remove_user_dir(home)
