"""Building a session's speculator from its settings: one place for both backends.

A backend session calls :func:`start_speculation` at the end of its prefill with its own
:class:`~qvq_local.speculate.engine.Target` and, for ``--draft``, a drafter over the draft model's
session; everything else (the plan, the cost curve, the notes a user sees) is decided here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from qvq_local.speculate import costs
from qvq_local.speculate.config import SpecSettings
from qvq_local.speculate.engine import Speculator
from qvq_local.speculate.ngram import NgramDrafter
from qvq_local.speculate.policy import AutoPlan, FixedPlan


def off_note(family: Any) -> str | None:
    """Why speculation cannot run on ``family``'s models (None when it can)."""
    if family.recurrent_state:
        return (
            f"speculation is off: {family.name} has recurrent (linear-attention) layers whose state cannot"
            " be cut back to drop rejected guesses"
        )
    return None


def start_speculation(
    settings: SpecSettings,
    target: Any,
    *,
    row: Any,
    history: list[int],
    room: Callable[[], int],
    identity: dict,
    probe_token: int,
    drafter: Any = None,
) -> Speculator:
    """The speculator for a session just prefilled: ``row`` the first token's logits, ``history`` the
    prompt's text tokens, ``room()`` the cells still free, ``identity`` what the model's cost curve is
    keyed by, ``probe_token`` a token to time forward passes with, ``drafter`` the draft model's (None:
    n-gram lookup).  ``auto`` measures the cost curve now when none is stored for this model and
    machine (a few forward passes, rolled back)."""
    drafter = drafter if drafter is not None else NgramDrafter()
    notes: list[str] = []
    if settings.mode == "auto":
        curve, measured = costs.curve_for(target, identity, probe_token, settings.k + 1)
        if measured:
            notes.append(
                f"measured the verify cost curve for this model and machine (kept in {costs.cache_file()})"
            )
        # a draft model's cost per guess is learnt from its own timing as it drafts
        plan: Any = AutoPlan(curve, settings.k, free_drafts=drafter.kind == "ngram")
    else:
        plan = FixedPlan(settings.k)
    spec = Speculator(target, drafter, plan, room, mode=settings.mode)
    spec.notes.extend(notes)
    spec.start(row, history)
    return spec


def session_report(
    speculator: Speculator | None, settings: SpecSettings | None, note: str | None
) -> dict | None:
    """What speculation did in a session (``session.speculation_report()``): the speculator's figures and
    notes; ``{"mode": "off", ...}`` with the reason where the settings asked for it and it could not run;
    None where it was not asked for."""
    if speculator is not None:
        return {**speculator.report(), "notes": list(speculator.notes)}
    if settings is not None and settings.active:
        return {"mode": "off", "asked": settings.mode, "notes": [note]}
    return None


__all__ = ["off_note", "session_report", "start_speculation"]
