"""Env files read exactly as systemd's ``EnvironmentFile=`` reads them.

The units load the same file with ``EnvironmentFile=``, so stagerd run by hand must see
what the service sees: :func:`parse_env_text` is systemd's syntax (v254+), and
:func:`read_env_file` refuses what could hang or exhaust a reader (a FIFO, ``/dev/zero``,
a huge file) before parsing.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from stagerd.errors import ConfigError


def read_env_file(path: Path) -> dict[str, str]:
    """Read *path* exactly as systemd's ``EnvironmentFile=`` does (the units load the same
    file, so stagerd run by hand must see what the service sees); see
    :func:`parse_env_text` for the rules. Refuses anything but a regular file of at most
    ``MAX_ENV_FILE_BYTES`` (a FIFO would hang, ``/dev/zero`` would never end). Raises
    ConfigError."""
    return parse_env_text(_read_env_bytes(path), str(path))


MAX_ENV_FILE_BYTES = 1024 * 1024
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _read_env_bytes(path: Path) -> str:
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer before we can refuse it.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(f"env file {path}: cannot read ({exc.strerror})") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ConfigError(f"env file {path}: not a regular file")
        data = os.read(fd, MAX_ENV_FILE_BYTES + 1)
        while len(data) <= MAX_ENV_FILE_BYTES and (more := os.read(fd, 65536)):
            data += more
    except OSError as exc:
        raise ConfigError(f"env file {path}: cannot read ({exc.strerror})") from None
    finally:
        os.close(fd)
    if len(data) > MAX_ENV_FILE_BYTES:
        raise ConfigError(f"env file {path}: larger than {MAX_ENV_FILE_BYTES} bytes")
    if b"\0" in data:
        raise ConfigError(f"env file {path}: contains a NUL byte")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"env file {path}: not UTF-8 text") from None


def parse_env_text(text: str, name: str = "env file") -> dict[str, str]:
    """systemd's ``EnvironmentFile=`` syntax (systemd.exec(5), v254+):

    * ``#`` or ``;`` first on a line starts a comment; blank lines are skipped;
    * ``KEY=VALUE``; whitespace around the key and around an unquoted value is dropped,
      interior whitespace kept; in an unquoted value ``\\x`` is ``x`` and a trailing
      ``\\`` continues the line; quotes *inside* an unquoted value are kept verbatim;
    * ``'...'`` is verbatim (may span lines); ``"..."`` unescapes ``\\"``, ``\\\\``,
      ``\\$`` and ``\\```, drops backslash-newline and keeps any other backslash;
      quoted and unquoted pieces next to each other are joined;
    * the last assignment of a key wins.

    Stricter than systemd in one way: what systemd would silently drop (a line with no
    ``=``, a name such as ``export FOO``) is a ConfigError naming the line, because a
    setting that silently does not apply is worse than a refusal.
    """
    values: dict[str, str] = {}
    for lineno, key, value in _EnvScanner(text).assignments():
        if value is None:
            raise ConfigError(f"{name}, line {lineno}: expected KEY=VALUE")
        if not _ENV_NAME.fullmatch(key):
            raise ConfigError(
                f"{name}, line {lineno}: {key[:40]!r} is not a variable name "
                "(systemd ignores such lines; write KEY=VALUE, without 'export')"
            )
        values[key] = value
    return values


class _EnvScanner:
    """The character-level state machine behind :func:`parse_env_text`."""

    def __init__(self, text: str) -> None:
        self._text = text
        self._pos = 0
        self.line = 1

    def _next(self) -> str | None:
        if self._pos >= len(self._text):
            return None
        c = self._text[self._pos]
        self._pos += 1
        if c == "\n":
            self.line += 1
        return c

    def assignments(self) -> list[tuple[int, str, str | None]]:
        out: list[tuple[int, str, str | None]] = []
        while (c := self._next()) is not None:
            if c in " \t\r\n":
                continue
            if c in "#;":
                self._comment()
                continue
            start = self.line
            key, has_value = self._key(c)
            out.append((start, key, self._value() if has_value else None))
        return out

    def _comment(self) -> None:
        while (c := self._next()) is not None and c not in "\r\n":
            if c == "\\" and self._next() in (None, "\r", "\n"):
                return  # v254+: a comment ending in a backslash does not continue
        return

    def _key(self, first: str) -> tuple[str, bool]:
        chars = [first]
        while (c := self._next()) is not None and c not in "\r\n":
            if c == "=":
                return "".join(chars).rstrip(" \t"), True
            chars.append(c)
        return "".join(chars).rstrip(" \t"), False

    def _value(self) -> str:
        out: list[str] = []
        keep = 0  # length of out without its unquoted trailing whitespace
        unquoted = False
        while (c := self._next()) is not None and c not in "\r\n":
            if c == "'" and not unquoted:
                out.extend(self._until("'"))
                keep = len(out)
            elif c == '"' and not unquoted:
                out.extend(self._double_quoted())
                keep = len(out)
            elif c == "\\":
                escaped = self._next()
                unquoted = True
                if escaped is not None and escaped not in "\r\n":
                    out.append(escaped)
                keep = len(out)
            elif c in " \t" and not unquoted:
                continue  # leading whitespace (before or between quoted pieces)
            else:
                unquoted = True
                out.append(c)
                if c not in " \t":
                    keep = len(out)
        return "".join(out[:keep])

    def _until(self, quote: str) -> list[str]:
        chars: list[str] = []
        while (c := self._next()) is not None and c != quote:
            chars.append(c)
        return chars

    def _double_quoted(self) -> list[str]:
        chars: list[str] = []
        while (c := self._next()) is not None and c != '"':
            if c != "\\":
                chars.append(c)
                continue
            escaped = self._next()
            if escaped is None:
                break
            if escaped in '"\\`$':
                chars.append(escaped)
            elif escaped != "\n":
                chars.extend(("\\", escaped))
        return chars
