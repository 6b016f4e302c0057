"""The self-consistency policy (qvq_local.chains): lockstep driving, per-chain budgets, the vote."""

from __future__ import annotations

import pytest
from fakes import ScriptedSession

from qvq_local.chains import normalise, run_chains, vote
from qvq_local.events import ChainEvent, Finished, Result
from qvq_local.reasoning import ReasoningConfig


def _result(boxed, stop="answer"):
    return Result(
        thought="t",
        answer=f"\\boxed{{{boxed}}}" if boxed else "none",
        boxed=boxed,
        stop_reason=stop,
        thought_tokens=1,
        answer_tokens=1,
        prompt_tokens=3,
    )


def _reply(n_thought: int, boxed: str) -> str:
    return " ".join(["step"] * n_thought) + f"\n\n**Final Answer**\n\n$$\\boxed{{{boxed}}}$$"


def _run(sessions, config=None):
    events = list(run_chains(sessions, config or ReasoningConfig(loop=None)))
    assert isinstance(events[-1], Finished)
    assert all(isinstance(e, ChainEvent) for e in events[:-1])
    return events, events[-1].result


def test_vote_majority_wins_over_earlier_minority():
    results = [_result("7"), _result("5"), _result("5")]
    v = vote(results, order=[0, 2, 1])
    assert v.answer == "5" and v.winner == 2  # of the "5" chains, chain 2 finished first
    assert v.counts == {"5": 2, "7": 1}


def test_vote_tie_goes_to_the_earliest_finishing_chain():
    results = [_result("A"), _result("B"), _result("B"), _result("A")]
    assert vote(results, order=[2, 0, 3, 1]).answer == "B"
    assert vote(results, order=[3, 2, 0, 1]).winner == 3
    # whitespace does not split a vote; chains without a box do not vote
    results = [_result(None), _result("x +  1"), _result(" x + 1"), _result("y")]
    v = vote(results, order=[0, 3, 1, 2])
    assert v.answer == "x + 1" and v.winner == 1 and v.counts == {"x + 1": 2, "y": 1}


def test_vote_without_any_box_takes_the_earliest_finishing_chain():
    v = vote([_result(None), _result(None)], order=[1, 0])
    assert v.winner == 1 and v.answer is None and v.counts == {}
    assert normalise("  \n ") is None


def test_chains_step_in_lockstep_and_the_majority_answer_wins():
    scripts = [_reply(3, "42"), _reply(9, "41"), _reply(6, "41")]
    sessions = [ScriptedSession(s) for s in scripts]
    trace = []
    for i, s in enumerate(sessions):  # record the global order of steps
        original = s.step

        def step(banned=None, _i=i, _orig=original):
            trace.append(_i)
            return _orig(banned)

        s.step = step
    events, result = _run(sessions)
    # every round steps each running chain once, in chain order, until it finishes
    rounds = [trace[k : k + 3] for k in range(0, 3 * 8, 3)]
    assert all(r == [0, 1, 2] for r in rounds[:5]), trace[:24]
    assert result.boxed == "41"
    assert result.vote["answer"] == "41" and result.vote["counts"] == {"41": 2, "42": 1}
    assert result.vote["finish_order"][0] == 0  # the shortest chain finished first
    assert result.vote["chain"] == 2  # of the two "41" chains, the shorter (chain 2) finished first
    assert result.answer == "$$\\boxed{41}$$" and result.thought == " ".join(["step"] * 6)
    assert [c.boxed for c in result.chains] == ["42", "41", "41"]
    assert result.settings["samples"] == 3
    # each chain's own deltas are tagged with its number and rebuild its own answer
    for i, chain in enumerate(result.chains):
        answer = "".join(
            e.event.text for e in events[:-1] if e.chain == i and getattr(e.event, "phase", "") == "answer"
        )
        assert answer == chain.answer
    assert result.thought_tokens == result.chains[2].thought_tokens
    assert result.to_dict()["chains"][1]["boxed"] == "41"


def test_each_chain_has_its_own_budget_and_forced_answer():
    # chain 0 answers by itself; chain 1 thinks past the budget and is forced, alone
    sessions = [ScriptedSession(_reply(2, "1")), ScriptedSession(" on" * 50, answer="$$\\boxed{1}$$")]
    events, result = _run(sessions, ReasoningConfig(think_budget=20, grace_tokens=0, loop=None))
    assert sessions[0].fed == [] and len(sessions[1].fed) == 1
    assert [c.stop_reason for c in result.chains] == ["answer", "budget"]
    assert result.chains[1].thought_tokens == 20
    forced = [e for e in events[:-1] if e.event.kind == "forced"]
    assert [e.chain for e in forced] == [1]
    assert result.boxed == "1" and result.vote["counts"] == {"1": 2}


def test_one_result_dict_unchanged_without_chains():
    data = _result("3").to_dict()
    assert "chains" not in data and "vote" not in data


@pytest.mark.parametrize("where", ["inside", "thrown"])
def test_interrupt_stops_every_chain_with_one_finished(where):
    sessions = [
        ScriptedSession(" a" * 100, interrupt_at=5 if where == "inside" else None),
        ScriptedSession(" b" * 100),
    ]
    gen = run_chains(sessions, ReasoningConfig(loop=None))
    events = []
    if where == "inside":
        events = list(gen)
    else:
        for _ in range(6):
            events.append(next(gen))
        events.append(gen.throw(KeyboardInterrupt()))
        events.extend(gen)
    finished = [e for e in events if isinstance(e, Finished)]
    assert len(finished) == 1 and finished[0] is events[-1]
    result = finished[0].result
    assert result.stop_reason == "interrupted"
    assert [c.stop_reason for c in result.chains] == ["interrupted", "interrupted"]
    assert all(c.thought_tokens > 0 for c in result.chains)


def test_chain_sampling_replaces_only_a_near_greedy_default():
    from qvq_local.backends.base import SamplingParams
    from qvq_local.chains import CHAIN_SAMPLING, chain_sampling

    qvq = SamplingParams(temperature=0.01, top_p=0.001, top_k=1, repetition_penalty=1.05, seed=0)
    got = chain_sampling(SamplingParams(seed=4), qvq)
    assert (got.temperature, got.top_p, got.top_k, got.seed) == (*CHAIN_SAMPLING.values(), 4)
    # the caller's own choice stands, and so does a model that already samples
    assert chain_sampling(SamplingParams(temperature=0.0), qvq) == SamplingParams(temperature=0.0)
    warm = SamplingParams(temperature=0.8, top_p=0.9, top_k=40)
    assert chain_sampling(SamplingParams(), warm) == SamplingParams()
