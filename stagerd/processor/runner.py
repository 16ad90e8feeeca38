"""Running the batch processor (WhisperX/Gemma in production; not ours) as a child process.

Contract, for both modes (README, "The processor contract"):

* the command comes from ``STAGERD_PROCESSOR`` / ``--processor`` and is shlex-split;
* the child's environment is ours minus every secret (S3 keys, DSNs, ``*PASSWORD*``,
  ``*SECRET*``, ``*TOKEN*``): the processor is third-party code;
* it runs below its own subreaper (:mod:`stagerd.processor.reaper`), so a timeout, a shutdown or a
  broken disk limit ends its whole tree, daemons included; in persistent mode everything
  it started is killed at the end of each batch (:mod:`stagerd.processor.proctree`);
* its stdout/stderr go to our log tagged with the batch id, capped per batch
  (:mod:`stagerd.processor.outputcap`); a *guard* (:mod:`stagerd.scratch.diskguard`) may stop it early;
* success means a results file that scans clean (:mod:`stagerd.results`): JSON lines,
  each an object with a string ``item``, an optional trailer ``{"stagerd": "end",
  "count": N}``; zero results from a non-empty input need the trailer with ``count: 0``.
  Rows are validated as they are streamed into the commit. A non-zero exit, a timeout or
  a dead persistent process raises :class:`ProcessorFailed` (transient: retried, then
  dead-lettered); a broken limit :class:`ProcessorContained` (permanent).

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
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from stagerd.errors import ConfigError, ProcessorContained, ProcessorFailed, ResultsRejected
from stagerd.log import get_logger
from stagerd.processor import proctree
from stagerd.processor.child import Child as _Child
from stagerd.processor.child import Guard, Standby
from stagerd.processor.outputcap import OutputCap
from stagerd.results import DEFAULT_LIMITS, ResultLimits, ResultsFile, scan_results

log = get_logger(__name__)

SECRET_VARS = frozenset(
    {"S3_ACCESS_KEY", "S3_SECRET_KEY", "DATABASE_URL", "REDIS_URL", "AWS_ACCESS_KEY_ID"}
)
SECRET_MARKERS = ("PASSWORD", "SECRET", "TOKEN")
DEFAULT_KILL_GRACE = 10.0
MODES = ("oneshot", "persistent")
_POLL = 0.1


@dataclass(frozen=True)
class ProcessRequest:
    """One batch for the processor: where it lives and where results go."""

    batch_id: str
    batch_dir: Path
    input_dir: Path
    results_path: Path
    guard: Guard | None = field(default=None, compare=False)
    # (pending, final) file names in batch_dir: the pending one is renamed to the final one
    # the moment the processor succeeds, by its reaper (oneshot) or as its answer is read
    # (persistent), so a worker killed right after cannot lose the fact (gpu.resume).
    done_marker: tuple[str, str] | None = None
    # Called once the processor has started (must not raise). The worker releases the
    # batch before this one here: see gpu.prefetch, "the release of a processed batch".
    on_started: Callable[[], None] | None = field(default=None, compare=False)

    def started(self) -> None:
        if self.on_started is not None:
            self.on_started()


@dataclass(frozen=True)
class ProcessOutcome:
    """A processed batch: elapsed seconds and its scanned results file, whose rows are
    validated as they are streamed (:meth:`ResultsFile.rows`)."""

    seconds: float
    results: ResultsFile


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
    limits: ResultLimits = DEFAULT_LIMITS,
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
        return OneshotProcessor(argv, clean, kill_grace=kill_grace, limits=limits)
    if mode == "persistent":
        return PersistentProcessor(argv, clean, kill_grace=kill_grace, limits=limits)
    raise ConfigError(f"processor mode must be one of {', '.join(MODES)}, got {mode!r}")


def scrub_env(env: Mapping[str, str]) -> dict[str, str]:
    """*env* without stagerd's secrets (what a third-party child may see)."""
    return {
        name: value
        for name, value in env.items()
        if name not in SECRET_VARS and not any(m in name.upper() for m in SECRET_MARKERS)
    }


def read_results(path: Path, limits: ResultLimits = DEFAULT_LIMITS) -> list[tuple[str, Any]]:
    """A small results file as a list of ``(item, object)`` rows (missing file: none).

    Raises ResultsRejected for a bad row or a repeated item, ProcessorFailed for an
    unreadable or truncated file."""
    rows: list[tuple[str, Any]] = []
    seen: set[str] = set()
    for item, raw in scan_results(path, limits, input_empty=True):
        if item in seen:
            raise ResultsRejected(f"results repeat item {item!r}")
        seen.add(item)
        rows.append((item, json.loads(raw.text)))
    return rows


def collect_results(req: ProcessRequest, limits: ResultLimits) -> ResultsFile:
    """Scan the results of a processor that said it succeeded (see stagerd.results)."""
    return scan_results(req.results_path, limits, input_empty=_is_empty(req.input_dir))


def _is_empty(path: Path) -> bool:
    try:
        with os.scandir(path) as entries:
            return next(entries, None) is None
    except OSError:
        return True


SPARE_REAPERS = 2  # standby reapers kept started ahead of their batches (oneshot mode)


class OneshotProcessor:
    """One child per batch (cwd = batch dir, batch described by environment variables)."""

    def __init__(
        self,
        argv: list[str],
        env: Mapping[str, str],
        *,
        kill_grace: float = DEFAULT_KILL_GRACE,
        limits: ResultLimits = DEFAULT_LIMITS,
    ) -> None:
        self._argv = argv
        self._env = dict(env)
        self._grace = kill_grace
        self._limits = limits
        # The next batches' reapers, already started. Two: a reaper takes ~20-25 ms to be
        # ready here, and a tiny batch ends before one started during it would be.
        self._spares: deque[Standby] = deque()

    def run(
        self, req: ProcessRequest, *, timeout: float, stop: threading.Event | None = None
    ) -> ProcessOutcome:
        """Run the command on *req*. Setting *stop* kills it (whole tree) and raises."""
        started = time.monotonic()
        req.results_path.unlink(missing_ok=True)  # a stale file from an earlier attempt
        env = {
            **self._env,
            "STAGERD_BATCH_ID": req.batch_id,
            "STAGERD_INPUT_DIR": str(req.input_dir),
            "STAGERD_RESULTS": str(req.results_path),
        }
        output = OutputCap(req.batch_id)
        standby = self._spares.popleft() if self._spares else None
        child = _Child(
            self._argv, env=env, cwd=req.batch_dir, output=output, grace=self._grace,
            done=req.done_marker, standby=standby,
        )  # fmt: skip
        self._top_up()
        req.started()
        try:
            status = child.wait(started + timeout, stop, req.guard)
            if status is None:
                # Over its disk allowance it must not write on through the grace period.
                child.kill(0.0 if child.contained else self._grace)
                raise _not_done(req.batch_id, timeout, stop, child.contained)
            child.reap()
        finally:
            output.finish()
        if status != 0:
            raise ProcessorFailed(_exit_reason(req.batch_id, status, child.last_stderr))
        results = collect_results(req, self._limits)
        return ProcessOutcome(seconds=time.monotonic() - started, results=results)

    def _top_up(self) -> None:
        """Start the next batches' reapers while this batch runs (if one cannot be started,
        a later batch starts a fresh one, as it would have anyway)."""
        while len(self._spares) < SPARE_REAPERS:
            try:
                self._spares.append(Standby(self._grace, self._env))
            except OSError as exc:
                log.debug("cannot start a standby reaper: %s", exc)
                return

    def close(self) -> None:
        """Nothing of a batch outlives it in oneshot mode; the standby reapers go."""
        while self._spares:
            self._spares.popleft().discard()


class _DoneMarker:
    """Persistent mode's half of :attr:`ProcessRequest.done_marker`: the batch dir is
    opened before the request is sent (the processor may change its modes or links
    after) and the rename happens in the stdout pump, as soon as the answer is read."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # the fd is used in the pump, closed in run()
        self._armed: tuple[str, int, tuple[str, str]] | None = None

    def arm(self, req: ProcessRequest) -> None:
        if req.done_marker is None:
            return
        try:
            fd = os.open(req.batch_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError:
            return  # the worker writes the marker itself after the answer
        with self._lock:
            self._armed = (req.batch_id, fd, req.done_marker)

    def promote(self, batch_id: object) -> None:
        from stagerd.processor.reaper import promote

        with self._lock:
            if self._armed is not None and self._armed[0] == batch_id:
                _, fd, (pending, final) = self._armed
                promote(fd, pending, final)

    def disarm(self) -> None:
        with self._lock:
            armed, self._armed = self._armed, None
        if armed is not None:
            os.close(armed[1])


def _not_done(
    batch_id: str, timeout: float, stop: threading.Event | None, contained: str | None
) -> ProcessorFailed | ProcessorContained:
    if contained is not None:
        return ProcessorContained(f"processor for batch {batch_id} stopped: {contained}")
    return ProcessorFailed(_why_not_done(batch_id, timeout, stop))


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
        self,
        argv: list[str],
        env: Mapping[str, str],
        *,
        kill_grace: float = DEFAULT_KILL_GRACE,
        limits: ResultLimits = DEFAULT_LIMITS,
    ) -> None:
        self._argv = argv
        self._env = {**env, "STAGERD_PROCESSOR_MODE": "persistent"}
        self._grace = kill_grace
        self._limits = limits
        self._child: _Child | None = None
        self._answers: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._output = OutputCap()
        self._done = _DoneMarker()

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
        self._output.begin(req.batch_id)
        try:
            child = self._ensure_child()
            self._done.arm(req)
            self._send(child, req)
            req.started()
            answer = self._await(req, started + timeout, stop)
        finally:
            self._done.disarm()
            self._end_batch()
        if not answer.get("ok"):
            error = str(answer.get("error") or "no reason given")[:300]
            raise ProcessorFailed(f"processor failed batch {req.batch_id}: {error}")
        results = collect_results(req, self._limits)
        return ProcessOutcome(seconds=time.monotonic() - started, results=results)

    def _end_batch(self) -> None:
        """The per-batch guarantee: the processor lives on, every process it started
        during the batch is killed; the batch's output budget is closed."""
        child = self._child
        if child is not None and child.proc.poll() is None:
            killed = proctree.end_helpers(child.proc.pid, keep=child.main_pid)
            if killed:
                log.warning("killed %d process(es) the persistent processor left after batch %s",
                            killed, self._output.batch_id)  # fmt: skip
        self._output.finish()

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
            self._argv, env=self._env, cwd=None, output=self._output, grace=self._grace,
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
            if obj.get("ok") is True:
                self._done.promote(obj["batch_id"])  # before anyone else learns of it
            answers.put(obj)
        else:
            self._output.line("stdout", line)

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
        self, req: ProcessRequest, deadline: float, stop: threading.Event | None
    ) -> dict[str, Any]:
        batch_id = req.batch_id
        while True:
            contained = req.guard() if req.guard is not None else None
            if contained is not None:
                self._discard(grace=0.0)
                raise ProcessorContained(f"processor for batch {batch_id} stopped: {contained}")
            # An answer already given counts even if *stop* was set meanwhile (see
            # Child.wait): only when none came is a stop or the deadline a reason to give up.
            remaining = deadline - time.monotonic()
            try:
                answer = self._answers.get(timeout=max(0.0, min(remaining, _POLL)))
            except queue.Empty:
                if stop is not None and stop.is_set():
                    self._discard()
                    raise ProcessorFailed(
                        f"processor for batch {batch_id} killed: shutting down"
                    ) from None
                if remaining <= 0:
                    self._discard()
                    raise ProcessorFailed(f"processor for batch {batch_id} timed out") from None
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

    def _discard(self, grace: float | None = None) -> None:
        """Kill the current child (whole tree); the next run starts a fresh one."""
        child, self._child = self._child, None
        if child is not None:
            child.kill(self._grace if grace is None else grace)
