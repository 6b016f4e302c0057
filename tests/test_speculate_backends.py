"""Speculative decoding on the real backends: the output is plain decoding's, token for token.

Every family (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) on both backends (llama.cpp Q4_K_M, MLX 4-bit), driven by
the unchanged reasoning controller: a thinking budget cut with the forced answer fed in the middle, the
answer after it, the language lock's mask while thinking, the loop stop, seeded sampling, and a context
so tight that the controller cuts thinking for room.  Each run is compared with the same question
decoded plainly, and the speculation report must show guesses both accepted and rolled back, so both
paths of the mechanism were taken.

llama.cpp runs with contexts of at most 256 cells here: past that its single-token attention splits the
KV cache over threads (``use_split_kv_path`` in ggml-cpu's flash attention), so its logits change with
how a pass is batched -- and with the thread count, for plain decoding too (README: "exact up to ...").
MLX's CPU logits do not depend on the batch: its runs go past 512 tokens.
"""

from __future__ import annotations

import numpy as np
import pytest

from qvq_local.backends.base import Prompt, SamplingParams, TokenMask
from qvq_local.events import Finished
from qvq_local.loops import LoopSettings
from qvq_local.prompt import build_prompt, load_chat_template
from qvq_local.reasoning import ReasoningConfig, run_reasoning
from qvq_local.speculate import costs
from qvq_local.speculate.config import SpecSettings
from qvq_local.splitter import default_forced_text, default_markers

QUESTION = "Which bar is the tallest, and by how much?"
FAMILIES = ("qwen2-vl", "qwen2.5-vl", "qwen3-vl")
LLAMA_CELLS = 256  # the context in which llama.cpp's batched and single-token attention agree


@pytest.fixture(scope="module")
def checkpoints(artifacts):
    from qvq_local.convert.synthetic import write_checkpoint

    out = {}
    for family in FAMILIES:
        variant = "thinking" if family == "qwen3-vl" else None
        out[family] = write_checkpoint(
            artifacts / f"spec-{family}", "tiny", dtype="f32", family=family, variant=variant, seed=1
        )
    return out


def _load(backend: str, family: str, checkpoints, artifacts):
    if backend == "llama":
        pytest.importorskip("llama_cpp")
        from qvq_local.convert.to_gguf import convert_to_gguf

        from qvq_local.backends import llamacpp

        pair = convert_to_gguf(
            checkpoints[family], artifacts / f"spec-{family}-q4", quant="q4_k_m", mmproj_quant="f16"
        )
        return llamacpp.load(pair.model, pair.mmproj)
    pytest.importorskip("mlx_vlm")
    from qvq_local.convert.to_mlx import convert_to_mlx

    from qvq_local.backends import mlx

    folder = convert_to_mlx(checkpoints[family], artifacts / f"spec-{family}-mlx4", bits=4, group_size=64)
    return mlx.load(folder)


@pytest.fixture(scope="module")
def loaded(checkpoints, artifacts):
    """Each (backend, family) model, loaded on first use and closed at the end of the module."""
    cache = {}

    def get(backend, family):
        if (backend, family) not in cache:
            model = _load(backend, family, checkpoints, artifacts)
            model.test_backend = backend
            model.test_checkpoint = checkpoints[family]
            cache[backend, family] = model
        return cache[backend, family]

    yield get
    for model in cache.values():
        model.close()


@pytest.fixture(params=[(b, f) for b in ("llama", "mlx") for f in FAMILIES], ids="-".join)
def model(request, loaded):
    """Every family on both backends."""
    return loaded(*request.param)


@pytest.fixture(params=["llama", "mlx"])
def qvq_model(request, loaded):
    """QVQ's family (Qwen2-VL) on both backends."""
    return loaded(request.param, "qwen2-vl")


@pytest.fixture(scope="module")
def image():
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(img).rectangle((8, 20, 28, 60), fill="navy")
    return img


def _prompt(model, image) -> Prompt:
    template = load_chat_template(model.test_checkpoint)
    return Prompt(text=build_prompt(template, QUESTION, 1, family=model.family), images=[image])


def _config(model, **kw) -> ReasoningConfig:
    kw.setdefault("loop", None)
    return ReasoningConfig(
        forced_text=default_forced_text(model.chat_template, QUESTION),
        answer_markers=default_markers(model.chat_template),
        **kw,
    )


def _run(model, image, spec, cfg, *, sampling=None, n_ctx=None, mask=None):
    """One question through the controller; the ids the session emitted, the result, the report."""
    n_ctx = n_ctx or (LLAMA_CELLS if model.test_backend == "llama" else 2048)
    session = model.new_session(sampling or SamplingParams(), n_ctx=n_ctx, speculation=spec)
    session.prefill(_prompt(model, image))
    ids = []
    step = session.step

    def recording_step(banned=None):
        token = step(banned)
        ids.append(token.id)
        return token

    session.step = recording_step
    events = list(run_reasoning(session, cfg, thought_mask=mask))
    report = session.speculation_report()
    assert session.n_past <= session.n_ctx
    session.close()
    assert isinstance(events[-1], Finished)
    return ids, events[-1].result, report


def _same(plain, spec):
    (a, ra, _), (b, rb, _) = plain, spec
    assert a == b
    assert (ra.thought, ra.answer, ra.stop_reason) == (rb.thought, rb.answer, rb.stop_reason)
    assert [(f.reason, f.at_token) for f in ra.forced] == [(f.reason, f.at_token) for f in rb.forced]


NGRAM = SpecSettings(mode="ngram", k=5)


def test_greedy_with_a_budget_cut_and_a_forced_answer(model, image):
    budget = 50 if model.test_backend == "llama" else 300
    cfg = _config(model, think_budget=budget, grace_tokens=8, answer_budget=60)
    plain = _run(model, image, None, cfg)
    spec = _run(model, image, NGRAM, cfg)
    _same(plain, spec)
    assert [f.reason for f in spec[1].forced] == ["budget"]
    report = spec[2]
    # every emitted token went through the speculator, but an end of turn llama.cpp does not decode
    ended = model.test_backend == "llama" and spec[1].stop_reason in ("answer", "budget", "loop")
    assert report["drafter"] == "ngram" and report["tokens"] == len(spec[0]) - ended
    assert report["accepted"] > 0 and report["rolled_back"] > 0  # both paths taken
    assert report["steps"] < report["tokens"]  # fewer target passes than tokens


def test_the_language_lock_masks_verified_logits(qvq_model, image):
    """A mask over the token the unmasked run wrote most: drafted guesses of it must be rejected."""
    model = qvq_model
    cfg = _config(model, think_budget=40 if model.test_backend == "llama" else 200, answer_budget=30)
    free = _run(model, image, None, cfg)
    common = np.bincount(free[0]).argmax()
    mask = TokenMask(ids=np.array([common], dtype=np.int32), label="test")
    plain = _run(model, image, None, cfg, mask=mask)
    spec = _run(model, image, NGRAM, cfg, mask=mask)
    _same(plain, spec)
    thought_ids = spec[0][: spec[1].thought_tokens]
    assert common not in thought_ids


def test_the_loop_stop(qvq_model, image):
    """The random model loops: the controller's loop stop cuts the thought the same way."""
    model = qvq_model
    loop = LoopSettings(min_span=8, repeats=3, min_chars=40, check_every=4)
    cfg = _config(model, loop=loop, answer_budget=40)
    plain = _run(model, image, None, cfg)
    spec = _run(model, image, NGRAM, cfg)
    _same(plain, spec)
    assert [f.reason for f in plain[1].forced] == ["loop"]


def test_seeded_sampling(qvq_model, image):
    model = qvq_model
    sampling = SamplingParams(temperature=0.9, top_k=40, top_p=0.95, repetition_penalty=1.1, seed=11)
    cfg = _config(model, think_budget=50 if model.test_backend == "llama" else 300, answer_budget=40)
    _same(_run(model, image, None, cfg, sampling=sampling), _run(model, image, NGRAM, cfg, sampling=sampling))


def test_a_context_too_small_for_the_thought(qvq_model, image):
    """No budget: the controller cuts thinking where the context leaves the answer room, and guesses
    never push a session past its context."""
    model = qvq_model
    prompt_cells = _run(model, image, None, _config(model, max_tokens=1))[1].prompt_tokens
    n_ctx = prompt_cells + 90
    cfg = _config(model, answer_budget=40, answer_reserve=30)
    plain = _run(model, image, None, cfg, n_ctx=n_ctx)
    spec = _run(model, image, SpecSettings(mode="ngram", k=8), cfg, n_ctx=n_ctx)
    _same(plain, spec)


def test_auto_measures_the_cost_curve_once_and_keeps_the_output(qvq_model, image):
    model = qvq_model
    cfg = _config(model, think_budget=40, answer_budget=30)
    plain = _run(model, image, None, cfg)
    first = _run(model, image, SpecSettings(mode="auto"), cfg)
    again = _run(model, image, SpecSettings(mode="auto"), cfg)
    _same(plain, first)
    _same(plain, again)
    assert (
        any("measured the verify cost curve" in n for n in first[2]["notes"]) and costs.cache_file().is_file()
    )
    assert not any("measured" in n for n in again[2]["notes"])  # read from QVQ_HOME
    assert first[2]["plan"] == "auto" and len(first[2]["cost_curve_s"]) == 6


def test_recurrent_families_turn_speculation_off_with_a_note(qvq_model, image, monkeypatch):
    model = qvq_model
    family = type(model.family)()
    monkeypatch.setattr(family, "recurrent_state", True, raising=False)
    monkeypatch.setattr(model, "family", family)
    cfg = _config(model, think_budget=30, answer_budget=20)
    plain = _run(model, image, None, cfg)
    spec = _run(model, image, NGRAM, cfg)
    _same(plain, spec)
    assert spec[2]["mode"] == "off" and "recurrent" in spec[2]["notes"][0]


# ---------------------------------------------------------------- a draft model (--draft)


@pytest.fixture(scope="module")
def other_seed(artifacts, loaded):
    """QVQ's family again, other random weights, the same tokenizer: a draft that guesses wrong."""
    from qvq_local.convert.synthetic import write_checkpoint

    checkpoint = write_checkpoint(
        artifacts / "spec-other-seed", "tiny", dtype="f32", family="qwen2-vl", seed=9
    )
    cache = {}

    def get(backend):
        if backend not in cache:
            cache[backend] = _load(backend, "qwen2-vl", {"qwen2-vl": checkpoint}, artifacts / "other")
        return cache[backend]

    (artifacts / "other").mkdir(exist_ok=True)
    yield get
    for model in cache.values():
        model.close()


def test_a_draft_identical_to_the_model_is_always_right(qvq_model, image):
    model = qvq_model
    cfg = _config(model, think_budget=40, answer_budget=30)
    plain = _run(model, image, None, cfg)
    spec = _run(model, image, SpecSettings(mode="draft", k=4, draft=model), cfg)
    _same(plain, spec)
    report = spec[2]
    assert report["drafter"] == "draft" and report["acceptance"] > 0.95
    assert report["tokens_per_step"] > 3.5


def test_a_mismatched_draft_is_rejected_and_auto_turns_it_off(qvq_model, image, other_seed):
    model = qvq_model
    draft = other_seed(model.test_backend)
    cfg = _config(model, think_budget=40, answer_budget=30)
    plain = _run(model, image, None, cfg)
    always = _run(model, image, SpecSettings(mode="draft", k=4, draft=draft), cfg)
    auto = _run(model, image, SpecSettings(mode="auto", k=4, draft=draft), cfg)
    _same(plain, always)
    _same(plain, auto)
    assert always[2]["acceptance"] < 0.2
    assert auto[2]["k"] == 0 and auto[2]["drafted"] < always[2]["drafted"] / 4  # off, probing now and then


def test_a_draft_with_another_tokenizer_is_refused(qvq_model, image, request):
    """The synthetic models' small vocabulary against Qwen's real one: the guesses would be other tokens."""
    from qvq_local.errors import InputError

    model = qvq_model
    if model.test_backend == "llama":
        from qvq_local.backends import llamacpp

        pair = request.getfixturevalue("qwen_tiny_gguf_f16")
        stranger = llamacpp.load(pair.model, pair.mmproj)
    else:
        from qvq_local.backends import mlx

        stranger = mlx.load(request.getfixturevalue("qwen_tiny_mlx"))
    try:
        with pytest.raises(InputError, match="does not tokenise text as"):
            model.new_session(
                SamplingParams(), n_ctx=256, speculation=SpecSettings(mode="draft", draft=stranger)
            )
    finally:
        stranger.close()
