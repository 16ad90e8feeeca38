"""The transfer host's role: upload an archive, record and enqueue its job; watch an inbox.

``from stagerd.transfer import upload_archive, get_s3_client`` is the seed's API and stays.
"""

from stagerd.transfer.upload import (
    TransferReport,
    TransferRequest,
    get_s3_client,
    transfer,
    upload_archive,
)

__all__ = ["TransferReport", "TransferRequest", "get_s3_client", "transfer", "upload_archive"]
