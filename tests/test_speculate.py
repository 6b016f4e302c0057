"""Speculative decoding's model-free parts: the n-gram drafter, the speculator against a toy model, the
rule it verifies by, the gain model and its plans, the verify cost cache, and real-text replay.

The toy model computes each position's logits from the tokens in its cache (what a transformer does),
so a rollback that leaves a wrong cell, or a row used at the wrong position, changes the output: the
speculator must emit exactly what plain decoding emits, token for token, greedy or sampled, with a mask
switched on and off and forced text fed in the middle.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from qvq_local.errors import InputError
from qvq_local.speculate import costs
from qvq_local.speculate.engine import Speculator
from qvq_local.speculate.ngram import NgramDrafter
from qvq_local.speculate.policy import AutoPlan, CostCurve, FixedPlan, expected_tokens
from qvq_local.speculate.replay import PUBLISHED_REPLIES, ReplayTarget, read_replies, simulate

FIXTURE = PUBLISHED_REPLIES

# ---------------------------------------------------------------- the n-gram drafter


def test_ngram_prefers_the_longest_order_and_the_latest_occurrence():
    d = NgramDrafter()
    # "1 2 3 4" then later "9 2 3 4 7" ... the 4-gram "1 2 3 4" occurs once, followed by 5
    d.reset([1, 2, 3, 4, 5, 6, 9, 2, 3, 4, 7, 8, 1, 2, 3, 4])
    assert d.match() == (4, 4)  # the 4-gram "1 2 3 4" was followed by 5 (index 4)
    assert d.draft(3) == [5, 6, 9]
    d.reset([2, 3, 4, 7, 0, 9, 2, 3, 4, 8, 0, 5, 3, 4])  # no 4-gram; "3 4" last followed by 8
    assert d.match() == (2, 9)
    assert d.draft(2) == [8, 0]


def test_ngram_never_matches_its_own_suffix_and_misses_cost_nothing():
    d = NgramDrafter()
    d.reset([1, 2, 3])
    assert d.match() is None and d.draft(5) == []
    assert d.draft(0) == []
    d.extend([9, 1, 2, 3])
    assert d.draft(2) == [9, 1]


def test_ngram_continues_a_short_period_past_the_end():
    d = NgramDrafter()
    d.reset([7, 1, 2, 1, 2, 1, 2])  # "1 2" repeating: the guess goes on repeating
    assert d.draft(5) == [1, 2, 1, 2, 1]
    d.reset([5, 5, 5])
    assert d.draft(4) == [5, 5, 5, 5]


def test_ngram_index_grows_incrementally_and_truncates():
    d = NgramDrafter()
    whole = NgramDrafter()
    seq = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4, 6, 2, 6, 4, 3, 3, 8, 3, 2, 7, 9, 5]
    d.reset([])
    for i, t in enumerate(seq):
        d.extend([t])
        whole.reset(seq[: i + 1])
        assert d.draft(4) == whole.draft(4)
    d.truncate(10)
    whole.reset(seq[:10])
    assert d.history == seq[:10] and d.draft(3) == whole.draft(3)
    with pytest.raises(ValueError):
        NgramDrafter(orders=(0,))


# ---------------------------------------------------------------- a toy model behind the speculator

VOCAB = 12
EOS = 11


def _logits(context: tuple[int, ...]) -> np.ndarray:
    """The toy model: logits from the last three tokens of the cache (so text repeats, as reasoning
    does) and the cache length mod 5 (so a cell left over by a bad rollback changes what follows)."""
    seed = hash((context[-3:], len(context) % 5)) & 0xFFFFFFFF
    rng = np.random.default_rng(seed)
    row = rng.normal(size=VOCAB).astype(np.float32)
    row[EOS] -= 2.5
    return row


class ToySampler:
    """Greedy or seeded sampling with a repetition penalty over the tokens seen (the session's sampler:
    one draw per sampled token, its history exactly the tokens that entered the text)."""

    def __init__(self, temperature: float, seed: int, penalty: float = 1.3):
        self.temperature = temperature
        self.rng = np.random.default_rng(seed)
        self.penalty = penalty
        self.history: list[int] = []

    def sample(self, row: np.ndarray, mask) -> int:
        row = row.copy()
        for t in set(self.history[-8:]):
            row[t] = row[t] / self.penalty if row[t] > 0 else row[t] * self.penalty
        if mask is not None:
            row[list(mask)] = -np.inf
        if self.temperature <= 0:
            tok = int(np.argmax(row))
        else:
            p = np.exp((row - row.max()) / self.temperature)
            tok = int(self.rng.choice(VOCAB, p=p / p.sum()))
        self.history.append(tok)
        return tok


class ToyTarget:
    """The toy model's cache and forward passes (a Target)."""

    def __init__(self, prompt: list[int]):
        self.cache = list(prompt)
        self.forwards = 0
        self.largest = 0

    def forward(self, tokens, *, all_rows):
        self.forwards += 1
        if all_rows:  # a verify pass (fed text comes with one row)
            self.largest = max(self.largest, len(tokens))
        rows = []
        for t in tokens:
            self.cache.append(t)
            rows.append(_logits(tuple(self.cache)))
        return rows if all_rows else rows[-1:]

    def rollback(self, n):
        assert 0 < n <= len(self.cache)
        del self.cache[-n:]


PROMPT = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 1, 2, 3]
LOCK = frozenset({3, 4})


class PlainSession:
    """One token per forward pass: the reference."""

    def __init__(self, temperature, seed):
        self.target = ToyTarget(PROMPT)
        self.sampler = ToySampler(temperature, seed)
        self.sampler.history = list(PROMPT)
        self.row = _logits(tuple(PROMPT))

    def step(self, mask):
        tok = self.sampler.sample(self.row, mask)
        if tok != EOS:
            self.row = self.target.forward([tok], all_rows=True)[0]
        return tok

    def feed(self, tokens):
        self.sampler.history.extend(tokens)
        self.row = self.target.forward(tokens, all_rows=False)[0]


class SpecSession:
    """The same calls answered through a Speculator (as the backends' sessions do)."""

    def __init__(self, temperature, seed, plan):
        self.target = ToyTarget(PROMPT)
        self.sampler = ToySampler(temperature, seed)
        self.sampler.history = list(PROMPT)
        self.target.sample = self.sampler.sample
        self.spec = Speculator(self.target, NgramDrafter(), plan, room=lambda: 10_000)
        self.spec.start(_logits(tuple(PROMPT)), PROMPT)

    def step(self, mask):
        tok = self.spec.sample(mask)
        if tok == EOS:
            self.spec.drop()
        else:
            self.spec.advance(tok)
        return tok

    def feed(self, tokens):
        self.sampler.history.extend(tokens)
        self.spec.feed(tokens)

    def committed(self):
        return self.target.cache[: len(self.target.cache) - len(self.spec.pending)]


def _drive(session, n=400, lock=LOCK):
    """A controller-like script: a mask for a while, forced text in the middle, an EOS now and then."""
    out = []
    for i in range(n):
        mask = lock if 40 <= i < 160 else None
        out.append(session.step(mask))
        if i in (97, 251):
            session.feed([9, 9, 8])
            out.append("fed")
    return out


@pytest.mark.parametrize("temperature,seed", [(0.0, 0), (0.8, 1), (1.5, 7)])
@pytest.mark.parametrize("k", [1, 3, 5, 9])
def test_speculation_emits_what_plain_decoding_emits(temperature, seed, k):
    plain = PlainSession(temperature, seed)
    spec = SpecSession(temperature, seed, FixedPlan(k))
    a, b = _drive(plain), _drive(spec)
    assert a == b
    assert spec.committed() == plain.target.cache  # the cache holds what plain decoding put there
    assert spec.spec.stats.tokens == sum(1 for t in b if t not in ("fed", EOS))
    if temperature == 0.0:
        # greedy on a repetitive toy: guesses are right often, so fewer forward passes than tokens
        assert spec.spec.stats.accepted > 0
        assert spec.target.forwards < plain.target.forwards
        assert spec.target.largest == k + 1


def test_a_masked_guess_is_always_rejected():
    """A drafted token the mask bans is never emitted and its cell does not stay in the cache."""
    spec = SpecSession(0.0, 0, FixedPlan(5))
    for _ in range(200):
        spec.step(None)
        if spec.spec.pending and spec.spec.pending[0] != EOS:
            break
    guess = spec.spec.pending[0]
    rejected_before = spec.spec.stats.rolled_back
    tok = spec.step(frozenset({guess}))
    assert tok != guess
    assert spec.spec.stats.rolled_back > rejected_before  # the pending cells were removed
    assert spec.committed()[-1] == tok and guess not in spec.committed()[-1:]


def test_point_mass_rule_gives_the_target_distribution():
    """The rejection rule for a deterministic guess d: accept with probability p(d), else emit a draw
    from the rest; implemented as "draw x from p, accept d when x == d".  On a toy distribution the
    emitted token follows p and d is accepted with probability p(d), whatever d is."""
    rng = np.random.default_rng(3)
    p = np.array([0.5, 0.2, 0.15, 0.1, 0.05])
    n = 40_000
    for d in (0, 3):
        draws = rng.choice(len(p), size=n, p=p)
        accepted = draws == d
        freq = np.bincount(draws, minlength=len(p)) / n
        assert abs(accepted.mean() - p[d]) < 4 * np.sqrt(p[d] * (1 - p[d]) / n)
        # emitted token law: chi-square against p (4 dof; 20.5 is the 0.9996 quantile)
        chi2 = float((((freq - p) * n) ** 2 / (p * n)).sum())
        assert chi2 < 20.5
        # after a rejection the emitted token follows the residual max(0, p - q) normalised
        rest = np.bincount(draws[~accepted], minlength=len(p)) / (~accepted).sum()
        residual = p.copy()
        residual[d] = 0
        residual /= residual.sum()
        assert np.abs(rest - residual).max() < 0.015


# ---------------------------------------------------------------- the gain model and plans


def test_expected_tokens_and_gain():
    assert expected_tokens(0.5, 0) == 1.0
    assert expected_tokens(1.0, 5) == 6.0
    assert expected_tokens(0.5, 2) == pytest.approx(1.75)
    flat = CostCurve((0.010, 0.0105, 0.011, 0.0112, 0.0115, 0.012))  # a GPU: six tokens for ~1.2
    steep = CostCurve((0.010, 0.019, 0.028, 0.037, 0.046, 0.055))  # a 2-core CPU: ~n times
    assert flat.ratio(6) == pytest.approx(1.2)
    assert steep.ratio(8) == pytest.approx((0.055 + 2 * 0.009) / 0.010)  # extrapolated linearly
    k, gain = flat.best(0.3, 5)
    assert k >= 1 and gain > 1.2
    assert steep.best(0.3, 5) == (0, 1.0)  # nothing beats plain decoding: off
    assert steep.best(0.95, 5)[0] >= 1  # nearly every guess right pays even on a CPU
    with pytest.raises(ValueError):
        CostCurve((0.0,))


def test_auto_plan_turns_off_when_it_loses_and_back_on_from_shadow_guesses():
    steep = CostCurve((0.010, 0.019, 0.028, 0.037, 0.046, 0.055))
    plan = AutoPlan(steep, 5)
    assert plan.k() == 0  # the prior (a = 0.5) loses on this curve
    # shadow guesses that are all right: the estimate rises and speculation turns on
    for _ in range(30):
        plan.shadow([1, 2, 3, 4, 5])
        for t in (1, 2, 3, 4, 5):
            plan.observe(t)
    assert plan.acceptance > 0.9 and plan.k() > 0
    # then real checks that all fail: it turns off again
    for _ in range(60):
        plan.record(5, 0, rejected=True)
    assert plan.k() == 0 and plan.switches >= 2
    assert plan.describe()["plan"] == "auto"


def test_auto_plan_probes_a_costly_drafter_while_off():
    steep = CostCurve((0.010, 0.019, 0.028, 0.037, 0.046, 0.055))
    plan = AutoPlan(steep, 4, free_drafts=False, draft_cost=0.3, probe_every=8)
    ks = [plan.k() for _ in range(8 + 16 + 32 + 64)]
    probes = [i for i, k in enumerate(ks) if k == 4]
    assert probes == [7, 23, 55, 119]  # after 8 tokens, then 16, 32, 64: each check that fails waits longer
    assert not plan.wants_shadow()


def test_fixed_plan():
    plan = FixedPlan(3)
    assert plan.k() == 3 and plan.describe() == {"plan": "fixed", "k": 3}


def test_auto_speculator_is_exact_and_switches_on_repetitive_text():
    flat = CostCurve((0.010, 0.0102, 0.0104, 0.0106, 0.0108, 0.011))
    plain = PlainSession(0.0, 0)
    spec = SpecSession(0.0, 0, AutoPlan(flat, 5))
    assert _drive(plain) == _drive(spec)
    assert spec.spec.stats.accepted > 0


# ---------------------------------------------------------------- the verify cost curve and its cache


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_measure_times_each_size_and_leaves_the_cache_as_it_was():
    clock = _Clock()
    target = ToyTarget([1, 2, 3])

    def forward(tokens, *, all_rows):
        clock.now += 0.01 + 0.002 * (len(tokens) - 1)
        return ToyTarget.forward(target, tokens, all_rows=all_rows)

    target.forward = forward
    curve = costs.measure(target, 5, 4, repeats=3, clock=clock)
    assert target.cache == [1, 2, 3]
    assert curve.seconds == pytest.approx((0.010, 0.012, 0.014, 0.016))


def test_a_stall_never_passes_for_a_gain():
    """Single-token passes that stall (a graph rebuilt, a scheduler hiccup: 0.25 s against 0.4 ms, seen on
    llama.cpp here) once made a 1-token pass cost more than a 6-token one and ``auto`` expect a 3000x gain.
    The median over runs taken in turn, and a curve that never falls, keep the gain an honest one."""
    clock = _Clock()
    target = ToyTarget([1, 2, 3])
    calls = {"n": 0}

    def forward(tokens, *, all_rows):
        calls["n"] += 1
        stall = len(tokens) == 1 and calls["n"] % 2 == 0  # every other single-token pass stalls
        clock.now += 0.25 if stall else 0.0004 * len(tokens)
        return ToyTarget.forward(target, tokens, all_rows=all_rows)

    target.forward = forward
    curve = costs.measure(target, 5, 6, repeats=5, clock=clock)
    assert list(curve.seconds) == sorted(curve.seconds)  # never falls: a longer pass never looks cheaper
    assert curve.seconds[0] <= 0.0024 + 1e-9 and target.cache == [1, 2, 3]
    k, gain = curve.best(0.99, 5, 0.0)  # guesses right 99% of the time, drafted for free
    assert gain <= 6.0  # k + 1 tokens a pass at the very most, where a pass costs at least one step


def test_cost_cache_round_trip_and_a_corrupt_file(tmp_path):
    path = tmp_path / "speculation" / "verify-costs.json"
    ident = {"backend": "llama", "model": "/m/a.gguf", "size": 1}
    assert costs.cached(ident, 3, path) is None
    costs.store(ident, CostCurve((0.01, 0.02, 0.03)), path)
    assert costs.cached(ident, 3, path).seconds == (0.01, 0.02, 0.03)
    assert costs.cached(ident, 4, path) is None  # does not cover 4 sizes
    assert costs.cached({**ident, "size": 2}, 3, path) is None  # another file
    costs.store({**ident, "size": 2}, CostCurve((0.5,)), path)
    assert len(json.loads(path.read_text())["entries"]) == 2  # other entries kept
    path.write_text("{ not json")
    assert costs.cached(ident, 1, path) is None
    costs.store(ident, CostCurve((0.01,)), path)  # rewritten whole
    assert costs.cached(ident, 1, path).seconds == (0.01,)


# ---------------------------------------------------------------- replay of real reasoning text


def test_the_fixture_holds_the_seven_published_replies_and_names_its_source():
    replies, source = read_replies(FIXTURE)
    assert len(replies) == 7
    assert "qwenlm.github.io" in source and "4307d0256b304404ba5e7132983a1bcf1b61d808" in source
    # three English replies under QVQ's marker, four Chinese ones under its Chinese marker
    assert [("**Final Answer**" in r.text, "**答案**" in r.text) for r in replies] == [(True, False)] * 3 + [
        (False, True)
    ] * 4
    assert sum(len(r.text) for r in replies) == 24212


def test_replay_file_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        read_replies(tmp_path / "none.json")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(InputError, match="empty"):
        read_replies(empty)
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(InputError, match="not valid JSON"):
        read_replies(bad)
    bad.write_text('{"replies": [{"name": "x"}]}')
    with pytest.raises(InputError, match="reply 1 has no text"):
        read_replies(bad)
    plain = tmp_path / "one.txt"
    plain.write_text("So I have this.\n")
    replies, source = read_replies(plain)
    assert [r.text for r in replies] == ["So I have this.\n"] and source == "one.txt"


def test_replay_target_emits_the_reply_and_counts_forward_passes():
    stats = simulate([1, 2, 3], [1, 2, 3, 1, 2, 3, 1, 2, 3], k=4)
    assert stats.tokens == 9
    # guesses from "1 2 3" are right after the first repeat: fewer passes than tokens
    assert stats.steps < 9 and stats.accepted == 9 - stats.steps
    target = ReplayTarget([4, 5])
    assert target.sample(None, None) == 4 and target.forward([1, 2], all_rows=True) == [None, None]


def test_ngram_acceptance_on_the_published_replies(qwen_tokenizer):
    """The issue's figure, reproduced: QVQ-72B-Preview's seven published replies tokenised with the real
    Qwen vocabulary, 4/3/2-gram lookup over the prompt and the text so far, 5 guesses per pass."""
    from qvq_local.families import DEFAULT_FAMILY

    replies, _ = read_replies(FIXTURE)
    tokens = steps = 0
    per_reply = []
    for r in replies:
        prompt = (
            f"<|im_start|>system\n{DEFAULT_FAMILY.system_prompt}<|im_end|>\n"
            f"<|im_start|>user\n{r.question}<|im_end|>\n<|im_start|>assistant\n"
        )
        p = qwen_tokenizer.encode(prompt, add_special_tokens=False).ids
        ids = qwen_tokenizer.encode(r.text, add_special_tokens=False).ids
        assert qwen_tokenizer.decode(ids) == r.text
        stats = simulate(p, ids, 5)
        tokens += stats.tokens
        steps += stats.steps
        per_reply.append(stats.tokens_per_step)
    print(
        f"\n{tokens} tokens in {steps} target steps: {tokens / steps:.3f} tokens per step; per reply "
        + " ".join(f"{x:.2f}" for x in per_reply)
    )
    assert tokens == 10815
    assert 1.45 < tokens / steps < 1.50
    assert min(per_reply) > 1.2 and max(per_reply) < 1.75


# ---------------------------------------------------------------- the draft-model drafter


class DraftToy(ToyTarget):
    """A draft model's cache: the toy model itself, or a different one (``salt``)."""

    def __init__(self, salt: int = 0):
        super().__init__([])
        self.salt = salt
        self.rolled = 0

    def forward(self, tokens, *, all_rows):
        self.forwards += 1
        rows = []
        for t in tokens:
            self.cache.append(t)
            row = _logits(tuple(self.cache))
            rows.append(row if not self.salt else np.roll(row, self.salt))
        return rows if all_rows else rows[-1:]

    def rollback(self, n):
        self.rolled += n
        super().rollback(n)


def _model_drafted_session(salt, k=4):
    from qvq_local.speculate.draft import ModelDrafter, greedy_pick

    session = SpecSession(0.0, 0, FixedPlan(k))
    draft = DraftToy(salt)
    session.spec.drafter = ModelDrafter(draft, lambda row, history: greedy_pick(row, history[-8:], 1.3, 8))
    session.spec.start(_logits(tuple(PROMPT)), PROMPT)
    return session, draft


def test_a_draft_identical_to_the_target_is_always_right_and_exact():
    plain = PlainSession(0.0, 0)
    spec, draft = _model_drafted_session(0)
    assert _drive(plain, lock=None) == _drive(spec, lock=None)
    stats = spec.spec.stats
    # every guess right, except where forced text or an end of turn cut a draft short
    assert stats.accepted >= 0.95 * stats.drafted and stats.tokens_per_step > 4.0
    # with the mask on, guesses of masked tokens are rejected, and the output is still plain's
    plain, (spec, _) = PlainSession(0.0, 0), _model_drafted_session(0)
    assert _drive(plain) == _drive(spec)
    assert spec.spec.stats.rolled_back > stats.rolled_back
    assert spec.spec.drafter.seconds_per_guess >= 0.0 and spec.spec.drafter.guesses > 0


def test_a_mismatched_draft_is_rejected_and_stays_exact():
    plain = PlainSession(0.0, 0)
    spec, draft = _model_drafted_session(5)
    assert _drive(plain) == _drive(spec)
    stats = spec.spec.stats
    assert stats.acceptance < 0.3 and draft.rolled > 0
    # the draft's cache follows the text: it holds the prompt, then the text it was last synced to
    text = spec.committed()
    synced = len(draft.cache) - (draft.cache != text[: len(draft.cache)])
    assert draft.cache[: len(PROMPT)] == PROMPT and synced > len(PROMPT)


def test_greedy_pick_applies_the_penalty_over_its_window():
    from qvq_local.speculate.draft import greedy_pick

    row = np.array([0.0, 2.0, 1.9, -1.0], dtype=np.float32)
    assert greedy_pick(row, [], 1.3, 8) == 1
    assert greedy_pick(row, [1], 1.3, 8) == 2  # 2.0 / 1.3 < 1.9
    assert greedy_pick(row, [1, 0, 0, 0], 1.3, 2) == 1  # 1 is outside the window
