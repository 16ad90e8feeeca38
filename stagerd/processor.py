"""Running the batch processor (WhisperX/Gemma in production; not ours) as a child process.

Contract, for both modes:

* the command comes from ``STAGERD_PROCESSOR`` / ``--processor`` and is shlex-split;
* the child's environment is ours minus every secret (S3 keys, DSNs, ``*PASSWORD*``,
  ``*SECRET*``, ``*TOKEN*``): the processor is third-party code;
* it runs in its own session/process group, so a timeout or shutdown kills its children
  too: SIGTERM to the group, SIGKILL after a grace period;
* its stdout/stderr lines go to our log tagged with the batch id;
* success means a valid results file: JSON lines, each an object with a string ``item``.
  A missing file means no results (a no-op processor is valid); anything malformed, a
  non-zero exit, a timeout or a dead persistent process raises :class:`ProcessorFailed`
  (transient: the batch is retried, then dead-lettered by the worker).

Oneshot mode runs the command per batch with cwd = batch dir and ``STAGERD_BATCH_ID``,
``STAGERD_INPUT_DIR``, ``STAGERD_RESULTS``. Persistent mode starts it once and speaks
JSON lines: request ``{"batch_id","input_dir","results","batch_dir"}`` on stdin, answer
``{"batch_id","ok","error"?}`` on stdout; a process that dies or times out is discarded
and the next batch starts a fresh one.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shlex
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

from stagerd.errors import ConfigError, ProcessorFailed
from stagerd.log import get_logger

log = get_logger(__name__)

SECRET_VARS = frozenset(
    {"S3_ACCESS_KEY", "S3_SECRET_KEY", "DATABASE_URL", "REDIS_URL", "AWS_ACCESS_KEY_ID"}
)
SECRET_MARKERS = ("PASSWORD", "SECRET", "TOKEN")
DEFAULT_KILL_GRACE = 10.0
MODES = ("oneshot", "persistent")
_MAX_LINE = 64 * 1024  # longest processor output line we log (the rest is cut)
_POLL = 0.1


@dataclass(frozen=True)
class ProcessRequest:
    """One batch for the processor: where it lives and where results go."""

    batch_id: str
    batch_dir: Path
    input_dir: Path
    results_path: Path


@dataclass(frozen=True)
class ProcessOutcome:
    """A processed batch: elapsed seconds and its validated ``(item, result)`` rows."""

    seconds: float
    results: list[tuple[str, dict[str, Any]]]


class Processor(Protocol):
    """Runs batches; ``close()`` ends any long-lived child (idempotent)."""

    def run(
        self, req: ProcessRequest, *, timeout: float, stop: threading.Event | None = None
    ) -> ProcessOutcome: ...

    def close(self) -> None: ...


def make_processor(
    command: str,
    mode: str = "oneshot",
    *,
    env: Mapping[str, str] | None = None,
    kill_grace: float = DEFAULT_KILL_GRACE,
) -> Processor:
    """A processor for *command* in *mode* ("oneshot" or "persistent").

    *env* (default ``os.environ``) is scrubbed of secrets. Raises ConfigError for an
    empty/unparsable command, an executable not found, or an unknown mode.
    """
    try:
        argv = shlex.split(command)
    except ValueError as exc:
        raise ConfigError(f"STAGERD_PROCESSOR: cannot parse command: {exc}") from None
    if not argv:
        raise ConfigError("STAGERD_PROCESSOR: empty command")
    if shutil.which(argv[0]) is None:
        raise ConfigError(f"STAGERD_PROCESSOR: executable {argv[0]!r} not found")
    clean = scrub_env(os.environ if env is None else env)
    if mode == "oneshot":
        return OneshotProcessor(argv, clean, kill_grace=kill_grace)
    if mode == "persistent":
        return PersistentProcessor(argv, clean, kill_grace=kill_grace)
    raise ConfigError(f"processor mode must be one of {', '.join(MODES)}, got {mode!r}")


def scrub_env(env: Mapping[str, str]) -> dict[str, str]:
    """*env* without stagerd's secrets (what a third-party child may see)."""
    return {
        name: value
        for name, value in env.items()
        if name not in SECRET_VARS and not any(m in name.upper() for m in SECRET_MARKERS)
    }


def read_results(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """Validate a results JSONL file. Missing file -> no results. Raises ProcessorFailed."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as exc:
        raise ProcessorFailed(f"results file {path.name} unreadable: {exc}") from None
    rows: list[tuple[str, dict[str, Any]]] = []
    seen: set[str] = set()
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            raise ProcessorFailed(f"results line {lineno} is not JSON") from None
        item = obj.get("item") if isinstance(obj, dict) else None
        if not isinstance(item, str) or not item:
            raise ProcessorFailed(f"results line {lineno} lacks a string 'item'")
        if item in seen:
            raise ProcessorFailed(f"results line {lineno} repeats item {item!r}")
        seen.add(item)
        rows.append((item, obj))
    return rows


class _Child:
    """A command in its own process group, its output lines pumped to handlers."""

    def __init__(
        self,
        argv: list[str],
        *,
        env: Mapping[str, str],
        cwd: Path | None,
        label: Callable[[], str],
        on_stdout: Callable[[str], None] | None = None,
        stdin: bool = False,
    ) -> None:
        self._label = label
        try:
            self.proc = subprocess.Popen(
                argv, cwd=cwd, env=dict(env), start_new_session=True,
                stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            )  # fmt: skip
        except OSError as exc:
            raise ProcessorFailed(f"cannot start processor {argv[0]!r}: {exc.strerror}") from None
        self.last_stderr = ""
        assert self.proc.stdout is not None and self.proc.stderr is not None
        out_handler = on_stdout or (lambda line: self._log("stdout", line))
        self._pumps = [
            threading.Thread(target=self._pump, args=(self.proc.stdout, out_handler), daemon=True),
            threading.Thread(target=self._pump, args=(self.proc.stderr, self._stderr), daemon=True),
        ]
        for pump in self._pumps:
            pump.start()

    def _pump(self, stream: IO[bytes], handle: Callable[[str], None]) -> None:
        with stream:
            for raw in iter(lambda: stream.readline(_MAX_LINE), b""):
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                if line:
                    handle(line)

    def _stderr(self, line: str) -> None:
        self.last_stderr = line
        self._log("stderr", line)

    def _log(self, stream: str, line: str) -> None:
        batch_id = self._label()
        log.info("processor %s [%s]: %s", stream, batch_id, line,
                 extra={"batch_id": batch_id, "stream": stream})  # fmt: skip

    def wait(self, deadline: float, stop: threading.Event | None) -> int | None:
        """The exit status, or None if *deadline* passed or *stop* was set first."""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or (stop is not None and stop.is_set()):
                return None
            try:
                return self.proc.wait(timeout=min(remaining, _POLL * 5))
            except subprocess.TimeoutExpired:
                continue

    def kill(self, grace: float) -> None:
        """SIGTERM the whole group, SIGKILL it after *grace*; reap; stop the pumps."""
        if self.proc.poll() is None:
            self._signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):  # SIGKILL below
                self.proc.wait(timeout=grace)
        self.reap()

    def reap(self) -> None:
        """Kill whatever is left of the group (daemonised children), wait, end the pumps."""
        self._signal(signal.SIGKILL)
        self.proc.wait()
        self.join_output(timeout=2.0)
        if self.proc.stdin is not None:
            self.proc.stdin.close()

    def join_output(self, timeout: float) -> None:
        """Wait (bounded) until stdout and stderr reached EOF and were logged."""
        for pump in self._pumps:
            pump.join(timeout=timeout)

    def _signal(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):  # group already gone
            os.killpg(self.proc.pid, sig)


class OneshotProcessor:
    """One child per batch (cwd = batch dir, batch described by environment variables)."""

    def __init__(
        self, argv: list[str], env: Mapping[str, str], *, kill_grace: float = DEFAULT_KILL_GRACE
    ) -> None:
        self._argv = argv
        self._env = dict(env)
        self._grace = kill_grace

    def run(
        self, req: ProcessRequest, *, timeout: float, stop: threading.Event | None = None
    ) -> ProcessOutcome:
        """Run the command on *req*. Setting *stop* kills it (group) and raises."""
        started = time.monotonic()
        req.results_path.unlink(missing_ok=True)  # a stale file from an earlier attempt
        env = {
            **self._env,
            "STAGERD_BATCH_ID": req.batch_id,
            "STAGERD_INPUT_DIR": str(req.input_dir),
            "STAGERD_RESULTS": str(req.results_path),
        }
        child = _Child(self._argv, env=env, cwd=req.batch_dir, label=lambda: req.batch_id)
        status = child.wait(started + timeout, stop)
        if status is None:
            child.kill(self._grace)
            raise ProcessorFailed(_why_not_done(req.batch_id, timeout, stop))
        child.reap()
        if status != 0:
            raise ProcessorFailed(_exit_reason(req.batch_id, status, child.last_stderr))
        results = read_results(req.results_path)
        return ProcessOutcome(seconds=time.monotonic() - started, results=results)

    def close(self) -> None:
        """Nothing outlives a batch in oneshot mode."""


def _why_not_done(batch_id: str, timeout: float, stop: threading.Event | None) -> str:
    if stop is not None and stop.is_set():
        return f"processor for batch {batch_id} killed: shutting down"
    return f"processor for batch {batch_id} timed out after {timeout:g}s"


def _exit_reason(batch_id: str, status: int, last_stderr: str) -> str:
    how = f"killed by signal {-status}" if status < 0 else f"exited with status {status}"
    tail = f": {last_stderr[:300]}" if last_stderr else ""
    return f"processor for batch {batch_id} {how}{tail}"


class PersistentProcessor:
    """One long-lived child fed JSON requests; replaced after it dies or times out."""

    def __init__(
        self, argv: list[str], env: Mapping[str, str], *, kill_grace: float = DEFAULT_KILL_GRACE
    ) -> None:
        self._argv = argv
        self._env = {**env, "STAGERD_PROCESSOR_MODE": "persistent"}
        self._grace = kill_grace
        self._child: _Child | None = None
        self._answers: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._batch_id = "-"

    @property
    def pid(self) -> int | None:
        """The running child's pid (None before the first batch or after a failure)."""
        return self._child.proc.pid if self._child is not None else None

    def run(
        self, req: ProcessRequest, *, timeout: float, stop: threading.Event | None = None
    ) -> ProcessOutcome:
        """Send *req*, wait for its answer. Raises ProcessorFailed (the child is replaced
        on the next call if it died, timed out or *stop* was set)."""
        started = time.monotonic()
        req.results_path.unlink(missing_ok=True)
        self._batch_id = req.batch_id
        child = self._ensure_child()
        self._send(child, req)
        answer = self._await(req.batch_id, started + timeout, stop)
        if not answer.get("ok"):
            error = str(answer.get("error") or "no reason given")[:300]
            raise ProcessorFailed(f"processor failed batch {req.batch_id}: {error}")
        results = read_results(req.results_path)
        return ProcessOutcome(seconds=time.monotonic() - started, results=results)

    def close(self) -> None:
        """Close the child's stdin (its cue to exit), then kill the group after the grace."""
        child, self._child = self._child, None
        if child is None:
            return
        if child.proc.stdin is not None:
            with contextlib.suppress(OSError):  # already gone
                child.proc.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):  # kill() below escalates
            child.proc.wait(timeout=self._grace)
        child.kill(self._grace)

    def _ensure_child(self) -> _Child:
        if self._child is not None and self._child.proc.poll() is None:
            return self._child
        if self._child is not None:
            log.warning("persistent processor exited (status %s); starting a new one",
                        self._child.proc.returncode)  # fmt: skip
            self._child.reap()
        self._answers = queue.Queue()
        answers = self._answers
        self._child = _Child(
            self._argv, env=self._env, cwd=None, label=lambda: self._batch_id,
            on_stdout=lambda line: self._on_stdout(line, answers), stdin=True,
        )  # fmt: skip
        threading.Thread(target=self._watch, args=(self._child, answers), daemon=True).start()
        return self._child

    def _on_stdout(self, line: str, answers: queue.Queue[dict[str, Any] | None]) -> None:
        try:
            obj = json.loads(line)
        except ValueError:
            obj = None
        if isinstance(obj, dict) and "ok" in obj and "batch_id" in obj:
            answers.put(obj)
        else:
            log.info("processor stdout [%s]: %s", self._batch_id, line[:_MAX_LINE],
                     extra={"batch_id": self._batch_id, "stream": "stdout"})  # fmt: skip

    @staticmethod
    def _watch(child: _Child, answers: queue.Queue[dict[str, Any] | None]) -> None:
        child.proc.wait()
        # An answer written just before exiting must be delivered before the "gone" mark.
        child.join_output(timeout=1.0)
        answers.put(None)  # wakes a waiting run(): the child is gone

    def _send(self, child: _Child, req: ProcessRequest) -> None:
        request = {
            "batch_id": req.batch_id,
            "input_dir": str(req.input_dir),
            "results": str(req.results_path),
            "batch_dir": str(req.batch_dir),
        }
        assert child.proc.stdin is not None
        try:
            child.proc.stdin.write((json.dumps(request) + "\n").encode())
            child.proc.stdin.flush()
        except OSError:
            self._discard()
            raise ProcessorFailed(
                f"persistent processor died before batch {req.batch_id}"
            ) from None

    def _await(
        self, batch_id: str, deadline: float, stop: threading.Event | None
    ) -> dict[str, Any]:
        while True:
            if stop is not None and stop.is_set():
                self._discard()
                raise ProcessorFailed(f"processor for batch {batch_id} killed: shutting down")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._discard()
                raise ProcessorFailed(f"processor for batch {batch_id} timed out")
            try:
                answer = self._answers.get(timeout=min(remaining, _POLL))
            except queue.Empty:
                continue
            if answer is None:
                status = self._child.proc.returncode if self._child else None
                self._discard()
                raise ProcessorFailed(
                    f"persistent processor died during batch {batch_id} (status {status})"
                )
            if answer.get("batch_id") == batch_id:
                return answer
            log.warning("persistent processor answered for batch %r while %s was running",
                        answer.get("batch_id"), batch_id)  # fmt: skip

    def _discard(self) -> None:
        """Kill the current child (group); the next run starts a fresh one."""
        child, self._child = self._child, None
        if child is not None:
            child.kill(self._grace)
