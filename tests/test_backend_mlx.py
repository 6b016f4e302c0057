"""The MLX backend's session on the synthetic tiny checkpoint (f32 and 4-bit conversions).

Reference for parity is mlx-vlm's own generation loop (``mlx_vlm.generate.generate_step``), which
handles Qwen2-VL's M-RoPE positions its own way; the session computes positions itself, so agreement
after an image prompt checks that bookkeeping.  Measured on the tiny checkpoint (Linux, mlx[cpu]):
greedy tokens identical (24 after an image, 16 text-only); first-token log-probabilities differ by at
most 9.5e-7 (f32 and 4-bit; the reference normalises with logsumexp); feed-then-step vs a fresh
prefill of prompt + fed text: logits identical (0.0).  Tolerance used: 1e-4.
"""

from __future__ import annotations

import json
import sys
import time

import pytest
from helpers import assert_error

from qvq_local.backends.base import LoadedModel, Prompt, SamplingParams, Session
from qvq_local.errors import BackendUnavailable, ContextOverflow, ModelError
from qvq_local.families import DEFAULT_FAMILY
from qvq_local.prompt import build_prompt

pytest.importorskip("mlx.core")
pytest.importorskip("mlx_vlm")

pytestmark = pytest.mark.mlx

GREEDY = SamplingParams(temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.0, seed=0)
FORCED = "\n\nTime is up. Let me answer now.\n\n**Final Answer**\n"
# Logit tolerance for two runs of the same MLX kernels in different call orders (chunking, cache).
ATOL = 1e-4


@pytest.fixture(scope="module", params=["tiny_mlx_f32", "tiny_mlx_q4"])
def loaded(request):
    from qvq_local.backends import mlx as backend

    folder = request.getfixturevalue(request.param)
    model = backend.load(folder)
    yield model
    model.close()


@pytest.fixture(scope="module")
def image(sample_image):
    from PIL import Image

    with Image.open(sample_image) as img:
        return img.convert("RGB")


def image_prompt(loaded, image, question="Which bar is the tallest?"):
    return Prompt(text=build_prompt(loaded.chat_template, question, 1), images=[image])


def reference_greedy(loaded, prompt: Prompt, n: int):
    """mlx-vlm's own greedy tokens and per-token logprobs for ``prompt``."""
    import numpy as np
    from mlx_vlm.generate import generate_step
    from mlx_vlm.utils import prepare_inputs

    inputs = prepare_inputs(
        loaded.processor, images=prompt.images or None, prompts=prompt.text, add_special_tokens=False
    )
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "pixel_values", "attention_mask")}
    tokens, logprobs = [], []
    for token, lp in generate_step(
        inputs["input_ids"],
        loaded.model,
        inputs.get("pixel_values"),
        inputs.get("attention_mask"),
        max_tokens=n,
        temperature=0.0,
        **extra,
    ):
        tokens.append(int(token))
        logprobs.append(np.array(lp, dtype=np.float32).reshape(-1))
    return tokens, logprobs


def log_softmax(x):
    import numpy as np

    x = x.astype(np.float64)
    return (x - x.max() - np.log(np.exp(x - x.max()).sum())).astype(np.float32)


def run(session, n):
    return [session.step() for _ in range(n)]


# ----------------------------------------------------------------------------------------- loading


def test_loaded_model_describes_itself(loaded):
    assert isinstance(loaded, LoadedModel)
    config = json.loads((loaded.model_dir / "config.json").read_text())
    assert loaded.backend == "mlx"
    assert loaded.context_length == config.get(
        "max_position_embeddings", config.get("text_config", {}).get("max_position_embeddings")
    )
    if "quantization" in config:
        assert loaded.quantization == "4bit-g64"
    else:
        assert loaded.quantization == "f32"
    gen_path = loaded.model_dir / "generation_config.json"
    assert loaded.generation_config == json.loads(gen_path.read_text())
    im_end = loaded.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in loaded.eos_token_ids


def test_image_token_estimate_matches_prefill(loaded, image):
    session = loaded.new_session(GREEDY)
    stats = session.prefill(image_prompt(loaded, image))
    assert stats.image_tokens == loaded.image_token_estimate(*image.size)
    assert stats.image_tokens_per_image == [stats.image_tokens]
    assert stats.prompt_tokens == session.n_past > stats.image_tokens > 0
    assert stats.prefill_s >= stats.image_encode_s > 0.0


def test_load_errors_are_model_errors(tmp_path):
    from qvq_local.backends import mlx as backend

    with pytest.raises(ModelError) as raised:
        backend.load(tmp_path / "missing")
    assert_error(raised, "not a model folder")
    with pytest.raises(ModelError) as raised:
        backend.load(tmp_path)
    assert_error(raised, "no config.json")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2_vl"}))
    with pytest.raises(ModelError) as raised:
        backend.load(tmp_path)
    assert_error(raised, "mlx-vlm cannot load")


def test_missing_mlx_vlm_names_the_extra(monkeypatch, tmp_path):
    from qvq_local.backends import mlx as backend

    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "mlx_vlm", None)  # makes `import mlx_vlm` raise ImportError
    with pytest.raises(BackendUnavailable) as raised:
        backend.load(tmp_path)
    assert_error(raised, r"qvq-local\[mlx\]")


# ------------------------------------------------------------------------------------------ parity


def test_greedy_after_image_matches_mlx_vlm(loaded, image):
    import numpy as np

    prompt = image_prompt(loaded, image)
    ref_tokens, ref_logprobs = reference_greedy(loaded, prompt, 24)
    session = loaded.new_session(GREEDY)
    assert isinstance(session, Session)
    session.prefill(prompt)
    first = log_softmax(session.last_logits())
    err = float(np.abs(first - ref_logprobs[0]).max())
    print(f"[{loaded.quantization}] first-token logprob max |diff| vs mlx-vlm: {err:.3g}")
    assert err < ATOL
    assert [t.id for t in run(session, 24)] == ref_tokens


def test_greedy_text_only_matches_mlx_vlm(loaded):
    prompt = Prompt(text=build_prompt(loaded.chat_template, "Say something.", 0), images=[])
    ref_tokens, _ = reference_greedy(loaded, prompt, 16)
    session = loaded.new_session(GREEDY)
    stats = session.prefill(prompt)
    assert stats.image_tokens == 0 and stats.image_encode_s == 0.0 and session.images_encoded == 0
    assert [t.id for t in run(session, 16)] == ref_tokens


def test_chunked_prefill_matches_single_pass(loaded, image):
    import numpy as np

    from qvq_local.backends.mlx_session import MlxSession

    prompt = image_prompt(loaded, image)
    whole = loaded.new_session(GREEDY)
    whole.prefill(prompt)
    chunked = MlxSession(loaded, GREEDY, prefill_chunk=7)
    chunked.prefill(prompt)
    assert float(np.abs(whole.last_logits() - chunked.last_logits()).max()) < ATOL
    assert [t.id for t in run(whole, 8)] == [t.id for t in run(chunked, 8)]


def test_feed_equals_fresh_prefill_of_prompt_plus_text(loaded, image):
    import numpy as np

    prompt = image_prompt(loaded, image)
    fed = loaded.new_session(GREEDY)
    fed.prefill(prompt)
    n = fed.feed(FORCED)
    assert n == fed.count_tokens(FORCED) > 0
    fresh = loaded.new_session(GREEDY)
    fresh.prefill(Prompt(text=prompt.text + FORCED, images=prompt.images))
    assert fed.n_past == fresh.n_past  # same tokens either way
    err = float(np.abs(fed.last_logits() - fresh.last_logits()).max())
    print(f"[{loaded.quantization}] feed vs fresh prefill logits max |diff|: {err:.3g}")
    assert err < ATOL
    assert [t.id for t in run(fed, 12)] == [t.id for t in run(fresh, 12)]


def test_positions_after_image_are_not_plain_positions(loaded, image):
    """Power check for the parity tests: plain positions after the image would change the logits."""
    import numpy as np

    prompt = image_prompt(loaded, image)
    right = loaded.new_session(GREEDY)
    right.prefill(prompt)
    assert right._rope_delta < 0  # image tokens share positions, so text positions run behind
    wrong = loaded.new_session(GREEDY)
    wrong.prefill(prompt)
    wrong._rope_delta = 0
    right.feed(FORCED)
    wrong.feed(FORCED)
    assert float(np.abs(right.last_logits() - wrong.last_logits()).max()) > 1e-3


# --------------------------------------------------------------------- image encoded once, timings


def test_feed_and_steps_do_not_reencode_the_image(loaded, image, monkeypatch, record_property):
    tower_cls = type(loaded.model.vision_tower)
    calls = []
    original = tower_cls.__call__

    def counting(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(tower_cls, "__call__", counting)
    session = loaded.new_session(GREEDY)
    stats = session.prefill(image_prompt(loaded, image))
    assert len(calls) == 1 and session.images_encoded == 1
    run(session, 5)
    t0 = time.perf_counter()
    n = session.feed(FORCED)
    feed_s = time.perf_counter() - t0
    run(session, 5)
    assert len(calls) == 1 and session.images_encoded == 1
    assert session.n_past == stats.prompt_tokens + 5 + n + 5
    record_property("prefill_s", stats.prefill_s)
    record_property("feed_s", feed_s)
    print(
        f"[{loaded.quantization}] prefill {stats.prompt_tokens} tok ({stats.image_tokens} image) "
        f"{stats.prefill_s * 1000:.1f} ms, image encode {stats.image_encode_s * 1000:.1f} ms; "
        f"feed {n} tok {feed_s * 1000:.1f} ms"
    )


# -------------------------------------------------------------------------------------- sampling


def sampled_ids(loaded, image, seed, n=24, **kw):
    params = SamplingParams(temperature=1.0, top_p=1.0, top_k=0, repetition_penalty=1.0, seed=seed)
    params = SamplingParams(**{**params.__dict__, **kw})
    session = loaded.new_session(params)
    session.prefill(image_prompt(loaded, image))
    return [t.id for t in run(session, n)]


def test_same_seed_same_tokens_different_seed_differs(loaded, image):
    first = sampled_ids(loaded, image, seed=7)
    assert sampled_ids(loaded, image, seed=7) == first
    assert sampled_ids(loaded, image, seed=8) != first


def test_top_k_and_top_p_restrict_the_choice(loaded, image):
    import numpy as np

    session = loaded.new_session(SamplingParams(temperature=1.0, top_p=1.0, top_k=3, repetition_penalty=1.0))
    session.prefill(image_prompt(loaded, image))
    for _ in range(12):
        top3 = set(np.argsort(-session.last_logits())[:3].tolist())
        assert session.step().id in top3
    # a nucleus this small holds only the most likely token: sampling becomes greedy
    session = loaded.new_session(SamplingParams(temperature=1.0, top_p=1e-6, top_k=0, repetition_penalty=1.0))
    session.prefill(image_prompt(loaded, image))
    for _ in range(12):
        best = int(np.argmax(session.last_logits()))
        assert session.step().id == best


def test_repetition_penalty_avoids_tokens_in_context(loaded, image):
    prompt = image_prompt(loaded, image)
    session = loaded.new_session(SamplingParams(temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1e6))
    session.prefill(prompt)
    context = set(session.sampler.history)
    ids = [t.id for t in run(session, 10)]
    assert len(set(ids)) == len(ids)
    assert not set(ids) & context


def _sampling(session) -> dict:
    return {k: getattr(session.sampling, k) for k in DEFAULT_FAMILY.sampling}


def test_sampling_defaults_are_the_models_own(loaded, tmp_path):
    """Unset sampling values come from the model's generation_config.json, the rest from QVQ's values.

    The synthetic file's values differ from every fallback value, so a backend that ignored the file
    fails here; the same model without the file gets the fallback.
    """
    import shutil

    from qvq_local.backends import mlx as backend

    shipped = json.loads((loaded.model_dir / "generation_config.json").read_text())
    wanted = {k: shipped[k] for k in DEFAULT_FAMILY.sampling}
    assert all(wanted[k] != DEFAULT_FAMILY.sampling[k] for k in DEFAULT_FAMILY.sampling)
    session = loaded.new_session(SamplingParams())
    assert _sampling(session) == wanted
    session.close()
    session = loaded.new_session(SamplingParams(temperature=0.7))  # an explicit value wins, only for itself
    assert _sampling(session) == {**wanted, "temperature": 0.7}
    session.close()

    bare = tmp_path / "no-generation-config"
    shutil.copytree(loaded.model_dir, bare)
    (bare / "generation_config.json").unlink()
    other = backend.load(bare)
    try:
        session = other.new_session(SamplingParams())
        assert _sampling(session) == DEFAULT_FAMILY.sampling
        session.close()
    finally:
        other.close()


# ----------------------------------------------------------------------------------- text stream


def scripted(session, ids):
    """Make ``session.step`` pick ``ids`` in order (the forward pass and detokenizer stay real)."""
    import mlx.core as mx

    queue = list(ids)
    session.sampler.sample = lambda logits, banned=None: mx.array(queue.pop(0), dtype=mx.int32)


def test_multibyte_characters_stream_whole(loaded, image):
    text = "Naïve café: 日本語 🙂 — ünïcödé ✓"
    ids = loaded.tokenizer.encode(text, add_special_tokens=False)
    session = loaded.new_session(GREEDY)
    session.prefill(image_prompt(loaded, image))
    scripted(session, ids)
    pieces = [session.step().text for _ in ids]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    # the byte-level tokenizer splits at least one character across tokens: those tokens emit ""
    assert pieces.count("") > 0


def test_sampled_stream_concatenates_to_decoded_ids(loaded, image):
    session = loaded.new_session(
        SamplingParams(temperature=1.0, top_p=1.0, top_k=0, repetition_penalty=1.0, seed=3)
    )
    session.prefill(image_prompt(loaded, image))
    tokens = run(session, 40)
    ids = [t.id for t in tokens if not t.is_eos]
    decoded = loaded.tokenizer.decode(ids, skip_special_tokens=False)
    streamed = "".join(t.text for t in tokens)
    # everything streamed so far, in order; only an unfinished character at the very end may be held
    assert decoded.startswith(streamed)
    held = decoded[len(streamed) :]
    assert held == "" or held.endswith("\ufffd")


def test_eos_token_is_flagged(loaded, image):
    im_end = loaded.tokenizer.convert_tokens_to_ids("<|im_end|>")
    session = loaded.new_session(GREEDY)
    session.prefill(image_prompt(loaded, image))
    scripted(session, [im_end])
    token = session.step()
    assert token.id == im_end and token.is_eos and token.text == ""


# ----------------------------------------------------------------------------------------- context


def test_context_overflow_is_reported(loaded, image):
    prompt = image_prompt(loaded, image)
    with pytest.raises(ContextOverflow) as raised:
        loaded.new_session(GREEDY, n_ctx=10).prefill(prompt)
    assert_error(raised, "--max-pixels")
    probe = loaded.new_session(GREEDY)
    needed = probe.prefill(prompt).prompt_tokens
    session = loaded.new_session(GREEDY, n_ctx=needed + 2)
    session.prefill(prompt)
    run(session, 2)
    with pytest.raises(ContextOverflow) as raised:
        session.step()
    assert_error(raised, f"context holds {needed + 2}")
    roomy = loaded.new_session(GREEDY, n_ctx=needed + 3)
    roomy.prefill(prompt)
    with pytest.raises(ContextOverflow):
        roomy.feed(FORCED)
    assert roomy.n_past == needed  # a refused feed leaves the cache as it was


# ------------------------------------------------------------------------------ compute dtype (CPU)


def test_auto_compute_dtype_is_float32_for_half_scales_on_cpu():
    """MLX's CPU backend has no native bf16 arithmetic: 4-bit layers with bf16 scales get f32 activations."""
    from types import SimpleNamespace

    import mlx.core as mx
    import mlx.nn as nn

    from qvq_local.backends.mlx_session import activation_dtype as _activation_dtype

    def fake_lm(scale_dtype):
        linear = nn.Linear(64, 64)
        linear.set_dtype(scale_dtype)
        layer = SimpleNamespace(mlp=SimpleNamespace(gate_proj=nn.QuantizedLinear.from_linear(linear)))
        return SimpleNamespace(model=SimpleNamespace(layers=[layer]))

    assert _activation_dtype(mx, fake_lm(mx.float32), "auto") is None  # already f32: nothing to change
    assert _activation_dtype(mx, fake_lm(mx.bfloat16), None) is None
    assert _activation_dtype(mx, fake_lm(mx.float32), "bfloat16") == mx.bfloat16
    expected = mx.float32 if mx.default_device() == mx.cpu else None
    assert _activation_dtype(mx, fake_lm(mx.bfloat16), "auto") == expected
