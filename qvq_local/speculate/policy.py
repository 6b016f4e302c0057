"""How many guesses to check per forward pass, or none: speculation pays or it is off.

The gain of one forward pass that checks ``k`` guesses, each right with probability ``a`` once the ones
before it were (the usual geometric model of speculative decoding):

* it yields ``E(k) = 1 + a + ... + a^k = (1 - a^(k+1)) / (1 - a)`` tokens (the target's own token, then
  the guesses up to the first wrong one);
* it costs ``c(k+1)`` one-token steps, where ``c(n)`` is the :class:`CostCurve` (the time of a forward
  pass over ``n`` tokens divided by that over one), plus ``k * d`` for a draft model that costs ``d``
  one-token target steps per guess (0 for n-gram lookup);
* ``gain(k) = E(k) / (c(k+1) + k d)`` is the speed relative to plain decoding.  ``gain(0) = 1``.

A bandwidth-bound machine (a GPU, a Mac) reads the weights once for ``n`` tokens, so ``c(6)`` is close
to 1 and even ``a = 0.3`` pays; a compute-bound CPU pays ~``n`` times for ``n`` tokens and gains nothing.
:class:`FixedPlan` always drafts ``k`` (``--speculate ngram|draft``); :class:`AutoPlan` (``auto``)
estimates ``a`` from the guesses checked so far (a decaying count, so it follows the text) and picks the
``k`` with the best gain, 0 when no ``k`` beats plain decoding.  While off it keeps measuring: the
n-gram drafter's guesses cost nothing, so they are made and compared with what the model then writes
("shadow" guesses, never decoded); a draft model's cost something, so one real check is made after
:data:`PROBE_EVERY` tokens, the interval doubling after each check that leaves it off (up to
:data:`PROBE_MAX`) and starting over once it turns on.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Guesses per forward pass by default (the issue's measurement: 5 drafted gives 1.47 tokens per step
#: on real QVQ replies; 10 gives 1.51).
DEFAULT_K = 5
#: How fast old evidence fades: each checked draft multiplies the counts by this.
DECAY = 0.95
#: While off with a costly drafter, one real check after this many tokens, then twice as many ... up to
#: PROBE_MAX.
PROBE_EVERY = 32
PROBE_MAX = 1024


def expected_tokens(a: float, k: int) -> float:
    """Tokens one forward pass yields with ``k`` guesses each right with probability ``a``."""
    if k <= 0:
        return 1.0
    if a >= 1.0:
        return float(k + 1)
    return (1.0 - a ** (k + 1)) / (1.0 - a)


@dataclass(frozen=True)
class CostCurve:
    """Seconds of one forward pass over ``n`` tokens, for ``n`` = 1, 2, ... (measured: ``costs.py``)."""

    seconds: tuple[float, ...]  # seconds[i]: a forward pass over i + 1 tokens

    def __post_init__(self) -> None:
        if not self.seconds or any(not s > 0 for s in self.seconds):
            raise ValueError(f"a cost curve needs positive seconds, got {self.seconds!r}")

    def ratio(self, n: int) -> float:
        """``c(n)``: a forward pass over ``n`` tokens in one-token steps (extrapolated linearly past the
        measured sizes)."""
        s = self.seconds
        if n <= len(s):
            return s[max(n, 1) - 1] / s[0]
        if len(s) == 1:
            return float(n)
        slope = max(s[-1] - s[-2], 0.0)
        return (s[-1] + slope * (n - len(s))) / s[0]

    def gain(self, a: float, k: int, draft_cost: float = 0.0) -> float:
        """Speed relative to plain decoding of forward passes that check ``k`` guesses."""
        return expected_tokens(a, k) / (self.ratio(k + 1) + k * draft_cost)

    def best(self, a: float, k_max: int, draft_cost: float = 0.0) -> tuple[int, float]:
        """``(k, gain)`` with the best gain for acceptance ``a``; ``(0, 1.0)`` when nothing beats plain."""
        best_k, best_gain = 0, 1.0
        for k in range(1, k_max + 1):
            g = self.gain(a, k, draft_cost)
            if g > best_gain:
                best_k, best_gain = k, g
        return best_k, best_gain

    def as_list(self) -> list[float]:
        return [round(s, 6) for s in self.seconds]


class FixedPlan:
    """Always ``k`` guesses per forward pass (``--speculate ngram`` / ``draft``)."""

    mode = "fixed"

    def __init__(self, k: int = DEFAULT_K):
        self.k_max = int(k)

    def k(self) -> int:
        return self.k_max

    def record(self, drafted: int, accepted: int, rejected: bool | None) -> None:
        pass

    def observe(self, token: int) -> None:
        pass

    def drafted(self, drafts: list[int]) -> None:
        pass

    def forget(self) -> None:
        pass

    def draft_seconds(self, seconds: float) -> None:
        pass

    def wants_shadow(self) -> bool:
        return False

    def describe(self) -> dict:
        return {"plan": "fixed", "k": self.k_max}


class AutoPlan:
    """Picks ``k`` from the live acceptance and the cost curve; off when nothing beats plain decoding.

    ``free_drafts``: the drafter's guesses cost nothing (n-gram lookup), so while off they are still
    made and compared with the text (shadow guesses).  ``draft_cost``: one guess of a draft model in
    one-token target steps (updated by :meth:`set_draft_cost` as it is measured).
    """

    mode = "auto"

    def __init__(
        self,
        curve: CostCurve,
        k_max: int = DEFAULT_K,
        *,
        free_drafts: bool = True,
        draft_cost: float = 0.0,
        prior: tuple[float, float] = (1.0, 1.0),
        decay: float = DECAY,
        probe_every: int = PROBE_EVERY,
    ):
        self.curve = curve
        self.k_max = int(k_max)
        self.free_drafts = free_drafts
        self.draft_cost = float(draft_cost)
        self.decay = decay
        self.probe_every = probe_every
        self._right, self._wrong = prior  # decayed counts of right guesses and of stops at a wrong one
        self._shadow: list[int] | None = None  # guesses made while off, compared as the text arrives
        self._shadow_seen = 0
        self._since_probe = 0
        self._interval = probe_every
        self.switches = 0  # times it turned on or off
        self._on: bool | None = None
        self.shadow_checked = 0  # shadow guesses compared (for the record)
        self.shadow_right = 0

    # -- the estimate

    @property
    def acceptance(self) -> float:
        """The estimated probability that a guess is right (given the ones before it were)."""
        return self._right / (self._right + self._wrong)

    def choice(self) -> tuple[int, float]:
        """``(k, expected gain)`` for the next forward pass."""
        return self.curve.best(self.acceptance, self.k_max, self.draft_cost)

    def set_draft_cost(self, cost: float) -> None:
        self.draft_cost = max(0.0, float(cost))

    def draft_seconds(self, seconds: float) -> None:
        """The drafter's measured seconds per guess, as a share of a one-token target step."""
        self.set_draft_cost(seconds / self.curve.seconds[0])

    def _add(self, accepted: int, stopped: bool) -> None:
        self._right *= self.decay
        self._wrong *= self.decay
        self._right += accepted
        self._wrong += 1.0 if stopped else 0.0

    # -- the speculator's calls

    def k(self) -> int:
        k, _ = self.choice()
        on = k > 0
        if on:
            self._interval = self.probe_every
        elif not self.free_drafts:
            self._since_probe += 1
            if self._since_probe >= self._interval:  # a costly drafter: one real check now and then
                self._since_probe = 0
                self._interval = min(2 * self._interval, PROBE_MAX)
                k = self.k_max
        if self._on is not None and on != self._on:
            self.switches += 1
        self._on = on
        return k

    def record(self, drafted: int, accepted: int, rejected: bool | None) -> None:
        """A checked draft: ``accepted`` of ``drafted`` right; ``rejected`` whether it stopped at a wrong
        guess (None: cut short by an end of turn or forced text, so its end is unknown)."""
        if drafted <= 0:
            return
        self._add(accepted, bool(rejected))

    def wants_shadow(self) -> bool:
        return self.free_drafts and self._shadow is None

    def shadow(self, guesses: list[int]) -> None:
        """Guesses made while off (never decoded): compared with the next tokens by :meth:`observe`."""
        if guesses:
            self._shadow, self._shadow_seen = list(guesses), 0

    def observe(self, token: int) -> None:
        """A token entered the text: settle a shadow guess."""
        if self._shadow is None:
            return
        if token == self._shadow[self._shadow_seen]:
            self._shadow_seen += 1
            if self._shadow_seen == len(self._shadow):
                self._settle_shadow(stopped=False)
        else:
            self._settle_shadow(stopped=True)

    def _settle_shadow(self, stopped: bool) -> None:
        self.shadow_checked += self._shadow_seen + (1 if stopped else 0)
        self.shadow_right += self._shadow_seen
        self._add(self._shadow_seen, stopped)
        self._shadow = None

    def drafted(self, drafts: list[int]) -> None:
        if drafts:
            self._shadow = None  # real guesses are being checked: no shadow alongside

    def forget(self) -> None:
        """Forced text entered: a shadow guess about the model's own text no longer applies."""
        self._shadow = None

    def describe(self) -> dict:
        k, gain = self.choice()
        return {
            "plan": "auto",
            "k_max": self.k_max,
            "k": k,
            "acceptance_estimate": round(self.acceptance, 3),
            "expected_gain": round(gain, 3),
            "switches": self.switches,
            "cost_curve_s": self.curve.as_list(),
        }


__all__ = ["DEFAULT_K", "AutoPlan", "CostCurve", "FixedPlan", "expected_tokens"]
