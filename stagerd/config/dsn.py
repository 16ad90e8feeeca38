"""Connection URLs checked by stagerd before any library sees them.

libpq and redis-py echo the text they fail to parse (a password, say) and raise where a
traceback follows, so ``DATABASE_URL`` and ``REDIS_URL`` are checked here when settings
are read: what is wrong is named, the value never is (the caller adds the variable's
name). Cheap on purpose: importing psycopg or redis-py for this would add about half a
second to every command. What only the libraries can refuse is mapped to the same kind
of error where they connect (:mod:`stagerd.db.pg`, :mod:`stagerd.queue.redis_queue`).
"""

from __future__ import annotations

from urllib.parse import parse_qsl, unquote, urlsplit

_PG_SCHEMES = ("postgresql", "postgres")
_REDIS_SCHEMES = ("redis", "rediss", "unix")
# redis-py's URL options and how it converts them (others would fail at connect time).
_REDIS_OPTIONS = {
    "db": int, "max_connections": int, "health_check_interval": float, "socket_timeout": float,
    "socket_connect_timeout": float, "timeout": float, "protocol": int,
    "readonly": str, "retry_on_timeout": str, "socket_keepalive": str,
    "ssl_check_hostname": str, "ssl_cert_reqs": str, "ssl_ca_certs": str, "client_name": str,
}  # fmt: skip
_PERCENT_HINT = "percent-encode spaces and special characters of the password (%20 for a space)"


def database_url(text: str) -> str:
    """A libpq URL or key=value string, or ValueError saying what is wrong."""
    if "://" in text:
        _check_url(text, _PG_SCHEMES)
        for port in _ports(urlsplit(text).netloc):
            _check_port(port)
        return text
    if "=" not in text:
        raise ValueError("must be a libpq URL (postgresql://...) or key=value string")
    _check_port_list(conninfo_pairs(text).get("port", ""))
    return text


def redis_url(text: str) -> str:
    """A redis-py URL, or ValueError saying what is wrong."""
    _check_url(text, _REDIS_SCHEMES)
    parts = urlsplit(text)
    if parts.scheme != "unix":
        for port in _ports(parts.netloc):
            _check_port(port)
        database = parts.path.strip("/")
        if database and not (database.isascii() and database.isdigit()):
            # redis-py silently uses database 0 for a path it cannot read as a number.
            raise ValueError("the path must be a database number (redis://host:6379/0)")
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        convert = _REDIS_OPTIONS.get(name)
        if convert is None:
            raise ValueError(f"unknown query option {name[:40]!r}")
        try:
            convert(value)
        except ValueError:
            raise ValueError(f"query option {name!r} has a malformed value") from None
    return text


def url_passwords(url: str | None) -> list[str]:
    """The password(s) in a connection URL or libpq string, as written and as decoded,
    for the log redaction filter. Never raises."""
    if not url:
        return []
    try:
        if "://" in url:
            raw = urlsplit(url).password
            return [raw, unquote(raw)] if raw else []
        password = conninfo_pairs(url).get("password")
    except ValueError:
        return []
    return [password] if password else []


def conninfo_pairs(text: str) -> dict[str, str]:
    """libpq's ``key = value`` syntax (values bare or single-quoted, backslash escapes).
    Raises ValueError without quoting the text."""
    pairs: dict[str, str] = {}
    pos, end = 0, len(text)
    while True:
        pos = _skip_space(text, pos)
        if pos >= end:
            return pairs
        eq = text.find("=", pos)
        key = text[pos:eq].strip() if eq >= 0 else ""
        if not key or not all(c.isalnum() or c == "_" for c in key):
            raise ValueError(f"does not parse as a libpq key=value string ({_PERCENT_HINT})")
        value, pos = _conninfo_value(text, _skip_space(text, eq + 1))
        pairs[key] = value


def _conninfo_value(text: str, pos: int) -> tuple[str, int]:
    quoted = pos < len(text) and text[pos] == "'"
    pos += quoted
    out: list[str] = []
    while pos < len(text):
        c = text[pos]
        if c == "\\" and pos + 1 < len(text):
            out.append(text[pos + 1])
            pos += 2
            continue
        if (quoted and c == "'") or (not quoted and c.isspace()):
            return "".join(out), pos + quoted
        out.append(c)
        pos += 1
    if quoted:
        raise ValueError("has an unterminated quoted value")
    return "".join(out), pos


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos].isspace():
        pos += 1
    return pos


def _check_url(text: str, schemes: tuple[str, ...]) -> None:
    parts = urlsplit(text)
    if parts.scheme not in schemes or not (parts.netloc or parts.scheme == "unix"):
        raise ValueError(f"must be a URL starting with {' or '.join(s + '://' for s in schemes)}")
    if any(c.isspace() or ord(c) < 32 for c in text):
        raise ValueError(f"contains whitespace or control characters: {_PERCENT_HINT}")


def _ports(netloc: str) -> list[str]:
    """The port of each host in *netloc* (libpq allows ``h1:5432,h2:5433``)."""
    hosts = netloc.rpartition("@")[2]
    ports = []
    for host in hosts.split(","):
        if host.startswith("["):  # [IPv6]:port
            ports.append(host.partition("]")[2].removeprefix(":"))
        elif ":" in host:
            ports.append(host.rpartition(":")[2])
    return ports


def _check_port_list(text: str) -> None:
    for port in text.split(","):
        _check_port(port)


def _check_port(port: str) -> None:
    if port and not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
        raise ValueError("port must be a number between 1 and 65535")
