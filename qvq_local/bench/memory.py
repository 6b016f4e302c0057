"""Peak resident memory of one phase of the benchmark (loading, encoding, converting).

Why a module of its own: the process-wide high-water mark (``ru_maxrss``) only ever grows, so it cannot
tell the peak of a later, smaller phase.  On Linux, writing ``5`` to ``/proc/self/clear_refs`` resets
``VmHWM`` to the current RSS, which makes an exact per-phase peak.  Where that is not allowed (macOS,
hardened kernels) a background thread samples the RSS every few milliseconds instead; it can miss a
short spike, which the result says (``method == "sampled"``).
"""

from __future__ import annotations

import os
import resource
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from typing_extensions import Self

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(field: str) -> int | None:
    """A ``kB`` field of /proc/self/status (``VmRSS``, ``VmHWM``), or None off Linux."""
    try:
        with open(_STATUS) as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def current_rss() -> int:
    """Resident set size of this process in bytes."""
    kib = _status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except Exception:  # noqa: BLE001 - psutil missing or not permitted: fall back to the lifetime peak
        return lifetime_peak_rss()


def lifetime_peak_rss() -> int:
    """The process's peak RSS since it started, in bytes.

    On Linux this is ``VmHWM`` folded with every value :class:`PeakRss` saw before resetting it, not
    ``ru_maxrss``: a child process inherits its parent's RSS at fork into ``ru_maxrss``, which would
    charge the parent's memory to the benchmark worker.  Elsewhere ``ru_maxrss`` (KiB on Linux, bytes
    on macOS).
    """
    kib = _status_kib("VmHWM")
    if kib is not None:
        return max(_folded_peak, kib * 1024)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


_folded_peak = 0  # the largest VmHWM seen before any reset, so lifetime_peak_rss survives resets


def _reset_hwm() -> bool:
    """Reset the kernel's high-water mark to the current RSS; False where that is not allowed."""
    global _folded_peak
    kib = _status_kib("VmHWM")
    if kib is not None:
        _folded_peak = max(_folded_peak, kib * 1024)
    try:
        with open(_CLEAR_REFS, "w") as fh:
            fh.write("5")
        return _status_kib("VmHWM") is not None
    except OSError:
        return False


class PeakRss:
    """Context manager measuring the peak RSS (bytes) between enter and exit.

    >>> with PeakRss() as peak:
    ...     work()
    >>> peak.bytes, peak.method
    """

    def __init__(self, interval_s: float = 0.005):
        self.interval_s = interval_s
        self.bytes = 0
        self.method = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sampled = 0

    def __enter__(self) -> Self:
        if _reset_hwm():
            self.method = "VmHWM"
        else:
            self.method = "sampled"
            self._sampled = current_rss()
            self._thread = threading.Thread(target=self._sample, name="qvq-bench-rss", daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._sampled = max(self._sampled, current_rss())
            time.sleep(self.interval_s)

    def __exit__(self, *exc) -> None:
        if self.method == "VmHWM":
            global _folded_peak
            kib = _status_kib("VmHWM") or 0
            self.bytes = kib * 1024
            _folded_peak = max(_folded_peak, self.bytes)
        else:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            self.bytes = max(self._sampled, current_rss())


def phase_peak_supported() -> str:
    """Which method :class:`PeakRss` will use here: ``"VmHWM"`` (exact) or ``"sampled"``."""
    return "VmHWM" if os.path.exists(_CLEAR_REFS) and _reset_hwm() else "sampled"
