"""stagerd: stage batch archives from a transfer host through S3 onto GPU VMs' scratch."""

from __future__ import annotations

__version__ = "0.1.0"


def build_id() -> str:
    """The build id stamped by build/shiv.sh into the artifact, or "dev" from a checkout."""
    try:
        from stagerd._build import BUILD_ID  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return "dev"
    return str(BUILD_ID)
