"""Speculative decoding inside one session: draft, verify in one forward pass, roll back what fails.

The reasoning controller asks a session for one token at a time (``step(banned)``) and sometimes feeds
text (``feed``).  A session with a :class:`Speculator` answers the same calls from a buffer of verified
positions, so the controller, its budget, its forced answer, its loop stop and its language lock stay
exactly as they are:

* when the session's next token enters the cache, the speculator asks its drafter for up to ``k``
  guesses ``d1..dk`` and decodes ``[token, d1..dk]`` in ONE forward pass, keeping the logits of every
  position (``rows``).  The guesses sit in the KV cache as *pending* cells;
* the next ``step(banned)`` samples from ``rows[0]`` with the session's own sampler and the mask the
  controller passes *now*.  When the sample equals ``d1``, ``d1`` is already in the cache and ``rows[1]``
  already holds the logits after it: the step costs no forward pass at all.  When it differs, the
  pending cells are removed from the cache (rollback) and the sampled token is decoded with a new draft;
* ``feed`` and an end of turn drop the pending cells first, so the cache holds exactly what plain
  decoding would have put there.

Why this is exact.  Every token is drawn by the session's sampler from the target's logits at its
position, in order, under the mask of that step, and the sampler's history (the repetition penalty,
the seeded draw) sees exactly the tokens that were emitted -- the same calls, in the same order, as plain
decoding makes.  A guess only decides whether the logits of the next position are already computed.  So
with the same seed the tokens are identical to plain decoding, greedy or sampled, whenever the batched
forward pass gives the logits a one-token pass gives (it does bit for bit on CPU for llama.cpp's
quantised weights and for MLX; llama.cpp's float weights differ by float rounding, see README).  In the
terms of speculative sampling: a drafter here proposes deterministically (a point-mass draft
distribution q = [d]), for which the rejection rule "accept d with probability min(1, p(d)/q(d)) = p(d),
else draw from the residual max(0, p - q) normalised" is exactly "draw x from p; accept d when x == d,
else emit x".  A drafted token the mask bans can never be drawn, so it is always rejected.

The speculator is mechanism: it knows tokens, logits rows and cells, not thoughts or answers.  A backend
session provides the :class:`Target` (its forward pass, rollback and sampler); the drafter is
:mod:`~qvq_local.speculate.ngram`'s or a draft model's; the plan (how many guesses per forward pass, or
none) is :mod:`~qvq_local.speculate.policy`'s.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol


class Target(Protocol):
    """What a session gives its speculator: the target model's cache and its sampler."""

    def forward(self, tokens: list[int], *, all_rows: bool) -> list[Any]:
        """Decode ``tokens`` after the cache's end (they become cells); return the next-token logits after
        each of them (``all_rows``) or after the last only, as rows the session's ``sample`` takes."""
        ...

    def rollback(self, n: int) -> None:
        """Remove the cache's last ``n`` cells (positions included)."""
        ...

    def sample(self, row: Any, mask: Any) -> int:
        """Draw the next token from ``row`` with the session's sampler (which records it in its history)."""
        ...


class Drafter(Protocol):
    """Guesses what follows the text: the n-gram drafter or a draft model."""

    kind: str
    seconds_per_guess: float  # what one guess costs (0 for n-gram lookup)

    def reset(self, tokens: list[int]) -> None: ...

    def extend(self, tokens: list[int]) -> None: ...

    def draft(self, k: int) -> list[int]: ...


@dataclass
class SpecStats:
    """What speculation did in one session (``tokens_per_step`` is what the status line shows)."""

    tokens: int = 0  # tokens that entered the cache through the speculator (generated, not fed)
    steps: int = 0  # target forward passes those tokens took
    drafted: int = 0  # guesses decoded into the cache for checking
    accepted: int = 0  # guesses that turned out right (each one a forward pass saved)
    rolled_back: int = 0  # cells removed again
    forward_s: float = 0.0  # seconds in those forward passes (rollbacks included)
    passes: dict[int, int] = field(default_factory=dict)  # forward passes by the tokens they carried

    def projected_cost(self, ratio) -> float:
        """These forward passes in one-token steps, by a cost curve's ``ratio(n)``: what they would take
        on a machine with that curve (plain decoding takes one step per token)."""
        return sum(count * ratio(n) for n, count in self.passes.items())

    @property
    def tokens_per_step(self) -> float:
        return self.tokens / self.steps if self.steps else 0.0

    @property
    def acceptance(self) -> float:
        """The share of guesses that were right."""
        return self.accepted / self.drafted if self.drafted else 0.0

    def as_dict(self) -> dict:
        return {
            "tokens": self.tokens,
            "steps": self.steps,
            "tokens_per_step": round(self.tokens_per_step, 3),
            "drafted": self.drafted,
            "accepted": self.accepted,
            "acceptance": round(self.acceptance, 3),
            "rolled_back": self.rolled_back,
        }


class Speculator:
    """One session's speculation state: the verified rows, the pending guesses, the drafter and plan.

    ``room()`` gives the cells the session may still fill (its context minus the committed cells); a
    draft never runs past it.  The session calls :meth:`start` after prefill, then per token
    :meth:`sample` and (when the token enters the cache) :meth:`advance`, :meth:`drop` at an end of turn
    it does not decode, and :meth:`feed` for forced text.
    """

    def __init__(
        self,
        target: Target,
        drafter: Drafter,
        plan: Any,
        room: Any,
        *,
        mode: str = "",
        clock=time.perf_counter,
    ):
        self.target = target
        self.mode = mode or drafter.kind
        self.notes: list[str] = []  # one-line notices for the user (a cost curve measured, ...)
        self.drafter = drafter
        self.plan = plan
        self.room = room
        self.clock = clock
        self.rows: list[Any] = []  # rows[0]: the next token's logits; rows[i]: after pending[:i]
        self.pending: list[int] = []  # guesses in the cache, not yet confirmed
        self._drafted_now = 0  # guesses of the last forward pass
        self.stats = SpecStats()

    # -- lifecycle

    def start(self, row: Any, history: list[int]) -> None:
        """After prefill: ``row`` holds the first token's logits; ``history`` the prompt's text tokens."""
        self.rows = [row]
        self.pending = []
        self.drafter.reset(list(history))

    def sample(self, mask: Any) -> int:
        """The next token, drawn from the verified logits of its position under ``mask``."""
        return self.target.sample(self.rows[0], mask)

    def advance(self, token: int, *, draft: bool = True) -> None:
        """``token`` (just sampled) enters the cache: confirm a pending guess, or verify a new draft
        (none with ``draft=False``: an end of turn a backend decodes)."""
        self.drafter.extend([token])
        self.stats.tokens += 1
        self.plan.observe(token)
        if self.pending:
            if token == self.pending[0]:
                self.pending.pop(0)
                self.rows.pop(0)
                self.stats.accepted += 1
                if not self.pending:
                    self.plan.record(self._drafted_now, self._drafted_now, rejected=False)
                return
            self.plan.record(self._drafted_now, self._drafted_now - len(self.pending), rejected=True)
            self._rollback()
        k = min(self.plan.k(), max(0, self.room() - 1)) if draft else 0
        drafts = self.drafter.draft(k) if k > 0 else []
        if drafts:
            self.plan.draft_seconds(self.drafter.seconds_per_guess)
        if k == 0 and self.plan.wants_shadow():  # off: guess anyway (free), to learn when to turn on
            self.plan.shadow(self.drafter.draft(self.plan.k_max))
        t = self.clock()
        self.rows = self.target.forward([token, *drafts], all_rows=True)
        self.stats.forward_s += self.clock() - t
        self.pending = list(drafts)
        self._drafted_now = len(drafts)
        self.stats.steps += 1
        self.stats.drafted += len(drafts)
        size = 1 + len(drafts)
        self.stats.passes[size] = self.stats.passes.get(size, 0) + 1
        self.plan.drafted(drafts)

    def drop(self) -> None:
        """Remove the pending guesses from the cache (an end of turn that is not decoded, forced text)."""
        if self.pending:
            self.plan.record(self._drafted_now, self._drafted_now - len(self.pending), rejected=None)
            self._rollback()

    def feed(self, tokens: list[int]) -> None:
        """Forced text: drop the guesses, decode ``tokens``, keep the logits after the last one."""
        self.drop()
        self.rows = self.target.forward(list(tokens), all_rows=False)
        self.drafter.extend(list(tokens))
        self.plan.forget()

    def _rollback(self) -> None:
        n = len(self.pending)
        t = self.clock()
        self.target.rollback(n)
        self.stats.forward_s += self.clock() - t
        self.stats.rolled_back += n
        self.pending = []
        self.rows = self.rows[:1]

    @property
    def next_row(self) -> Any:
        return self.rows[0]

    def report(self) -> dict:
        """What was used and what it gave, for ``Result.settings["speculation"]``."""
        return {
            "mode": self.mode,
            "drafter": self.drafter.kind,
            **self.plan.describe(),
            **self.stats.as_dict(),
        }


__all__ = ["Drafter", "SpecStats", "Speculator", "Target"]
