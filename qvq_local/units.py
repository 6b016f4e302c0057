"""Byte counts for people: one convention for files, one for memory, each written once.

Files and downloads are counted as disks and download tools count them, in decimal units (``47.4 GB``:
what ``ls -lh --si``, the hub's web page and a disk's label say).  Memory is counted as the operating
system and the GPU drivers count it, in binary units (``23.4 GiB``: what ``free -h`` and ``nvidia-smi``
say).  A figure always carries its unit's own name, so a reader never has to guess which one it is.
"""

from __future__ import annotations

_DECIMAL = ("B", "KB", "MB", "GB", "TB")
_BINARY = ("B", "KiB", "MiB", "GiB", "TiB")


def _scaled(n: float, step: int, units: tuple[str, ...]) -> str:
    value = float(n)
    for unit in units:
        if abs(value) < step or unit == units[-1]:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= step
    raise AssertionError("unreachable")  # pragma: no cover


def file_size(n: float | None) -> str:
    """A file's or a download's size in decimal units (``4.2 MB``, ``47.4 GB``); ``?`` when unknown."""
    return "?" if n is None else _scaled(n, 1000, _DECIMAL)


def memory_size(n: float | None) -> str:
    """An amount of memory in binary units (``512.0 MiB``, ``23.4 GiB``); ``?`` when unknown."""
    return "?" if n is None else _scaled(n, 1024, _BINARY)


__all__ = ["file_size", "memory_size"]
