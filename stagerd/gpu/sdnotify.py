"""systemd's notify protocol (``Type=notify``, ``WatchdogSec=``) with the stdlib only.

Messages go as one datagram to ``$NOTIFY_SOCKET``: a path, or an abstract socket when it
starts with ``@``. Without ``$NOTIFY_SOCKET`` (not under systemd, tests) every call is a
no-op that returns False; a send failure is logged, never raised: the service must not die
because the supervisor's socket hiccuped.
"""

from __future__ import annotations

import os
import socket

from stagerd.log import get_logger

log = get_logger(__name__)


def notify(message: str, *, environ: dict[str, str] | None = None) -> bool:
    """Send *message* (e.g. ``"READY=1"``); True if a supervisor received it."""
    address = (environ if environ is not None else os.environ).get("NOTIFY_SOCKET", "")
    if not address:
        return False
    target = "\0" + address[1:] if address.startswith("@") else address
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            # Never block the worker's main loop on a supervisor that stopped reading.
            sock.setblocking(False)
            sock.sendto(message.encode(), target)
    except OSError as exc:
        log.warning("sd_notify %s failed: %s", message.split("=", maxsplit=1)[0], exc)
        return False
    return True


def ready(status: str = "") -> bool:
    return notify("READY=1" + (f"\nSTATUS={status}" if status else ""))


def watchdog() -> bool:
    return notify("WATCHDOG=1")


def stopping() -> bool:
    return notify("STOPPING=1")


def watchdog_seconds(environ: dict[str, str] | None = None) -> float | None:
    """systemd's ``WatchdogSec`` as it tells the service (``$WATCHDOG_USEC``), or None."""
    raw = (environ if environ is not None else os.environ).get("WATCHDOG_USEC", "")
    try:
        usec = int(raw)
    except ValueError:
        return None
    return usec / 1e6 if usec > 0 else None
