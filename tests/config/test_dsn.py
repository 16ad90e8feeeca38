"""Connection URL checks (pure): what libpq and redis-py would refuse is refused first,
never quoting the value."""

from __future__ import annotations

import pytest

from stagerd.config.dsn import conninfo_pairs, database_url, redis_url, url_passwords

SECRET = "pa55-word"


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://u:pw@127.0.0.1:5432/db",
        "postgresql://u:p%20w@h1:5432,h2:5433/db?sslmode=require",
        "postgres://u@[::1]:5432/db",
        "host=127.0.0.1 port=5432 dbname=x password='a b\\'c'",
        "host=h port=5432,5433 user=u",
    ],
)
def test_good_database_urls_pass(url: str) -> None:
    assert database_url(url) == url


@pytest.mark.parametrize(
    ("url", "why"),
    [
        (f"postgresql://u:{SECRET} x@h/db", "whitespace"),
        (f"postgresql://u:{SECRET}@h:99999/db", "port"),
        (f"postgresql://u:{SECRET}@h:5x/db", "port"),
        (f"host=h password={SECRET} x", "key=value"),
        (f"host=h password='{SECRET}", "unterminated"),
        ("host=h port=http", "port"),
        ("mysql://u@h/db", "postgresql://"),
    ],
)
def test_bad_database_urls_name_the_problem_not_the_value(url: str, why: str) -> None:
    with pytest.raises(ValueError, match=why) as info:
        database_url(url)
    assert SECRET not in str(info.value)


@pytest.mark.parametrize(
    ("url", "why"),
    [
        (f"redis://:{SECRET}@h:63x79/0", "port"),
        (f"redis://:{SECRET}@h:6379/zero", "database number"),
        (f"redis://:{SECRET}@h:6379/0?socket_timeout=soon", "malformed value"),
        (f"redis://:{SECRET}@h:6379/0?sokcet_timeout=1", "unknown query option"),
    ],
)
def test_bad_redis_urls_name_the_problem_not_the_value(url: str, why: str) -> None:
    with pytest.raises(ValueError, match=why) as info:
        redis_url(url)
    assert SECRET not in str(info.value)


def test_good_redis_urls_pass() -> None:
    for url in ("redis://127.0.0.1:6379/0", "rediss://:pw@h/3?socket_timeout=2.5",
                "unix:///run/redis.sock?db=1"):  # fmt: skip
        assert redis_url(url) == url


def test_passwords_are_found_for_redaction_in_both_syntaxes() -> None:
    assert url_passwords("postgresql://u:p%20w@h/db") == ["p%20w", "p w"]
    assert url_passwords("host=h password='a b'") == ["a b"]
    assert url_passwords("host=h password=") == []
    assert url_passwords("host=h password='broken") == []
    assert conninfo_pairs("a=1  b = '2 3'") == {"a": "1", "b": "2 3"}
