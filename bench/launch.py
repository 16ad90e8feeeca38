"""Run a command and record the peak RSS of its process tree as the kernel saw it.

``python -S -I bench/launch.py OUT CMD...``: fork+exec CMD, wait, write
``"<ru_maxrss bytes> <seconds>"`` to OUT (getrusage(RUSAGE_CHILDREN); wall time from fork to
reaping, so the launcher's own start-up is not billed to CMD), exit with CMD's status.

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
    maxrss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    with open(out, "w") as f:
        f.write(f"{maxrss} {seconds!r}")
    code = os.waitstatus_to_exitcode(status)
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main())
