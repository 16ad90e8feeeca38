"""``stagerd selfcheck``: prove that this installation can run every role, offline.

``stagerd --version`` imports almost nothing, so an artifact missing a dependency (as the
3.11 build once lacked async-timeout on Debian 12's Python 3.11.2) passed it and failed only
when ``stagerd-gpu`` first imported redis. This imports every stagerd module (each role's
imports with them), then touches what loads lazily inside the libraries: botocore's S3
model (the artifact prunes the others), psycopg's binary implementation and redis-py's
client. It needs no settings, no network and no writable directory, so Ansible runs it on
the new artifact before any service restarts.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass

import stagerd
from stagerd.log import get_logger

log = get_logger(__name__)


@dataclass(frozen=True)
class Check:
    """One thing a role loads at run time, and what went wrong loading it."""

    name: str
    error: str | None = None


def _modules() -> list[str]:
    names = [stagerd.__name__]
    for info in pkgutil.walk_packages(stagerd.__path__, prefix="stagerd."):
        # _build exists only inside the artifact; cli is the entry point being run.
        if info.name != "stagerd._build":
            names.append(info.name)
    return sorted(names)


def _s3_model() -> None:
    from botocore.session import Session

    # Building a client parses the S3 model and endpoint rules; nothing is sent. botocore's
    # session, as stagerd.s3.client builds its clients (boto3 is not needed at run time).
    Session().create_client(
        "s3",
        endpoint_url="http://127.0.0.1:9",
        aws_access_key_id="selfcheck",
        aws_secret_access_key="selfcheck",  # a placeholder, never sent
        region_name="us-east-1",
    )


def _psycopg_binary() -> None:
    import psycopg

    if psycopg.pq.__impl__ not in {"binary", "c"}:
        raise RuntimeError(f"psycopg uses its {psycopg.pq.__impl__} implementation, not binary")


def _redis_client() -> None:
    import redis

    redis.Redis.from_url("redis://127.0.0.1:9/0")


LIBRARY_CHECKS: tuple[tuple[str, Callable[[], None]], ...] = (
    ("botocore S3 model", _s3_model),
    ("psycopg binary implementation", _psycopg_binary),
    ("redis client", _redis_client),
)


def run_checks() -> list[Check]:
    """Every module import and library check, in order; never raises."""
    results = []
    for name in _modules():
        results.append(_attempt(name, functools.partial(importlib.import_module, name)))
    for name, check in LIBRARY_CHECKS:
        results.append(_attempt(name, check))
    return results


def _attempt(name: str, fn: Callable[[], object]) -> Check:
    try:
        fn()
    except Exception as exc:
        # The point is to report any failure, not crash on it; the traceback goes to the log.
        log.debug("selfcheck: %s failed", name, exc_info=True)
        lines = str(exc).strip().splitlines()
        return Check(name, f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__)
    return Check(name)
