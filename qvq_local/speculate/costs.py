"""The verify cost curve: how long a forward pass over n tokens takes against one over a single token.

Measured once per model and machine (``--speculate auto`` on first use, or ``qvq bench``) and kept in
``QVQ_HOME/speculation/verify-costs.json``, keyed by what the figure depends on: the backend, the model
file (path, size, modification time), where it runs (GPU layers, threads) and the machine's name.  A
measurement decodes ``n`` copies of one token after the session's cache, times it, and removes the
cells again (the session's state is unchanged).
"""

from __future__ import annotations

import hashlib
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qvq_local.speculate.policy import CostCurve

FILE_NAME = "verify-costs.json"
#: Timed runs per size (the median is kept), taken in turn over the sizes after one warm-up pass of each.
REPEATS = 5
#: How curves are measured (part of the cache key: a curve measured an older way is measured again)
METHOD = 2


def cache_file() -> Path:
    from qvq_local.config import qvq_home

    return qvq_home() / "speculation" / FILE_NAME


def cache_key(identity: dict) -> str:
    """A stable key for what a cost curve depends on (``identity`` plus this machine's name)."""
    data = json.dumps({**identity, "host": platform.node(), "method": METHOD}, sort_keys=True, default=str)
    return hashlib.sha256(data.encode("utf-8")).hexdigest()[:24]


def measure(
    target: Any,
    token: int,
    sizes: int,
    *,
    repeats: int = REPEATS,
    clock: Callable[[], float] = time.perf_counter,
) -> CostCurve:
    """Time forward passes over 1..``sizes`` copies of ``token`` after ``target``'s cache (a
    :class:`~qvq_local.speculate.engine.Target`), rolling each back: the median of ``repeats`` runs per size.

    A stall must not pass for a gain: each size is warmed up once (a library may build its graph for a
    new batch size on first use), the runs go round the sizes in turn (a slow spell falls on all of
    them), and a pass is never taken as costing more than a longer one (a 1-token pass slower than a
    6-token pass is a stall, not a cost: the curve is made non-decreasing from its long end), so
    ``auto`` can only be fooled towards plain decoding."""
    if sizes < 1:
        raise ValueError("a cost curve needs at least one size")
    for n in range(sizes, 0, -1):  # warm-up, each size once
        target.forward([token] * n, all_rows=True)
        target.rollback(n)
    runs: list[list[float]] = [[] for _ in range(sizes)]
    for _ in range(repeats):
        for n in range(1, sizes + 1):
            t = clock()
            target.forward([token] * n, all_rows=True)
            runs[n - 1].append(clock() - t)
            target.rollback(n)
    seconds = [max(statistics.median(r), 1e-9) for r in runs]
    for i in range(sizes - 2, -1, -1):
        seconds[i] = min(seconds[i], seconds[i + 1])
    return CostCurve(tuple(seconds))


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # absent or unreadable: measured again and rewritten
    entries = data.get("entries") if isinstance(data, dict) else None
    return entries if isinstance(entries, dict) else {}


def cached(identity: dict, sizes: int, path: Path | None = None) -> CostCurve | None:
    """The stored curve for ``identity`` when it covers ``sizes`` token counts, else None."""
    entry = _read(path or cache_file()).get(cache_key(identity))
    if not isinstance(entry, dict):
        return None
    seconds = entry.get("seconds")
    if not isinstance(seconds, list) or len(seconds) < sizes:
        return None
    try:
        return CostCurve(tuple(float(s) for s in seconds))
    except (TypeError, ValueError):
        return None


def store(identity: dict, curve: CostCurve, path: Path | None = None) -> Path:
    """Keep ``curve`` for ``identity`` (written atomically; other entries kept)."""
    from qvq_local.atomic import write_text

    path = path or cache_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    entries = _read(path)
    entries[cache_key(identity)] = {
        "identity": {k: str(v) for k, v in identity.items()},
        "host": platform.node(),
        "seconds": list(curve.seconds),
        "measured": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    write_text(path, json.dumps({"version": 1, "entries": entries}, indent=1) + "\n")
    return path


def curve_for(target: Any, identity: dict, token: int, sizes: int) -> tuple[CostCurve, bool]:
    """The cost curve for ``identity``: the stored one, or measured now on ``target`` and stored.
    Returns ``(curve, measured_now)``."""
    found = cached(identity, sizes)
    if found is not None:
        return found, False
    curve = measure(target, token, sizes)
    try:
        store(identity, curve)
    except OSError:
        pass  # a read-only QVQ_HOME: measured again next time
    return curve, True


__all__ = ["FILE_NAME", "cache_file", "cache_key", "cached", "curve_for", "measure", "store"]
