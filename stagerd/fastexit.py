"""Ending a one-shot command without the interpreter's teardown, when nothing can be lost.

Why: a normal exit frees every module and object one by one. With botocore's parsed S3 model
and the clients' graphs in memory that takes ~0.1 s of CPU on the 2-core VMs measured in
``bench/`` -- a tenth of a ``stagerd transfer upload`` of a 10,000-file archive, paid after the
work is done. Everything a normal exit does that matters is done here first: atexit
callbacks, logging handlers flushed and closed, stdout and stderr flushed. What is skipped is
only freeing memory the kernel reclaims anyway.

It is refused (a normal exit instead) while any other thread is alive: a non-daemon thread
would have been waited for, a daemon thread may be mid-write. Code that leaves a file open
and unflushed would lose its tail; stagerd closes its files in ``with`` blocks.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
from typing import NoReturn


def exit_code(code: object) -> int:
    """SystemExit's ``code`` as a process exit status (Python's own rules: None is 0, an
    int is itself, anything else is printed to stderr and means 1)."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def finish(code: int) -> NoReturn:
    """Exit with *code*: through ``os._exit`` once cleanup is done, else ``sys.exit``."""
    if threading.active_count() > 1:
        sys.exit(code)
    atexit._run_exitfuncs()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            # A closed or broken pipe: the normal exit would fail to flush it as well.
            code = code or 120  # what CPython exits with when flushing stdout fails
    os._exit(code)
