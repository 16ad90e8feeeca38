"""The S3 client factory, safe for S3-compatible servers (OpenStack Swift's s3api first).

``get_s3_client()`` keeps the seed's name and zero-argument call (it reads the environment),
and accepts :class:`Settings` for everything that is ours. boto3 is imported lazily so
``stagerd --help`` does not pay for it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

from stagerd.config.settings import S3Settings, Settings

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client


def get_s3_client(settings: Settings | S3Settings | None = None) -> S3Client:
    """S3 client configured for OpenStack Swift/S3-compatible endpoints.

    Checksums are computed only when an operation requires them: boto3 >= 1.36 otherwise
    sends CRC32 trailers with aws-chunked bodies that older Swift s3api releases reject.
    Raises ConfigError if an S3 variable is missing.
    """
    import boto3
    from botocore.config import Config

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
    )
    client: S3Client = boto3.client(
        "s3",
        endpoint_url=s3.endpoint,
        aws_access_key_id=s3.access_key,
        aws_secret_access_key=s3.secret_key,
        region_name=s3.region,
        verify=s3.ca_bundle if s3.ca_bundle else None,
        config=config,
    )
    return client
