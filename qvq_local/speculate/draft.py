"""The draft-model drafter: a small model sharing the target's tokenizer guesses the next tokens.

It keeps its own KV cache (a :class:`~qvq_local.speculate.engine.Target` of the draft model's session)
in step with the text lazily: when asked for a draft it cuts its cache back to what it has in common
with the text (its own guesses the target rejected), decodes what it has not seen (the target's
correction, fed text), then guesses greedily, one forward pass of its own per guess.

Its guesses are its greedy choice (the repetition penalty applied over the same window the target's
sampler uses, so a draft identical to the target guesses exactly what a greedy target draws): a point
mass, verified by the target's own draw (see :mod:`qvq_local.speculate.engine`).  A text-only draft sees
the prompt's text tokens; a vision draft was prefilled with the prompt and its images by its session.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np


def greedy_pick(row: Any, history: list[int], penalty: float, window: int | None) -> int:
    """The greedy token of ``row`` (a logits vector) after the repetition penalty over ``history``'s last
    ``window`` ids (None: all of them)."""
    logits = np.array(row, dtype=np.float32, copy=True)
    if penalty != 1.0 and history:
        seen = np.fromiter(set(history[-window:] if window else history), dtype=np.int64)
        seen = seen[seen < logits.shape[-1]]
        picked = logits[seen]
        logits[seen] = np.where(picked < 0, picked * penalty, picked / penalty)
    return int(np.argmax(logits))


class ModelDrafter:
    """Guesses from a draft model's greedy choices (see the module docstring).

    ``target``: the draft model's cache and forward pass; ``pick(row, history)``: its greedy choice;
    ``start_row``: the logits after its prefill when its session was prefilled with the prompt (a vision
    draft), None to decode the prompt's text tokens into it at :meth:`reset` (a text-only draft);
    ``stop(token)``: whether a token ends the turn (a draft ends after one).
    """

    kind = "draft"

    def __init__(
        self,
        target: Any,
        pick: Callable[[Any, list[int]], int],
        *,
        start_row: Any = None,
        stop: Callable[[int], bool] = lambda token: False,
        clock: Callable[[], float] = time.perf_counter,
    ):
        self.target = target
        self.pick = pick
        self.prefilled = start_row is not None
        self.stop = stop
        self.clock = clock
        self.history: list[int] = []  # the whole text: prompt text tokens, then what followed
        self._base = 0  # history[:_base] is the prompt the draft's cache starts with
        self._cached: list[int] = []  # tokens in the draft's cache after the prompt
        self._rows: dict[int, Any] = {0: start_row}  # len(_cached) -> the logits after it
        self.seconds = 0.0  # time spent drafting (its own forward passes)
        self.guesses = 0

    def reset(self, tokens: list[int]) -> None:
        self.history = list(tokens)
        self._base = len(self.history)
        if self._cached:
            self.target.rollback(len(self._cached))
        self._cached = []
        if not self.prefilled:
            row = self.target.forward(list(tokens), all_rows=False)[0] if tokens else None
            self._rows = {0: row}

    def extend(self, tokens: list[int]) -> None:
        self.history.extend(int(t) for t in tokens)

    @property
    def seconds_per_guess(self) -> float:
        return self.seconds / self.guesses if self.guesses else 0.0

    def _sync(self) -> Any:
        """Bring the draft's cache to the text; return the logits after it."""
        wanted = self.history[self._base :]
        common = 0
        limit = min(len(self._cached), len(wanted))
        while common < limit and self._cached[common] == wanted[common]:
            common += 1
        if common < len(self._cached):
            self.target.rollback(len(self._cached) - common)
            self._cached = self._cached[:common]
            self._rows = {n: r for n, r in self._rows.items() if n <= common}
        missing = wanted[common:]
        if missing:
            row = self.target.forward(missing, all_rows=False)[0]
            self._cached.extend(missing)
            self._rows = {len(self._cached): row}
        row = self._rows.get(len(self._cached))
        if row is None:
            raise RuntimeError("the draft model has no logits for the text's end")
        return row

    def draft(self, k: int) -> list[int]:
        if k < 1:
            return []
        t = self.clock()
        row = self._sync()
        out: list[int] = []
        for i in range(k):
            guess = self.pick(row, self.history + out)
            out.append(guess)
            if i == k - 1 or self.stop(guess):
                break
            row = self.target.forward([guess], all_rows=False)[0]
            self._cached.append(guess)
            self._rows[len(self._cached)] = row
        self.seconds += self.clock() - t
        self.guesses += len(out)
        return out


__all__ = ["ModelDrafter", "greedy_pick"]
