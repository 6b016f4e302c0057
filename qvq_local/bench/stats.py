"""Summaries of repeated measurements: the median and its spread, and qvq/raw ratios of paired runs.

Why a module of its own: the worker summarises its runs, the harness asks for the ratios of the paired
qvq and raw runs (:func:`qvq_raw_ratios`), the report prints and plots the spread; all three read the same
shape, built here and nowhere else.

A summary (:func:`summarise`) of ``runs`` figure dictionaries is::

    {"decode_tok_s": 11.8, ...,                        # the median of every numeric field
     "samples": {"decode_tok_s": [11.8, 5.3, 12.0]},   # every run's value, in the order they ran
     "spread": {"decode_tok_s": {"min": 5.3, "max": 12.0, "q1": 8.55, "q3": 11.9, "n": 3}}}

A new figure needs no code here: any numeric field a run reports gets its median and spread.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence


def _numeric(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def spread(values: Iterable[float]) -> dict:
    """``{"min", "max", "q1", "q3", "n"}`` of the values (quartiles inclusive of the ends; with one value
    all four are that value)."""
    vals = sorted(float(v) for v in values)
    if not vals:
        raise ValueError("spread of no values")
    if len(vals) == 1:
        q1 = q3 = vals[0]
    else:
        q1, _, q3 = statistics.quantiles(vals, n=4, method="inclusive")
    return {"min": vals[0], "max": vals[-1], "q1": q1, "q3": q3, "n": len(vals)}


def summarise(samples: Sequence[dict]) -> dict:
    """The median, every value and the spread of each numeric field across runs (see the module doc).

    Fields missing from some runs are summarised over the runs that have them; integer fields keep an
    integer median (rounded).
    """
    if not samples:
        raise ValueError("no samples to summarise")
    keys: list[str] = []
    for s in samples:
        keys.extend(k for k, v in s.items() if _numeric(v) and k not in keys)
    out: dict = {}
    values: dict[str, list] = {}
    for k in keys:
        vals = [s[k] for s in samples if _numeric(s.get(k))]
        values[k] = vals
        med = statistics.median(vals)
        out[k] = round(med) if all(isinstance(v, int) for v in vals) else med
    out["samples"] = values
    out["spread"] = {k: spread(v) for k, v in values.items()}
    return out


def paired_ratios(qvq: Sequence[dict], raw: Sequence[dict], keys: Iterable[str]) -> dict:
    """qvq/raw of each pair of runs made one after the other, summarised like :func:`summarise`.

    Run ``i`` of qvq and run ``i`` of raw ran next to each other, so a neighbour's load that slows one
    pair slows both sides of it; the median of the per-pair ratios is the headline, their spread shows how
    much the machine moved.  A pair where either side is missing or zero is left out.
    """
    pairs = []
    for q, r in zip(qvq, raw):
        pair = {}
        for k in keys:
            a, b = q.get(k), r.get(k)
            if _numeric(a) and _numeric(b) and b:
                pair[k] = float(a) / float(b)
        pairs.append(pair)
    pairs = [p for p in pairs if p]
    return summarise(pairs) if pairs else {}


def runs_of(summary: dict) -> list[dict]:
    """The per-run figure dictionaries back from a summary's ``samples`` (fields every run has)."""
    values = summary.get("samples") or {}
    n = max((len(v) for v in values.values()), default=0)
    return [{k: v[i] for k, v in values.items() if len(v) == n} for i in range(n)]


def median_and_spread(fig: dict, key: str, spec: str = ".2f", missing: str = "-", sep: str = " ") -> str:
    """``"11.80 (5.30-12.00)"``: the median and the min-max of ``key`` in a summary (``sep`` between them;
    a table passes a newline to keep its columns narrow); the median alone when only one run was measured,
    the summary carries no spread, or every run gave the same figure."""
    value = fig.get(key)
    if not _numeric(value):
        return missing

    def show(v) -> str:
        return format(round(v), spec) if spec.endswith("d") else format(v, spec)

    text = show(value)
    sp = (fig.get("spread") or {}).get(key)
    if sp and sp.get("n", 0) > 1 and show(sp["min"]) != show(sp["max"]):
        text += f"{sep}({show(sp['min'])}-{show(sp['max'])})"
    return text


#: The figures compared between qvq-local and the raw library, run by run.
RATIO_KEYS = ("decode_tok_s", "first_token_s")


def qvq_raw_ratios(qvq: dict, raw: dict) -> dict:
    """qvq/raw per image size and at the smallest size (the headline figures).

    Each figure is the median of the per-run ratios (qvq run i / raw run i; interleaved, they ran next to
    each other), with their spread under ``spread`` and the per-run values under ``samples``.
    """
    if not qvq.get("ok"):
        return {"reason": "qvq path failed"}
    if not raw.get("ok"):
        return {"reason": f"raw path not run: {raw.get('reason', '?')}"}
    per_size = {}
    for size, q in qvq["sizes"].items():
        r = raw["sizes"].get(size)
        if not r:
            continue
        summary = paired_ratios(runs_of(q), runs_of(r), RATIO_KEYS)
        per_size[size] = {k: summary.get(k) for k in RATIO_KEYS}
        per_size[size]["spread"] = summary.get("spread", {})
        per_size[size]["samples"] = summary.get("samples", {})
    if not per_size:
        return {"reason": "no image size measured on both paths"}
    first = per_size[min(per_size, key=int)]
    return {
        **first,
        "at_image_size": int(min(per_size, key=int)),
        "per_size": per_size,
        "meaning": "decode_tok_s: qvq/raw, higher is better (>= 1.0: no overhead); "
        "first_token_s: qvq/raw seconds, lower is better (<= 1.0: no overhead); "
        "medians of the per-run ratios, spread = their min/max/quartiles",
    }


__all__ = [
    "RATIO_KEYS",
    "median_and_spread",
    "paired_ratios",
    "qvq_raw_ratios",
    "runs_of",
    "spread",
    "summarise",
]
