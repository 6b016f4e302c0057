"""qvq-local: run QVQ visual reasoning models locally, quantised, and watch them think.

``import qvq_local`` stays light: the API (and with it any backend) is imported on first use of
:func:`load`, :func:`ask` or :class:`Model`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:  # pragma: no cover
    from qvq_local.api import Model, ask, load

__all__ = ["Model", "__version__", "ask", "load"]


def __getattr__(name: str) -> Any:
    if name in ("load", "ask", "Model", "drive", "prepare_images", "PreparedImage"):
        from qvq_local import api

        return getattr(api, name)
    raise AttributeError(f"module 'qvq_local' has no attribute {name!r}")
