"""The private, restartable Redis and PostgreSQL servers the restart tests stand on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.restartable import PostgresServer, RedisServer


def test_redis_keeps_acknowledged_writes_across_restart_and_crash(
    restartable_redis: RedisServer,
) -> None:
    import redis

    client = redis.Redis.from_url(restartable_redis.url)
    client.rpush("q", b"a", b"b")
    port = restartable_redis.port
    restartable_redis.restart()
    assert restartable_redis.port == port
    # The pooled connection died with the server; the client reconnects on its own.
    assert client.lrange("q", 0, -1) == [b"a", b"b"]
    client.rpush("q", b"c")
    restartable_redis.kill()
    assert not restartable_redis.running
    with pytest.raises(redis.exceptions.ConnectionError):
        redis.Redis.from_url(restartable_redis.url, socket_connect_timeout=1).ping()
    restartable_redis.start()
    assert restartable_redis.running
    assert redis.Redis.from_url(restartable_redis.url).lrange("q", 0, -1) == [b"a", b"b", b"c"]
    client.close()


def test_redis_without_durability_restarts_empty(tmp_path: Path) -> None:
    import redis

    with RedisServer(tmp_path / "r", durable=False) as server:
        redis.Redis.from_url(server.url).set("k", "v")
        port = server.port
        server.restart(down_for=0.1)
        assert server.port == port
        assert redis.Redis.from_url(server.url).get("k") is None


def _rows(url: str) -> list[Any]:
    import psycopg

    with psycopg.connect(url, connect_timeout=5) as conn:
        return conn.execute("SELECT v FROM t ORDER BY v").fetchall()


def test_postgres_keeps_commits_across_clean_and_crash_restarts(
    restartable_postgres: PostgresServer,
) -> None:
    import psycopg

    url = restartable_postgres.url
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (v int)")
        conn.execute("INSERT INTO t VALUES (1)")
    held = psycopg.connect(url, autocommit=True)
    restartable_postgres.restart()
    with pytest.raises(psycopg.OperationalError):
        held.execute("SELECT 1")  # a connection across the restart is gone...
    held.close()
    with psycopg.connect(url, autocommit=True) as conn:  # ...a new one works
        conn.execute("INSERT INTO t VALUES (2)")
    restartable_postgres.restart(mode="immediate")  # crash-like: recovery replays the WAL
    assert _rows(url) == [(1,), (2,)]
    restartable_postgres.stop()
    assert not restartable_postgres.running
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(url, connect_timeout=2)
    restartable_postgres.start()
    assert _rows(url) == [(1,), (2,)]
