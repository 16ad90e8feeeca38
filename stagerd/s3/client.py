"""The S3 client factory, safe for S3-compatible servers (OpenStack Swift's s3api first).

``get_s3_client()`` keeps the seed's name and zero-argument call (it reads the environment),
and accepts :class:`Settings` for everything that is ours. botocore is imported lazily so
``stagerd --help`` does not pay for it.

The client is built on a botocore session rather than through ``boto3.client``: importing
boto3, and its hook that adds s3transfer's ``upload_file`` family to every S3 client, pulls in
s3transfer, ~0.05-0.1 s of every one-shot command's start-up on this class of machine (the
10,000-file bench rows), for methods stagerd itself never calls (``stagerd.s3.multipart`` and
``stagerd.s3.fetch`` do its transfers). The seed's callers do call them
(``client.upload_file``, ``client.download_file``), so the client still has all five, as thin
methods that import boto3's on first use. The botocore calls, retries and errors are the same.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from stagerd import __version__
from stagerd.config.settings import S3Settings, Settings

if TYPE_CHECKING:
    from botocore.loaders import Loader
    from mypy_boto3_s3 import S3Client


# What boto3.s3.inject adds to S3 clients (boto3 >= 1.36): the seed uses the first two.
TRANSFER_METHODS = ("upload_file", "download_file", "copy", "upload_fileobj", "download_fileobj")


def _deferred(name: str) -> Callable[..., Any]:
    def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        from boto3.s3 import inject

        return getattr(inject, name)(self, *args, **kwargs)

    method.__name__ = method.__qualname__ = name
    method.__doc__ = f"boto3's S3 client ``{name}`` (s3transfer), imported on first call."
    return method


def _add_transfer_methods(**kwargs: Any) -> None:
    """The ``creating-client-class.s3`` hook: boto3's transfer methods, imported lazily."""
    class_attributes: dict[str, Any] = kwargs["class_attributes"]
    for name in TRANSFER_METHODS:
        class_attributes.setdefault(name, _deferred(name))


@functools.lru_cache(maxsize=1)
def _loader() -> Loader:
    """One model loader per process: each client after the first reuses the parsed S3 model
    and endpoint rules instead of decoding their JSON again (its caches are per instance)."""
    from botocore.loaders import create_loader

    return create_loader()


def get_s3_client(settings: Settings | S3Settings | None = None) -> S3Client:
    """S3 client configured for OpenStack Swift/S3-compatible endpoints.

    Checksums are computed only when an operation requires them: boto3 >= 1.36 otherwise
    sends CRC32 trailers with aws-chunked bodies that older Swift s3api releases reject.
    Raises ConfigError if an S3 variable is missing.
    """
    from botocore.config import Config
    from botocore.session import Session

    if settings is None:
        settings = Settings.from_env()
    s3 = settings.require_s3() if isinstance(settings, Settings) else settings
    # Settings validated checksum_mode and retry_mode against botocore's literals.
    checksum = cast(Any, s3.checksum_mode)
    config = Config(
        signature_version="s3v4",
        s3={"addressing_style": "path"},
        request_checksum_calculation=checksum,
        response_checksum_validation=checksum,
        retries=cast(Any, {"mode": s3.retry_mode, "max_attempts": s3.max_attempts}),
        connect_timeout=s3.connect_timeout,
        read_timeout=s3.read_timeout,
        max_pool_connections=s3.max_pool_connections,
        tcp_keepalive=True,
        user_agent_extra=f"stagerd/{__version__}",
    )
    session = Session()
    session.register_component("data_loader", _loader())
    session.register("creating-client-class.s3", _add_transfer_methods)
    client = session.create_client(
        "s3",
        endpoint_url=s3.endpoint,
        aws_access_key_id=s3.access_key,
        aws_secret_access_key=s3.secret_key,
        region_name=s3.region,
        verify=s3.ca_bundle if s3.ca_bundle else None,
        config=config,
    )
    return cast("S3Client", client)
