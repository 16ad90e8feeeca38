"""The fixtures give real, isolated services (the ground every other test stands on)."""

from __future__ import annotations

import psycopg


def test_redis_is_real(redis_client, queue_name: str) -> None:
    redis_client.rpush(queue_name, b"x")
    assert redis_client.lpop(queue_name) == b"x"
    assert redis_client.info("server")["redis_version"]


def test_postgres_schema_is_isolated(database_url: str) -> None:
    with psycopg.connect(database_url) as conn:
        conn.execute("CREATE TABLE probe (id int)")
        schema = conn.execute("SELECT current_schema()").fetchone()
        assert schema is not None and schema[0].startswith("t_")


def test_bucket_is_fresh(s3_client, s3_bucket: str) -> None:
    assert s3_client.list_objects_v2(Bucket=s3_bucket).get("KeyCount", 0) == 0
