"""Run a command and record the peak RSS of its process tree as the kernel saw it.

``python -S -I bench/launch.py OUT CMD...``: fork+exec CMD, wait, write
``"<ru_maxrss bytes> <seconds> <user seconds> <system seconds>"`` to OUT
(getrusage(RUSAGE_CHILDREN); wall time from fork to reaping, so the launcher's own start-up is
not billed to CMD), exit with CMD's status.

CPU: RUSAGE_CHILDREN holds the user + system time of every descendant that was waited for,
recursively (a process's rusage includes the children it reaped), so ``bash -c 'a | b'``
reports a + b + bash. Only a daemon that detaches and is never reaped escapes it: none of the
contenders does.

Why a launcher: Linux carries the RSS high-water mark across fork+exec, so a child forked
straight from the harness (hundreds of MB holding the data pool) would report the harness's
size, not its own. Forked from this tiny interpreter, the floor is a few MB. Deliberately
standalone (stdlib only, no site) so it starts in milliseconds.
"""

import os
import resource
import sys
import time


def main() -> int:
    out, cmd = sys.argv[1], sys.argv[2:]
    started = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        try:
            os.execvp(cmd[0], cmd)
        finally:
            os._exit(127)
    _, status = os.waitpid(pid, 0)
    seconds = time.perf_counter() - started
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(out, "w") as f:
        f.write(f"{usage.ru_maxrss * 1024} {seconds!r} {usage.ru_utime!r} {usage.ru_stime!r}")
    code = os.waitstatus_to_exitcode(status)
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main())
