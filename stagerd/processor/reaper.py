"""The per-processor subreaper: ``python -I -S reaper.py WORKER_PID PID_FD GRACE [DONE] -- CMD...``,
or ``... GRACE --standby REQ_FD`` to be started ahead of its batch.

The worker starts every processor through this small program (stdlib only, so it runs
from the shiv artifact with ``-I -S``). It marks itself a child subreaper
(``PR_SET_CHILD_SUBREAPER``), so every process the processor starts, even one that
double-forks into its own session, stays its descendant; then it forks and execs CMD, writes
that child's pid to PID_FD, and reaps. It dies with the worker (``PR_SET_PDEATHSIG``), and
kills the whole tree first.

- When CMD exits, every remaining descendant gets SIGKILL, all are reaped, and the reaper
  exits with CMD's status (re-raising its signal), so the batch ends with its whole tree.
- SIGTERM (the worker stopping the batch) is forwarded to every descendant; whatever is
  left after GRACE seconds gets SIGKILL.
- DONE (``PENDING:FINAL``, two file names in the reaper's cwd, the batch dir): when CMD
  exits 0 unasked (no SIGTERM came), the reaper renames PENDING to FINAL before it exits
  itself. That is the resume marker (:mod:`stagerd.gpu.resume`): the worker learns of the
  exit only from the reaper's, so however it dies, a finished run is never lost to it.
  For the same reason the parent-death signal is SIGHUP, not SIGKILL: caught, it kills
  the tree at once as before, but a reaper whose CMD already exited 0 renames first.

Standby: the interpreter's start-up (~15 ms, more on busy cores) used to sit between one
batch's end and the next one's start. The worker now starts each batch's reaper while
the batch before it is processing: it arms its signals and waits on REQ_FD for one JSON
request ``{"argv", "env", "cwd", "done"}`` (the worker closes its end after writing),
then runs CMD for it exactly as above. EOF without a request means "not needed": it exits 0.

The worker walks the same tree (:mod:`stagerd.processor.proctree`) to end the helpers of a
persistent processor after each batch while the processor itself lives on.
"""

# No "from __future__", contextlib or signal (enum): this starts once per batch, and every
# import is start-up time. _signal is signal's C core, without the enums.
import ctypes
import os
import sys
import time

TYPE_CHECKING = False  # not typing's: importing typing alone costs more than the rest
if TYPE_CHECKING:
    import signal
else:
    import _signal as signal

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_CHILD_SUBREAPER = 36
_POLL = 0.005


def _prctl(option: int, value: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, value, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl failed")


def children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                found.extend(int(word) for word in f.read().split())
        except OSError:
            continue
    return found


def descendants(root: int) -> list[int]:
    seen: list[int] = []
    todo = children(root)
    while todo:
        pid = todo.pop()
        if pid not in seen:
            seen.append(pid)
            todo.extend(children(pid))
    return seen


def _signal_all(sig: int) -> None:
    for pid in descendants(os.getpid()):
        try:
            os.kill(pid, sig)
        except OSError:
            continue


def _start(argv: list[str], pid_fd: int, env: "dict[str, str] | None" = None) -> int:
    pid = os.fork()
    if pid == 0:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        os.close(pid_fd)
        try:
            os.execvpe(argv[0], argv, os.environ if env is None else env)
        except OSError as exc:
            print(f"cannot start processor {argv[0]!r}: {exc.strerror}", file=sys.stderr)
        os._exit(127)
    os.write(pid_fd, f"{pid}\n".encode())
    os.close(pid_fd)
    return pid


def promote(dir_fd: int, pending: str, final: str) -> bool:
    """Rename *pending* to *final* in the directory *dir_fd*; False if that failed.

    The processor runs as our user and may have taken the owner's write bit off its batch
    dir: the fd (opened before it ran) gives it back, following no path."""
    try:
        mode = os.fstat(dir_fd).st_mode & 0o7777
        if mode & 0o700 != 0o700:
            os.chmod(dir_fd, mode | 0o700)
        os.rename(pending, final, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except OSError:
        return False  # the worker, if alive, writes the marker itself
    return True


def _wait_for_main(main: int) -> int:
    """Block until the main child exits (reaping orphans meanwhile); its wait status."""
    while True:
        pid, status = os.waitpid(-1, 0)  # a signal handler runs in between (PEP 475)
        if pid == main:
            return status


def _reap_rest() -> None:
    """SIGKILL and reap every remaining descendant. Polls: a process forking while it is
    killed may leave a child that was not listed yet."""
    while True:
        _signal_all(signal.SIGKILL)
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            return
        time.sleep(_POLL)


def _read_request(req_fd: int) -> "dict[str, object] | None":
    """The standby's one request, read to EOF; None when the worker closed it unused."""
    chunks = []
    while chunk := os.read(req_fd, 65536):
        chunks.append(chunk)
    os.close(req_fd)
    if not chunks:
        return None
    import json  # here, not at the top: the one-shot path never pays for it (a standby
    # has imported it already, while it waited)

    request = json.loads(b"".join(chunks))
    if not isinstance(request, dict):
        raise ValueError("the request is not an object")
    return request


def _standby(worker: int, req_fd: int) -> "tuple[str, list[str], dict[str, str]] | int":
    """Wait for the request: (done, argv, env) with the cwd entered, or an exit code."""
    # Non-dumpable: while we wait, the batch before ours is processing as our user, and
    # could otherwise open our request pipe through /proc/<pid>/fd and write to it first.
    # (Our children file stays readable, for the worker's tree walk.)
    _prctl(PR_SET_DUMPABLE, 0)
    # Armed first, with the default dispositions: a worker that dies while we wait
    # (SIGHUP) or a stop (SIGTERM) ends a standby that has nothing to clean up.
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    _prctl(PR_SET_PDEATHSIG, signal.SIGHUP)
    if os.getppid() != worker:
        return 1
    # Imported now, while the batch before ours still runs: importing json (and re with it)
    # takes 8-12 ms here, and after the request arrives it would sit between two batches.
    import json  # noqa: F401

    try:
        request = _read_request(req_fd)
        if request is None:
            return 0
        argv, env = request["argv"], request["env"]
        if not isinstance(argv, list) or not argv or not isinstance(env, dict):
            raise ValueError("argv or env missing")
        os.chdir(str(request["cwd"]))
    except (OSError, ValueError, KeyError) as exc:
        print(f"reaper standby: bad request: {exc}", file=sys.stderr)
        return 127
    return str(request["done"]), [str(a) for a in argv], {str(k): str(v) for k, v in env.items()}


def main(args: list[str]) -> int:
    worker, pid_fd, grace = int(args[0]), int(args[1]), float(args[2])
    if args[3] != "--standby":
        done, argv = (args[3], args[5:]) if args[3] != "--" else ("", args[4:])
        return _run(worker, pid_fd, grace, done, argv, None)
    request = _standby(worker, int(args[4]))
    if isinstance(request, int):
        return request
    done, argv, env = request
    return _run(worker, pid_fd, grace, done, argv, env)


def _run(
    worker: int, pid_fd: int, grace: float, done: str, argv: "list[str]",
    env: "dict[str, str] | None",
) -> int:  # fmt: skip
    asked = []  # a SIGTERM came: an exit 0 after it may be a processor cut short

    def on_term(signum: int, frame: object) -> None:
        asked.append(signum)
        _signal_all(signal.SIGTERM)
        # The grace starts at the first SIGTERM; SIGALRM ends it with SIGKILL for all.
        if signal.getitimer(signal.ITIMER_REAL)[0] == 0:
            signal.setitimer(signal.ITIMER_REAL, max(grace, 0.001))

    # Handlers before the parent-death signal is armed: it may come at once.
    signal.signal(signal.SIGALRM, lambda signum, frame: _signal_all(signal.SIGKILL))
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, lambda signum, frame: _signal_all(signal.SIGKILL))
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    _prctl(PR_SET_PDEATHSIG, signal.SIGHUP)
    if os.getppid() != worker:  # the worker died before PDEATHSIG was armed
        return 1
    dir_fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY) if done else -1
    status = _wait_for_main(_start(argv, pid_fd, env))
    signal.setitimer(signal.ITIMER_REAL, 0)
    _reap_rest()  # first: nothing of the tree may still write when the marker appears
    if done and status == 0 and not asked:
        pending, _, final = done.partition(":")
        promote(dir_fd, pending, final)
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
    return os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
