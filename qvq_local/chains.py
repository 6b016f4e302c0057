"""Self-consistency: N reasoning chains of one question, run in lockstep, and the majority vote.

Policy only.  Each chain is an ordinary reasoning controller (:func:`qvq_local.reasoning.run_reasoning`)
over its own ``Session``, so every chain has its own thinking budget, loop stop and forced answer.  The
sessions come from the backend (``LlamaSession.fork``: N chains sharing one prefill and decoded in one
batch); this module only decides the order in which the chains step and which answer wins.

* **Lockstep.**  Each round advances every running chain by exactly one ``step()`` (and whatever
  ``feed()`` its controller does before it), so a batching backend decodes one token of every chain per
  ``llama_decode``.  A chain that finishes drops out; the round order is the chain order.
* **Vote** (:func:`vote`).  The answer is the ``\\boxed{}`` value (the one parser, :mod:`qvq_local.boxed`,
  through each chain's ``Result.boxed``) that most chains agree on, compared after collapsing whitespace.
  A tie goes to the value whose first chain finished earliest (fewest rounds; the lower chain number in
  the same round).  Chains without a boxed value do not vote; when no chain has one, the earliest-finishing
  chain's answer is taken.  The final Result is the winning chain's (its thought, answer, boxed and stop
  reason) with every chain under ``chains`` and the tally under ``vote``.
* **Interruption.**  Ctrl-C in any chain (or thrown in by the caller) interrupts every chain; the stream
  still ends with one ``Finished`` (stop reason ``interrupted``) carrying what each chain had.

Events: ``ChainEvent(chain=i, event=...)`` wraps each chain's TextDelta/Forced/Finished, then one
``Finished`` with the combined Result.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

from qvq_local.events import ChainEvent, Finished, Result, Timings
from qvq_local.reasoning import STEPPED, ReasoningConfig, run_reasoning

#: Sampling used for N > 1 chains when the caller sets none and the model's own is (near-)greedy (QVQ's
#: is: temperature 0.01, top_k 1): such chains would all be the same chain.  The self-consistency paper (Wang et al., 2022)
#: sampled at temperature 0.5-0.7 with top-k 40.  top_k also keeps sampling cheap: llama.cpp's top-p
#: over Qwen's whole 151,936-token vocabulary took ~190 ms per token here, after top-k 40 ~1.5 ms.
CHAIN_SAMPLING = {"temperature": 0.7, "top_p": 0.95, "top_k": 40}
#: Below this temperature (or with top_k 1) a model's own sampling counts as near-greedy.
NEAR_GREEDY_TEMPERATURE = 0.3

_SPACE = re.compile(r"\s+")


def chain_sampling(requested, resolved):
    """The sampling for N > 1 chains: what the caller asked for, or :data:`CHAIN_SAMPLING` when the caller
    set none of temperature/top_p/top_k and the model's own (``resolved``) is near-greedy."""
    from dataclasses import replace as _replace

    greedy = (resolved.temperature or 0) < NEAR_GREEDY_TEMPERATURE or resolved.top_k == 1
    chosen = (requested.temperature, requested.top_p, requested.top_k)
    if greedy and all(v is None for v in chosen):
        return _replace(requested, **CHAIN_SAMPLING)
    return requested


def normalise(value: str | None) -> str | None:
    """The form boxed values are compared in: whitespace collapsed and stripped; empty -> None."""
    if value is None:
        return None
    value = _SPACE.sub(" ", value).strip()
    return value or None


@dataclass(frozen=True)
class Vote:
    winner: int  # the chain whose Result becomes the answer
    answer: str | None  # the majority boxed value (normalised), None when no chain boxed one
    counts: dict[str, int]  # boxed value -> chains that gave it, most votes first
    order: list[int]  # chains in the order they finished

    def to_dict(self) -> dict:
        return {
            "answer": self.answer,
            "chain": self.winner,
            "counts": dict(self.counts),
            "finish_order": self.order,
        }


def vote(results: list[Result], order: list[int]) -> Vote:
    """The majority boxed answer of ``results``; ties and the no-box case go to the earliest in ``order``."""
    if not results:
        raise ValueError("no chains to vote on")
    rank = {chain: i for i, chain in enumerate(order)}
    by_finish = sorted(range(len(results)), key=lambda i: rank.get(i, len(order) + i))
    values = [normalise(r.boxed) for r in results]
    counts = Counter(v for v in values if v is not None)
    if not counts:
        return Vote(by_finish[0], None, {}, list(order))
    top = max(counts.values())
    winner = next(i for i in by_finish if values[i] is not None and counts[values[i]] == top)
    ranked = sorted(
        counts,
        key=lambda v: (-counts[v], min(rank.get(i, 1 << 30) for i in range(len(values)) if values[i] == v)),
    )
    return Vote(winner, values[winner], {v: counts[v] for v in ranked}, list(order))


def run_chains(
    sessions: list,
    config: ReasoningConfig | None = None,
    *,
    result_base: dict | None = None,
    started_at: float | None = None,
    clock: Callable[[], float] = time.perf_counter,
    thought_mask=None,
) -> Iterator[ChainEvent | Finished]:
    """Run one reasoning controller per session in lockstep; yield ``ChainEvent``s, then ``Finished``.

    The arguments are :func:`~qvq_local.reasoning.run_reasoning`'s, with one session per chain (already
    prefilled or forked).  The sessions are not closed here.
    """
    t0 = clock() if started_at is None else started_at
    gens = [
        run_reasoning(
            s,
            config,
            result_base=result_base,
            started_at=t0,
            clock=clock,
            thought_mask=thought_mask,
            stepped=True,
        )
        for s in sessions
    ]
    results: list[Result | None] = [None] * len(gens)
    order: list[int] = []
    interrupted = False

    def advance(i: int, throw: bool = False) -> Iterator[ChainEvent]:
        """Run chain i until it has stepped once more (or finished)."""
        nonlocal interrupted
        first = True
        while results[i] is None:
            try:
                event = gens[i].throw(KeyboardInterrupt()) if throw and first else next(gens[i])
            except StopIteration:  # pragma: no cover - run_reasoning always ends with Finished
                break
            first = False
            if event is STEPPED:
                return
            if isinstance(event, Finished):
                results[i] = event.result
                order.append(i)
                if event.result.stop_reason == "interrupted":
                    interrupted = True
            yield ChainEvent(i, event)

    try:
        while any(r is None for r in results) and not interrupted:
            for i in range(len(gens)):
                if results[i] is None and not interrupted:
                    yield from advance(i)
    except KeyboardInterrupt:
        interrupted = True
    if interrupted:
        for i in range(len(gens)):
            if results[i] is None:
                try:
                    yield from advance(i, throw=True)
                except KeyboardInterrupt:  # a chain that never started: nothing to report but that
                    results[i] = Result(
                        "", "", None, "interrupted", 0, 0, (result_base or {}).get("prompt_tokens", 0)
                    )
                    order.append(i)
    yield Finished(combine(results, order, t0=t0, clock=clock, interrupted=interrupted))


def combine(
    results: list[Result], order: list[int], *, t0: float, clock=time.perf_counter, interrupted=False
) -> Result:
    """The Result of N chains: the vote's winning chain, every chain under ``chains``, the tally, and
    timings for the whole batch (decode rate = all chains' tokens over the decode time of all of them)."""
    picked = vote(results, order)
    win = results[picked.winner]
    generated = sum(r.thought_tokens + r.answer_tokens for r in results)
    # The chains step one after another, so their decode times add up to the batch's wall time in decode.
    decode_s = sum(r.timings.decode_s for r in results)
    timings: Timings = replace(win.timings)
    timings.decode_s = decode_s
    timings.decode_tok_s = generated / decode_s if decode_s > 0 else 0.0
    firsts = [r.timings.first_token_s for r in results if r.timings.first_token_s]
    timings.first_token_s = min(firsts) if firsts else 0.0
    timings.forced_step_s = sum(r.timings.forced_step_s for r in results)
    timings.total_s = clock() - t0
    settings = dict(win.settings)
    settings["samples"] = len(results)
    return replace(
        win,
        boxed=win.boxed,
        stop_reason="interrupted" if interrupted else win.stop_reason,
        timings=timings,
        settings=settings,
        chains=list(results),
        vote={**picked.to_dict(), "decode_tok_s_per_chain": timings.decode_tok_s / len(results)},
    )
