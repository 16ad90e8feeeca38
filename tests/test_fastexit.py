"""stagerd.fastexit: a one-shot command skips the interpreter's teardown and loses nothing."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from stagerd.fastexit import exit_code
from tests.conftest import base_env


@pytest.mark.parametrize(("code", "status"), [(None, 0), (0, 0), (2, 2), (256 + 3, 3)])
def test_exit_code_follows_pythons_rules(code: object, status: int) -> None:
    assert exit_code(code) == status


def test_exit_code_of_a_message_is_1_and_prints_it(capsys: pytest.CaptureFixture[str]) -> None:
    assert exit_code("stagerd: gone") == 1
    assert capsys.readouterr().err == "stagerd: gone\n"


def _python(script: str, tmp_path: Path, **kw: object) -> subprocess.CompletedProcess[bytes]:
    path = tmp_path / "child.py"
    path.write_text(textwrap.dedent(script))
    return subprocess.run(  # type: ignore[call-overload, no-any-return]
        [sys.executable, str(path), str(tmp_path)], env=base_env(), timeout=60, **kw
    )


def test_finish_runs_atexit_flushes_logs_and_stdout(tmp_path: Path) -> None:
    script = """
        import atexit, logging, sys
        from pathlib import Path
        from stagerd.fastexit import finish
        out = Path(sys.argv[1])
        atexit.register(lambda: (out / "atexit").write_text("ran"))
        log = logging.getLogger("t")
        log.addHandler(logging.FileHandler(out / "log.txt", delay=True))
        log.warning("last words")
        sys.stdout.write("x" * 1_000_000)  # larger than any pipe or stdio buffer
        sys.stderr.write("no newline")
        finish(3)
    """
    result = _python(script, tmp_path, capture_output=True)
    assert result.returncode == 3, result.stderr
    assert result.stdout == b"x" * 1_000_000
    assert result.stderr == b"no newline"
    assert (tmp_path / "atexit").read_text() == "ran"
    assert (tmp_path / "log.txt").read_text() == "last words\n"


def test_finish_waits_for_a_live_thread_as_a_normal_exit_does(tmp_path: Path) -> None:
    script = """
        import sys, threading, time
        from pathlib import Path
        from stagerd.fastexit import finish
        def late() -> None:
            time.sleep(0.3)
            (Path(sys.argv[1]) / "late").write_text("written")
        threading.Thread(target=late).start()
        finish(4)
    """
    result = _python(script, tmp_path, capture_output=True)
    assert result.returncode == 4, result.stderr
    assert (tmp_path / "late").read_text() == "written"


def test_finish_reports_a_broken_stdout_like_python_does(tmp_path: Path) -> None:
    script = """
        import sys
        from stagerd.fastexit import finish
        sys.stdout.write("pending")  # stays in the buffer until finish flushes it
        sys.stdin.readline()  # the parent closes its end of stdout, then says go
        finish(0)
    """
    path = tmp_path / "child.py"
    path.write_text(textwrap.dedent(script))
    with subprocess.Popen(
        [sys.executable, str(path)],
        # Buffered stdout, as systemd and cron give a command (base_env sets unbuffered).
        env={k: v for k, v in base_env().items() if k != "PYTHONUNBUFFERED"},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    ) as proc:
        assert proc.stdout is not None and proc.stdin is not None
        proc.stdout.close()
        proc.stdin.write(b"go\n")
        proc.stdin.close()
        assert proc.wait(timeout=60) == 120


def test_cli_output_survives_a_pipe_and_exit_codes_hold(run_cli, tmp_path: Path) -> None:
    env = {"STAGERD_ENV_FILE": str(tmp_path / "missing.env")}
    helped = run_cli(["transfer", "upload", "--help"], env=env)
    assert helped.returncode == 0
    assert helped.stdout.rstrip().endswith("╯"), helped.stdout[-200:]
    assert run_cli(["no-such-command"], env=env).returncode == 2
