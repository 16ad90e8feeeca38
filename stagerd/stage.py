"""The seed's GPU-side API, at the path the seed names (``from stagerd.stage import ...``).

The implementation lives in :mod:`stagerd.gpu.stage`; this module exists only so that code
written against the seed keeps importing from where the seed said.
"""

from stagerd.gpu.stage import cleanup_scratch, download_archive

__all__ = ["cleanup_scratch", "download_archive"]
