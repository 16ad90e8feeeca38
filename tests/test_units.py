from __future__ import annotations

import pytest

from stagerd.units import format_size, parse_duration, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("40GiB", 40 * 1024**3),
        ("5MB", 5_000_000),
        ("1048576", 1048576),
        ("1.5KiB", 1536),
        (" 2 mib ", 2 * 1024**2),
    ],
)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "abc", "10XB", "-5GiB", "GiB"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("15m", 900.0),
        ("24h", 86400.0),
        ("30", 30.0),
        ("1h30m", 5400.0),
        ("250ms", 0.25),
        ("2d", 172800.0),
    ],
)
def test_parse_duration(text: str, expected: float) -> None:
    assert parse_duration(text) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["", "soon", "5 parsecs", "m15", "10y"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_format_size() -> None:
    assert format_size(512) == "512 B"
    assert format_size(40 * 1024**3) == "40.0 GiB"
