"""The measured runs of one path in a worker child: what is kept, each size's peak memory, the summaries.

A path (qvq-local's, :mod:`qvq_local.bench.qvq_path`, or a raw library's, :mod:`qvq_local.bench.raw_paths`)
measures one run at a time; :class:`Runs` drops the warm-ups, counts the runs that never reached the forced
answer, keeps each image size's peak RSS and summarises the rest (``bench.stats.summarise``) into the
``sizes`` every path's result carries.  Also the progress line a child writes to stderr.
"""

from __future__ import annotations

import sys

from qvq_local.bench.memory import PeakRss
from qvq_local.bench.stats import summarise


def log(msg: str) -> None:
    """A progress line from a worker child (stderr, where the parent's console shows it)."""
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


class Runs:
    """The measured runs of one path, per image size: the warm-ups discarded, the peak RSS of each size's
    runs, and the summaries (``bench.stats.summarise``) every result carries under ``sizes``."""

    def __init__(self) -> None:
        self.samples: dict[str, list[dict]] = {}
        self.peaks: dict[str, int] = {}
        self.not_forced = 0
        self._size: str | None = None
        self._peak: PeakRss | None = None

    def _close_peak(self) -> None:
        if self._peak is not None:
            self._peak.__exit__(None, None, None)
            self.peaks[self._size] = max(self.peaks.get(self._size, 0), self._peak.bytes)
            self._peak = None

    def run(self, path, size: str, image_path: str, cmd: dict, *, warmup: bool) -> dict:
        """One run of ``path`` at ``size``; kept unless it is a warm-up.  Returns its figures."""
        if size != self._size or self._peak is None:
            self._close_peak()
            self._size, self._peak = size, PeakRss().__enter__()
        fig = path.run(size, image_path, cmd)
        forced = fig.pop("forced", True)
        fig.pop("stop_reason", None)
        if not warmup:
            self.not_forced += 0 if forced else 1
            self.samples.setdefault(size, []).append(fig)
        return fig

    def sizes(self) -> dict:
        self._close_peak()
        return {
            size: {**summarise(samples), "peak_rss_bytes": self.peaks.get(size, 0)}
            for size, samples in self.samples.items()
            if samples
        }
