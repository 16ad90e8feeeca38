"""Everything stagerd needs of S3, behind one edge.

``from stagerd.s3 import get_s3_client`` is the seed's API and stays; the rest of stagerd
reaches S3 through the store in :mod:`stagerd.s3.store`.
"""

from stagerd.s3.client import get_s3_client

__all__ = ["get_s3_client"]
