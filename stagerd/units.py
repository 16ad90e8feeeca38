"""Human units for sizes (``40GiB``) and durations (``15m``)."""

from __future__ import annotations

import re

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_DURATION_UNITS = {"": 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_NUMBER_UNIT = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*$")


def parse_size(text: str) -> int:
    """Parse ``"40GiB"``, ``"5MB"``, ``"1048576"`` into bytes. Raises ValueError."""
    match = _NUMBER_UNIT.match(text)
    if not match:
        raise ValueError(f"not a size: {text!r} (examples: 40GiB, 512MiB, 1048576)")
    number, unit = match.groups()
    factor = _SIZE_UNITS.get(unit.lower())
    if factor is None:
        raise ValueError(
            f"unknown size unit {unit!r} in {text!r} (use B, KiB, MiB, GiB, TiB, KB, MB, GB)"
        )
    return int(float(number) * factor)


def parse_duration(text: str) -> float:
    """Parse ``"15m"``, ``"24h"``, ``"30"`` (seconds) into seconds. Raises ValueError."""
    total = 0.0
    rest = text.strip()
    if not rest:
        raise ValueError("empty duration")
    # Allow compound forms such as "1h30m".
    for number, unit in re.findall(r"([0-9]+(?:\.[0-9]+)?)([a-z]*)", rest.lower()):
        if unit not in _DURATION_UNITS:
            raise ValueError(f"unknown duration unit {unit!r} in {text!r} (use ms, s, m, h, d)")
        total += float(number) * _DURATION_UNITS[unit]
    if not re.fullmatch(r"(?:[0-9]+(?:\.[0-9]+)?[a-z]*)+", rest.lower()):
        raise ValueError(f"not a duration: {text!r} (examples: 30s, 15m, 24h)")
    return total


def format_size(nbytes: float) -> str:
    """Render bytes with a binary unit, e.g. ``1.5 GiB``."""
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"
