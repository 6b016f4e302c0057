"""The n-gram drafter: guess the next tokens by finding the text's last few tokens earlier in the text.

Reasoning text repeats itself: values are re-stated, formulas recomputed, a sentence such as "Let me
double-check that" comes back, and the question's own words are quoted.  So when the last ``n`` tokens
(``n`` = 4, then 3, then 2) occurred before, in the prompt or in what was generated so far, the tokens
that followed their most recent earlier occurrence are a cheap guess at what follows now.  No model,
no memory beyond an index of the history, and a miss costs nothing: the session then steps as usual.

A continuation that runs into the end of the history (the text is repeating itself with a period
shorter than the draft) is continued periodically, as the repetition would go on.

The drafter is deterministic: its draft distribution is a point mass, so a session verifies a drafted
token by sampling the target as usual and accepting the draft while they agree (the rejection rule of
speculative sampling for a point mass: :mod:`qvq_local.speculate.rejection`).
"""

from __future__ import annotations

#: The n-gram lengths tried, longest first (a longer match is a better guess).
DEFAULT_ORDERS = (4, 3, 2)


class NgramDrafter:
    """Drafts from the most recent earlier occurrence of the history's last 4-, 3- or 2-gram.

    :meth:`extend` appends tokens to the history (prompt, sampled, fed); :meth:`draft` proposes up to
    ``k`` tokens to follow it.  The index is updated incrementally: each call costs O(tokens added).
    """

    kind = "ngram"
    seconds_per_guess = 0.0  # a dictionary look-up

    def __init__(self, orders: tuple[int, ...] = DEFAULT_ORDERS):
        orders = tuple(sorted({int(n) for n in orders}, reverse=True))
        if not orders or orders[-1] < 1:
            raise ValueError(f"n-gram orders must be positive, got {orders!r}")
        self.orders = orders
        self.history: list[int] = []
        # order -> {gram: index of the token that followed its most recent occurrence}
        self._index: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in orders}
        self._indexed = 0  # grams ending before this history index are in the index

    def reset(self, tokens: list[int] | tuple[int, ...] = ()) -> None:
        """Start over with ``tokens`` as the whole history."""
        self.history = []
        self._index = {n: {} for n in self.orders}
        self._indexed = 0
        self.extend(tokens)

    def extend(self, tokens) -> None:
        """Append ``tokens`` to the history."""
        self.history.extend(int(t) for t in tokens)
        self._update_index()

    def truncate(self, length: int) -> None:
        """Cut the history back to its first ``length`` tokens (the index is rebuilt)."""
        if length < len(self.history):
            self.reset(self.history[:length])

    def _update_index(self) -> None:
        # A gram ending at index j (history[j-n+1 .. j]) is indexed once its follower history[j+1]
        # exists, so the history's own last gram is never found as its own earlier occurrence.
        h = self.history
        for j in range(max(self._indexed, 0), len(h) - 1):
            for n in self.orders:
                if j + 1 >= n:
                    self._index[n][tuple(h[j + 1 - n : j + 1])] = j + 1
        self._indexed = max(self._indexed, len(h) - 1)

    def match(self) -> tuple[int, int] | None:
        """``(order, start)`` of the guess: the longest order whose last gram occurred before, and the
        history index of the token that followed it then; None when no order matches."""
        h = self.history
        for n in self.orders:
            if len(h) < n:
                continue
            start = self._index[n].get(tuple(h[len(h) - n :]))
            if start is not None:
                return n, start
        return None

    def draft(self, k: int) -> list[int]:
        """Up to ``k`` tokens guessed to follow the history ([] when nothing matches or ``k`` < 1)."""
        if k < 1:
            return []
        found = self.match()
        if found is None:
            return []
        _, start = found
        h = self.history
        period = len(h) - start  # >= 1: the continuation repeats with this period past the end
        return [h[start + (i % period)] for i in range(k)]


__all__ = ["DEFAULT_ORDERS", "NgramDrafter"]
