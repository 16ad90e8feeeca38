"""sd_notify over real AF_UNIX datagram sockets, path and abstract."""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

import pytest

from stagerd.gpu import sdnotify


def _bound(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(2)
    return sock


def test_path_socket_receives_ready(tmp_path: Path) -> None:
    path = str(tmp_path / "notify.sock")
    with _bound(path) as sock:
        assert sdnotify.notify("READY=1", environ={"NOTIFY_SOCKET": path})
        assert sock.recv(100) == b"READY=1"


def test_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"stagerd-test-{uuid.uuid4().hex}"
    with _bound("\0" + name) as sock:
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.ready("connected")
        assert sock.recv(100) == b"READY=1\nSTATUS=connected"
        assert sdnotify.watchdog() and sock.recv(100) == b"WATCHDOG=1"
        assert sdnotify.stopping() and sock.recv(100) == b"STOPPING=1"


def test_without_notify_socket_is_a_noop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.ready() is False
    assert sdnotify.notify("WATCHDOG=1", environ={}) is False


def test_unreachable_socket_is_logged_not_raised(tmp_path: Path) -> None:
    missing = str(tmp_path / "gone.sock")
    assert not os.path.exists(missing)
    assert sdnotify.notify("READY=1", environ={"NOTIFY_SOCKET": missing}) is False


def test_a_full_socket_never_blocks(tmp_path: Path) -> None:
    path = str(tmp_path / "full.sock")
    with _bound(path):
        # Nobody reads: the datagram queue fills up; sends must fail fast, not hang.
        results = [
            sdnotify.notify("WATCHDOG=1", environ={"NOTIFY_SOCKET": path}) for _ in range(600)
        ]
    assert results[0] is True and results[-1] is False
