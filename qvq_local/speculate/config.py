"""What a session is asked to do about speculation (``--speculate``, ``--draft``), checked once.

* ``off``: plain decoding, one forward pass per token;
* ``ngram``: always draft by n-gram lookup over the prompt and the text so far (no second model);
* ``draft``: always draft with a small model sharing the tokenizer (``--draft MODEL``);
* ``auto`` (the default): the draft model when one is given, else n-gram lookup, used only while it
  pays on this machine: the verify cost curve (measured once per model and machine) against the live
  acceptance, off when the expected gain is below 1 (:mod:`qvq_local.speculate.policy`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qvq_local.errors import InputError
from qvq_local.speculate.policy import DEFAULT_K

MODES = ("off", "ngram", "draft", "auto")
DEFAULT_MODE = "auto"
#: The most guesses one forward pass may check (the cost curve is measured up to MAX_K + 1 tokens).
MAX_K = 16


def check_mode(value: Any, label: str = "--speculate") -> str:
    word = str(value or "").strip().lower()
    if word not in MODES:
        raise InputError(f"{label} must be one of {', '.join(MODES)}, got {value!r}")
    return word


@dataclass(frozen=True)
class SpecSettings:
    """``mode`` (:data:`MODES`), ``k`` guesses per forward pass at most, ``draft``: a loaded draft model
    of the same backend (``--draft``), or None."""

    mode: str = DEFAULT_MODE
    k: int = DEFAULT_K
    draft: Any = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", check_mode(self.mode, "the speculation mode"))
        if isinstance(self.k, bool) or not isinstance(self.k, int) or not 1 <= self.k <= MAX_K:
            raise InputError(
                f"the number of drafted tokens must be a whole number from 1 to {MAX_K}, got {self.k!r}"
            )
        if self.mode == "draft" and self.draft is None:
            raise InputError("--speculate draft needs a draft model (--draft MODEL)")

    @property
    def active(self) -> bool:
        return self.mode != "off"

    @property
    def uses_draft_model(self) -> bool:
        """Whether guesses come from the draft model (``draft``, or ``auto`` with one given)."""
        return self.draft is not None and self.mode in ("draft", "auto")


OFF = SpecSettings(mode="off")

__all__ = ["DEFAULT_MODE", "MAX_K", "MODES", "OFF", "SpecSettings", "check_mode"]
