"""qvq-local: run QVQ visual reasoning models locally, quantised, and watch them think.

``import qvq_local`` stays light: the API (and with it any backend) is imported on first use of
:func:`load`, :func:`ask` or :class:`Model`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:  # pragma: no cover
    from qvq_local.api import ask, load
    from qvq_local.model import Model

__all__ = ["Model", "__version__", "ask", "load"]

#: What ``qvq_local.NAME`` gives, by the module it lives in (imported on first use).
_LAZY = {
    "load": "api",
    "ask": "api",
    "Model": "model",
    "drive": "driver",
    "prepare_images": "images",
    "PreparedImage": "images",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(f"qvq_local.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'qvq_local' has no attribute {name!r}")
