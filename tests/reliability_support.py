"""Helpers for the issue 17 reliability tests: workers as real process groups logging JSON
to files, SIGSTOP/SIGCONT/SIGKILL of a whole group, a processor that counts its runs."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.conftest import ROOT, base_env
from tests.worker_support import WAVINFO


def counting_processor(runs: Path, *args: str) -> str:
    """A STAGERD_PROCESSOR that appends its batch id to *runs*, then runs wavinfo."""
    script = (
        f'echo "$STAGERD_BATCH_ID" >> {shlex.quote(str(runs))}; exec {WAVINFO} {" ".join(args)}'
    )
    return f"sh -c {shlex.quote(script)}"


def start_end_processor(runs: Path, *args: str) -> str:
    """A STAGERD_PROCESSOR that appends ``start ID`` to *runs*, runs wavinfo, and appends
    ``end ID`` when it succeeded: started and completed runs, counted apart."""
    quoted = shlex.quote(str(runs))
    script = (
        f'echo "start $STAGERD_BATCH_ID" >> {quoted}; {WAVINFO} {" ".join(args)}; rc=$?; '
        f'[ $rc -eq 0 ] && echo "end $STAGERD_BATCH_ID" >> {quoted}; exit $rc'
    )
    return f"sh -c {shlex.quote(script)}"


def run_lines(runs: Path, kind: str) -> list[str]:
    """The batch ids of *runs* lines of *kind* ("start" or "end"; see start_end_processor)."""
    lines = runs.read_text().splitlines() if runs.exists() else []
    return [line.split()[1] for line in lines if line.startswith(kind + " ")]


def processor_runs(runs: Path) -> list[str]:
    return runs.read_text().split() if runs.exists() else []


class Proc:
    """``python -m stagerd --log-json ARGS`` in its own process group, logging to a file."""

    def __init__(self, env: dict[str, str], log: Path, *args: str) -> None:
        self.log = log
        with open(log, "ab") as out:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "stagerd", "--log-json", *args],
                env={**base_env(), **env},
                stdout=out,
                stderr=out,
                cwd=ROOT,
                start_new_session=True,
            )

    def signal(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, sig)

    def kill(self) -> None:
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(30)

    def events(self) -> list[dict[str, Any]]:
        """The JSON log records written so far (non-JSON lines skipped)."""
        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict):
                    out.append(record)
        return out

    def has(self, event: str, batch_id: str | None = None) -> bool:
        return any(
            r.get("event") == event and (batch_id is None or r.get("batch_id") == batch_id)
            for r in self.events()
        )

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])


@contextlib.contextmanager
def watching(procs: list[Proc]) -> Iterator[list[Proc]]:
    """Every Proc appended to *procs* inside the block is killed when it ends; a failed
    assertion gets each one's log tail appended (the worker's side of the story)."""
    try:
        yield procs
    except AssertionError as exc:
        logs = "\n".join(f"{p.log.name}:\n{p.tail()}" for p in procs)
        raise AssertionError(f"{exc}\n{logs}") from None
    finally:
        for proc in procs:
            proc.kill()


def assert_done(database_url: str, batch_id: str, results: int) -> None:
    """The ledger holds *batch_id* as done with *results* result rows."""
    from stagerd.db import ledger as db

    ledger = db.Ledger(database_url)
    try:
        row = ledger.batch(batch_id)
        assert row is not None and row.state == "done", row
        assert len(ledger.results(batch_id)) == results
    finally:
        ledger.close()
