"""An HTTP/1.1 reverse proxy that injects S3-style faults, for tests on loopback.

It sits between a client (boto3, stagerd) and a real S3 server and, for a configurable share
of requests chosen by a seeded RNG, does one of:

- ``slowdown``       answer 503 SlowDown with an S3 XML error body (upstream never sees it)
- ``internal_error`` answer 500 InternalError likewise
- ``reset_request``  forward half the request body, then reset both connections (RST)
- ``reset_response`` forward the response head and half its body, then reset the client
- ``stall``          hold the request without answering for ``stall_seconds``, then reset
- ``stall_body``     send the response head and half its body, then stall and reset
- ``truncate``       send the response head (its Content-Length promises more) and half the
                     body, then close cleanly: the client sees a short body

Pacing: ``throttle_up`` / ``throttle_down`` limit client->server / server->client bodies to
that many bytes per second, all connections together (one slow link), e.g. to kill a process
while it is inside a phase. Scripted faults: ``fail_first(n, kind, match)`` gives the first
*n* requests *match* accepts that fault, whatever the rate.

Everything else passes through byte for byte (Range, If-Match, SigV4 headers, Host), with
keep-alive, ``Expect: 100-continue`` and chunked bodies, streamed in 256 KiB pieces so
hundreds of MiB go through in seconds. Counts of what was injected, per kind, are kept.

    with FaultProxy("http://127.0.0.1:8333", rate=0.2, seed=7) as proxy:
        client = make_client(proxy.endpoint)   # ... then proxy.stats().injected
"""

from __future__ import annotations

import contextlib
import random
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from io import BufferedReader
from typing import Protocol
from urllib.parse import urlsplit

FAULT_KINDS = (
    "slowdown",
    "internal_error",
    "reset_request",
    "reset_response",
    "stall",
    "stall_body",
    "truncate",
)
_REQUEST_BODY_KINDS = frozenset({"reset_request"})
_RESPONSE_BODY_KINDS = frozenset({"reset_response", "stall_body", "truncate"})
_ERROR_REPLIES = {
    "slowdown": (503, "Slow Down", "SlowDown", "Please reduce your request rate."),
    "internal_error": (
        500,
        "Internal Server Error",
        "InternalError",
        "We encountered an internal error. Please try again.",
    ),
    # Only scripted (fail_first): a Swift-like server with max_upload_part_num = 2.
    "part_limit": (
        400,
        "Bad Request",
        "InvalidArgument",
        "Part number must be an integer between 1 and 2, inclusive",
    ),
}
# Kinds fail_first may script: the random ones plus replies no random run should pick.
SCRIPTED_KINDS = (*FAULT_KINDS, "part_limit")
_CHUNK = 256 * 1024
_CHUNKED_CUT = 8192  # data bytes forwarded of a chunked body before a cut
_MAX_HEAD = 64 * 1024


class _Sink(Protocol):
    def sendall(self, data: bytes, /) -> None: ...


class Pacer:
    """A shared link of *rate* bytes/s: each send waits for its slot (thread-safe)."""

    SLICE = 16 * 1024  # paced in small slices so the flow is smooth, not bursts of _CHUNK

    def __init__(self, rate: float) -> None:
        if rate <= 0:
            raise ValueError(f"rate must be > 0 bytes/s, got {rate}")
        self.rate = rate
        self._lock = threading.Lock()
        self._next = time.monotonic()

    def wait(self, nbytes: int) -> None:
        with self._lock:
            start = max(self._next, time.monotonic())
            self._next = start + nbytes / self.rate
        delay = start - time.monotonic()
        if delay > 0:
            time.sleep(delay)


class _Paced:
    """A socket's sendall, paced by a :class:`Pacer`."""

    def __init__(self, sock: socket.socket, pacer: Pacer) -> None:
        self.sock = sock
        self.pacer = pacer

    def sendall(self, data: bytes, /) -> None:
        view = memoryview(data)
        for at in range(0, len(view), Pacer.SLICE):
            piece = view[at : at + Pacer.SLICE]
            self.pacer.wait(len(piece))
            self.sock.sendall(piece)


def _paced(sock: socket.socket, pacer: Pacer | None) -> _Sink:
    return sock if pacer is None else _Paced(sock, pacer)


class _Closed(Exception):
    """The peer closed the connection (or sent garbage) where a message was expected."""


@dataclass(frozen=True)
class Head:
    """A request or response head, headers kept in order and spelling."""

    start: str
    headers: tuple[tuple[str, str], ...]

    def get(self, name: str) -> str | None:
        lname = name.lower()
        for key, value in self.headers:
            if key.lower() == lname:
                return value
        return None

    @property
    def method(self) -> str:
        return self.start.split(" ", 1)[0].upper()

    @property
    def target(self) -> str:
        parts = self.start.split(" ")
        return parts[1] if len(parts) > 1 else ""

    @property
    def status(self) -> int:
        return int(self.start.split(" ")[1])

    @property
    def chunked(self) -> bool:
        return "chunked" in (self.get("Transfer-Encoding") or "").lower()

    @property
    def content_length(self) -> int | None:
        value = self.get("Content-Length")
        return int(value) if value is not None and not self.chunked else None

    @property
    def wants_close(self) -> bool:
        conn = (self.get("Connection") or "").lower()
        return (
            "close" in conn or self.start.endswith("HTTP/1.0") or self.start.startswith("HTTP/1.0")
        )

    def with_header(self, name: str, value: str) -> Head:
        kept = tuple((k, v) for k, v in self.headers if k.lower() != name.lower())
        return Head(self.start, (*kept, (name, value)))

    def encode(self) -> bytes:
        lines = [self.start, *(f"{k}: {v}" for k, v in self.headers)]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


@dataclass(frozen=True)
class FaultEvent:
    method: str
    target: str
    kind: str


@dataclass
class _Scripted:
    kind: str
    match: Callable[[Head], bool]
    left: int


@dataclass(frozen=True)
class FaultStats:
    """A snapshot: requests seen, faults injected per kind, and the faulted requests."""

    requests: int
    injected: dict[str, int]
    events: tuple[FaultEvent, ...] = field(default=())
    connections: int = 0  # client connections accepted (keep-alive reuses them)

    @property
    def total_injected(self) -> int:
        return sum(self.injected.values())


def _read_head(reader: BufferedReader) -> Head | None:
    """The next message head, or None on a clean EOF before its first byte."""
    lines: list[str] = []
    size = 0
    while True:
        line = reader.readline(_MAX_HEAD)
        if not line:
            if not lines:
                return None
            raise _Closed("connection closed inside a message head")
        size += len(line)
        if size > _MAX_HEAD:
            raise _Closed("message head too large")
        text = line.decode("latin-1").rstrip("\r\n")
        if not text:
            if not lines:
                continue  # tolerate stray CRLF between messages (RFC 9112 2.2)
            break
        lines.append(text)
    headers = []
    for text in lines[1:]:
        name, _, value = text.partition(":")
        headers.append((name.strip(), value.strip()))
    return Head(lines[0], tuple(headers))


def _copy_fixed(reader: BufferedReader, dst: _Sink | None, n: int) -> None:
    """Copy exactly *n* bytes (dst None: discard)."""
    while n > 0:
        data = reader.read1(min(n, _CHUNK))
        if not data:
            raise _Closed("body shorter than its Content-Length")
        if dst is not None:
            dst.sendall(data)
        n -= len(data)


def _copy_chunked(reader: BufferedReader, dst: _Sink | None, cut: int | None) -> bool:
    """Copy a chunked body as is; with *cut*, stop after that many data bytes, withholding
    the last chunk so the body is always left unfinished. Returns whether it completed."""
    sent = 0
    while True:
        line = reader.readline(_MAX_HEAD)
        if not line:
            raise _Closed("connection closed inside a chunked body")
        size = int(line.split(b";", 1)[0].strip() or b"0", 16)
        if cut is not None and (size == 0 or sent + size > cut):
            if dst is not None and size:
                dst.sendall(line)
                _copy_fixed(reader, dst, cut - sent)
            return False
        if dst is not None:
            dst.sendall(line)
        if size == 0:
            break
        _copy_fixed(reader, dst, size + 2)  # data + CRLF
        sent += size
    while True:  # trailers, then the blank line
        line = reader.readline(_MAX_HEAD)
        if not line:
            raise _Closed("connection closed inside chunked trailers")
        if dst is not None:
            dst.sendall(line)
        if line in (b"\r\n", b"\n"):
            return True


def _copy_until_close(reader: BufferedReader, dst: _Sink, cut: int | None) -> bool:
    sent = 0
    while cut is None or sent < cut:
        data = reader.read1(_CHUNK if cut is None else min(_CHUNK, cut - sent))
        if not data:
            return True
        dst.sendall(data)
        sent += len(data)
    return False


def _reset(sock: socket.socket | None) -> None:
    """Close with an RST instead of a FIN: the peer sees ECONNRESET."""
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _response_has_body(request: Head, response: Head) -> bool:
    return not (
        request.method == "HEAD" or response.status in (204, 304) or 100 <= response.status < 200
    )


class _Session:
    """One client connection and its upstream connection, request after request."""

    def __init__(self, proxy: FaultProxy, client: socket.socket) -> None:
        self.proxy = proxy
        self.client = client
        self.creader = client.makefile("rb", buffering=_CHUNK)
        self.upstream: socket.socket | None = None
        self.ureader: BufferedReader | None = None

    def run(self) -> None:
        try:
            while not self.proxy.stopping.is_set():
                head = _read_head(self.creader)
                if head is None or not self.exchange(head):
                    break
        except (OSError, _Closed, ValueError):
            pass  # a peer went away or spoke garbage: this connection is over, nothing else
        finally:
            self.drop_upstream(reset=False)
            self.client.close()

    def connect(self) -> tuple[socket.socket, BufferedReader]:
        if self.upstream is not None and self.ureader is not None:
            # An idle keep-alive connection the server closed reads as ready (EOF): replace it
            # before sending, because a request sent into it cannot be told apart from a fault.
            self.upstream.settimeout(0)
            try:
                stale = self.upstream.recv(1, socket.MSG_PEEK) == b""
            except BlockingIOError:
                stale = False
            finally:
                self.upstream.settimeout(self.proxy.io_timeout)
            if not stale:
                return self.upstream, self.ureader
            self.drop_upstream(reset=False)
        sock = socket.create_connection(self.proxy.upstream_addr, timeout=self.proxy.io_timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.upstream, self.ureader = sock, sock.makefile("rb", buffering=_CHUNK)
        return self.upstream, self.ureader

    def drop_upstream(self, *, reset: bool) -> None:
        if self.upstream is not None:
            if reset:
                _reset(self.upstream)
            else:
                self.upstream.close()
        self.upstream = self.ureader = None

    def exchange(self, req: Head) -> bool:
        """Serve one request; returns whether the client connection stays open."""
        kind = self.proxy.choose(req)
        if kind in _ERROR_REPLIES:
            return self.reply_error(req, kind)
        if kind == "stall":
            self.proxy.stopping.wait(self.proxy.stall_seconds)
            _reset(self.client)
            return False
        upstream, ureader = self.connect()
        upstream.sendall(req.encode())
        if (req.get("Expect") or "").lower() == "100-continue":
            interim = _read_head(ureader)
            if interim is None:
                raise _Closed("upstream closed before answering Expect")
            if interim.status != 100:
                # Final answer before the body (e.g. 403): the client will not send it.
                self.relay_response(req, interim, None)
                return False
            self.client.sendall(interim.encode())
        if not self.relay_request_body(req, kind == "reset_request"):
            _reset(self.client)
            self.drop_upstream(reset=True)
            return False
        resp = _read_head(ureader)
        while resp is not None and resp.status == 100:
            resp = _read_head(ureader)
        if resp is None:
            raise _Closed("upstream closed without a response")
        return self.relay_response(req, resp, kind) and not req.wants_close

    def relay_request_body(self, req: Head, cut: bool) -> bool:
        assert self.upstream is not None
        up = _paced(self.upstream, self.proxy.up)
        if req.chunked:
            return _copy_chunked(self.creader, up, _CHUNKED_CUT if cut else None)
        length = req.content_length or 0
        if cut:
            _copy_fixed(self.creader, up, length // 2)
            return False
        _copy_fixed(self.creader, up, length)
        return True

    def relay_response(self, req: Head, resp: Head, kind: str | None) -> bool:
        """Relay (or damage) the response; returns whether both connections stay usable."""
        assert self.ureader is not None
        if not _response_has_body(req, resp):
            if kind == "reset_response":  # nothing to cut in: reset before the head
                self.drop_upstream(reset=True)
                _reset(self.client)
                return False
            self.client.sendall(resp.encode())
            return not resp.wants_close
        length = resp.content_length
        if kind in _RESPONSE_BODY_KINDS:
            self.damage_response(resp, length, kind)
            return False
        self.client.sendall(resp.encode())
        down = _paced(self.client, self.proxy.down)
        if resp.chunked:
            _copy_chunked(self.ureader, down, None)
        elif length is not None:
            _copy_fixed(self.ureader, down, length)
        else:
            _copy_until_close(self.ureader, down, None)
            return False
        return not resp.wants_close

    def damage_response(self, resp: Head, length: int | None, kind: str | None) -> None:
        assert self.ureader is not None
        if length == 0 and kind == "truncate":
            resp = resp.with_header("Content-Length", "1")  # promise a byte that never comes
        if length == 0 and kind != "truncate":
            self.drop_upstream(reset=True)
            _reset(self.client)
            return
        self.client.sendall(resp.encode())
        down = _paced(self.client, self.proxy.down)
        if resp.chunked:
            _copy_chunked(self.ureader, down, _CHUNKED_CUT)
        elif length is not None:
            _copy_fixed(self.ureader, down, length // 2)
        else:
            _copy_until_close(self.ureader, down, _CHUNKED_CUT)
        self.drop_upstream(reset=True)
        if kind == "stall_body":
            self.proxy.stopping.wait(self.proxy.stall_seconds)
        if kind == "truncate":
            self.client.shutdown(socket.SHUT_WR)
            self.client.close()
        else:
            _reset(self.client)

    def reply_error(self, req: Head, kind: str) -> bool:
        status, reason, code, message = _ERROR_REPLIES[kind]
        expect = (req.get("Expect") or "").lower() == "100-continue"
        if not expect:  # read the body the client is sending, so the connection stays usable
            if req.chunked:
                _copy_chunked(self.creader, None, None)
            else:
                _copy_fixed(self.creader, None, req.content_length or 0)
        request_id = f"faultproxy-{self.proxy.stats().requests}"
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{code}</Code><Message>{message}</Message>"
            f"<Resource>{req.target.split('?', 1)[0]}</Resource>"
            f"<RequestId>{request_id}</RequestId></Error>"
        ).encode()
        keep = not expect and not req.wants_close
        head = Head(
            f"HTTP/1.1 {status} {reason}",
            (
                ("Content-Type", "application/xml"),
                ("Content-Length", str(0 if req.method == "HEAD" else len(body))),
                ("x-amz-request-id", request_id),
                ("Connection", "keep-alive" if keep else "close"),
            ),
        )
        self.client.sendall(head.encode() + (b"" if req.method == "HEAD" else body))
        return keep


class FaultProxy:
    """A fault-injecting reverse proxy on a free loopback port, served by threads.

    *rate* is the share of requests faulted (0..1); the kind is drawn evenly from *kinds*
    among those that apply to the request (a body to cut, a response that may have one).
    *only* limits faults to requests it accepts (e.g. ``lambda h: h.method == "GET"``).
    All of it can be changed while running with :meth:`configure`.
    """

    def __init__(
        self,
        upstream: str,
        *,
        rate: float = 0.0,
        seed: int = 0,
        kinds: Iterable[str] = FAULT_KINDS,
        stall_seconds: float = 5.0,
        only: Callable[[Head], bool] | None = None,
        io_timeout: float = 60.0,
        throttle_up: float | None = None,
        throttle_down: float | None = None,
    ) -> None:
        parts = urlsplit(upstream)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"upstream must be an http:// URL, got {upstream!r}")
        self.upstream_addr = (parts.hostname, parts.port or 80)
        self.io_timeout = io_timeout
        self.up = Pacer(throttle_up) if throttle_up else None
        self.down = Pacer(throttle_down) if throttle_down else None
        self._scripted: list[_Scripted] = []
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._rng = random.Random(seed)
        self._counts: Counter[str] = Counter()
        self._events: list[FaultEvent] = []
        self._requests = 0
        self._connections = 0
        self._sessions: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self.rate = 0.0
        self.kinds: tuple[str, ...] = ()
        self.stall_seconds = stall_seconds
        self.only = only
        self.configure(rate=rate, kinds=kinds)

    @property
    def endpoint(self) -> str:
        if self._listener is None:
            raise RuntimeError("FaultProxy is not started")
        host, port = self._listener.getsockname()[:2]
        return f"http://{host}:{port}"

    def configure(
        self,
        *,
        rate: float | None = None,
        kinds: Iterable[str] | None = None,
        stall_seconds: float | None = None,
        only: Callable[[Head], bool] | None = None,
    ) -> None:
        """Change what is injected from the next request on."""
        with self._lock:
            if rate is not None:
                if not 0.0 <= rate <= 1.0:
                    raise ValueError(f"rate must be within 0..1, got {rate}")
                self.rate = rate
            if kinds is not None:
                chosen = tuple(kinds)
                unknown = set(chosen) - set(FAULT_KINDS)
                if unknown or not chosen:
                    raise ValueError(f"kinds must be a non-empty subset of {FAULT_KINDS}")
                self.kinds = chosen
            if stall_seconds is not None:
                self.stall_seconds = stall_seconds
            if only is not None:
                self.only = only

    def fail_first(self, n: int, kind: str, match: Callable[[Head], bool]) -> None:
        """Give the next *n* requests that *match* accepts the fault *kind* (any rate)."""
        if kind not in SCRIPTED_KINDS:
            raise ValueError(f"kind must be one of {SCRIPTED_KINDS}, got {kind!r}")
        with self._lock:
            self._scripted.append(_Scripted(kind, match, n))

    def _scripted_kind(self, req: Head) -> str | None:
        for script in self._scripted:
            if script.left > 0 and script.match(req):
                script.left -= 1
                return script.kind
        return None

    def choose(self, req: Head) -> str | None:
        """Count the request and decide its fault (None: pass through)."""
        has_body = req.chunked or (req.content_length or 0) > 0
        with self._lock:
            self._requests += 1
            scripted = self._scripted_kind(req)
            if scripted is not None:
                self._counts[scripted] += 1
                self._events.append(FaultEvent(req.method, req.target, scripted))
                return scripted
            if self.rate <= 0.0 or self._rng.random() >= self.rate:
                return None
            if self.only is not None and not self.only(req):
                return None
            usable = [
                k
                for k in self.kinds
                if (k not in _REQUEST_BODY_KINDS or has_body)
                and (k not in _RESPONSE_BODY_KINDS or req.method != "HEAD")
            ]
            if not usable:
                return None
            kind = self._rng.choice(usable)
            self._counts[kind] += 1
            self._events.append(FaultEvent(req.method, req.target, kind))
            return kind

    def stats(self) -> FaultStats:
        with self._lock:
            return FaultStats(
                self._requests, dict(self._counts), tuple(self._events), self._connections
            )

    def reset_stats(self) -> None:
        with self._lock:
            self._requests = self._connections = 0
            self._counts.clear()
            self._events.clear()

    def start(self) -> FaultProxy:
        listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        listener.settimeout(0.5)  # wake up now and then to notice stop()
        self._listener = listener
        self._thread = threading.Thread(target=self._accept, name="faultproxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting, cut every open connection (ends stalls at once) and join."""
        self.stopping.set()
        if self._listener is not None:
            # close() alone does not wake a thread blocked in accept(); shutdown() does.
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
        with self._lock:
            sessions = list(self._sessions)
        for sock in sessions:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _accept(self) -> None:
        assert self._listener is not None
        while not self.stopping.is_set():
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # listener closed by stop()
            sock.settimeout(self.io_timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._sessions.add(sock)
                self._connections += 1
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        try:
            _Session(self, sock).run()
        finally:
            with self._lock:
                self._sessions.discard(sock)
