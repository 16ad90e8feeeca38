"""Helpers for the transfer tests: streamed tar archives and a fault-injecting proxy.

``write_tar`` writes a valid archive of random members without holding it in memory.

:class:`FaultProxy` is a loopback TCP proxy in front of the real S3 server:

- ``rate``: caps client->server bytes per second (all connections together), so a test can
  kill a real upload while it is in the middle of its parts.
- ``resets`` / ``errors_503``: the first N connections whose first request is an UploadPart
  are reset (RST) or answered ``503 SlowDown``; everything else is forwarded untouched.
"""

from __future__ import annotations

import os
import socket
import struct
import tarfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit


def write_tar(path: Path, total: int, *, members: int = 4) -> Path:
    """A tar of *members* random files adding up to about *total* bytes."""
    each = max(1, total // members)
    with open(path, "wb") as out:
        for i in range(members):
            info = tarfile.TarInfo(f"batch/item-{i:04d}.wav")
            info.size = each
            out.write(info.tobuf(format=tarfile.GNU_FORMAT))
            left = each
            while left:
                n = min(left, 8 * 1024 * 1024)
                out.write(os.urandom(n))
                left -= n
            out.write(bytes(-each % 512))
        out.write(bytes(1024))
    return path


SLOW_DOWN = (
    b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nConnection: close\r\n"
    b"Content-Length: 96\r\n\r\n"
    + b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>".ljust(
        96
    )
)


@dataclass
class ProxyStats:
    resets: int = 0
    errors_503: int = 0
    connections: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class FaultProxy:
    def __init__(
        self, upstream: str, *, rate: float | None = None, resets: int = 0, errors_503: int = 0
    ) -> None:
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.rate = rate
        self.budget_resets = resets
        self.budget_503 = errors_503
        self.stats = ProxyStats()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.closing = threading.Event()
        self.sent = 0
        self.started = time.monotonic()
        self.rate_lock = threading.Lock()

    def start(self) -> None:
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self.closing.set()
        self.listener.close()

    def _accept(self) -> None:
        while not self.closing.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        head = b""
        while b"\r\n\r\n" not in head and len(head) < 65536:
            chunk = client.recv(65536)
            if not chunk:
                client.close()
                return
            head += chunk
        first_line = head.split(b"\r\n", 1)[0]
        is_part = first_line.startswith(b"PUT ") and b"partNumber=" in first_line
        with self.stats.lock:
            self.stats.connections += 1
            action = "forward"
            if is_part and self.stats.resets < self.budget_resets:
                self.stats.resets += 1
                action = "reset"
            elif is_part and self.stats.errors_503 < self.budget_503:
                self.stats.errors_503 += 1
                action = "503"
        if action == "reset":
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.close()
            return
        if action == "503":
            client.sendall(SLOW_DOWN)
            client.shutdown(socket.SHUT_RDWR)
            client.close()
            return
        upstream = socket.create_connection(self.upstream)
        self._throttle(len(head))
        upstream.sendall(head)
        threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()
        self._pipe(client, upstream, True)

    def _pipe(self, src: socket.socket, dst: socket.socket, throttled: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if throttled:
                    self._throttle(len(data))
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

    def _throttle(self, nbytes: int) -> None:
        if not self.rate:
            return
        with self.rate_lock:
            self.sent += nbytes
            due = self.started + self.sent / self.rate
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)


@contextmanager
def fault_proxy(upstream: str, **kwargs: float | int | None) -> Iterator[FaultProxy]:
    proxy = FaultProxy(upstream, **kwargs)  # type: ignore[arg-type]
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.close()
