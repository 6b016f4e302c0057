"""Prefix state on both backends: a restored image prefix gives the same next-token logits as a fresh
prefill, and the image is not encoded again.  (The cache policy around it: tests/test_prefix_cache.py.)"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import assert_error

from qvq_local.backends.base import Prompt, SamplingParams
from qvq_local.errors import InputError
from qvq_local.prompt import build_prompt, load_chat_template

Q1 = "Which bar is the tallest, and by how much?"
Q2 = "What colour is the background?"


@pytest.fixture(scope="module")
def image(sample_image):
    from PIL import Image

    with Image.open(sample_image) as img:
        return img.convert("RGB")


@pytest.fixture(scope="module")
def prompts(tiny_checkpoint, image):
    template = load_chat_template(tiny_checkpoint)
    return [Prompt(text=build_prompt(template, q, 1), images=[image]) for q in (Q1, Q2)]


def _roundtrip(loaded, prompts, n_ctx=2048):
    """Fresh prefill of question 2 vs question 2 restored from question 1's prefix."""
    first = loaded.new_session(SamplingParams(), n_ctx=n_ctx)
    first.prefill(prompts[0], keep_prefix=True)
    state = first.prefix_state
    first.close()
    assert state is not None and state.n_cells > 0 and state.nbytes > 0
    fresh = loaded.new_session(SamplingParams(), n_ctx=n_ctx)
    fresh_stats = fresh.prefill(prompts[1])
    reused = loaded.new_session(SamplingParams(), n_ctx=n_ctx)
    reused_stats = reused.prefill(prompts[1], prefix=state)
    assert fresh.images_encoded == 1 and reused.images_encoded == 0
    assert reused_stats.prompt_tokens == fresh_stats.prompt_tokens
    assert reused_stats.image_tokens == fresh_stats.image_tokens
    assert reused.n_past == fresh.n_past
    a, b = fresh.last_logits(), reused.last_logits()
    # and one generated token later, too (positions after the restored prefix are right)
    ta, tb = fresh.step(), reused.step()
    a2, b2 = fresh.last_logits(), reused.last_logits()
    for s in (fresh, reused):
        s.close()
    return state, a, b, (ta.id, tb.id), a2, b2


def _check_equal(a, b, a2, b2, ids):
    err = max(float(np.abs(a - b).max()), float(np.abs(a2 - b2).max()))
    print(f"prefix reuse max |logit diff| = {err:.3g}")
    assert ids[0] == ids[1]
    assert err <= 1e-5, err


def _mismatch(loaded, state, tiny_checkpoint, image):
    """A state used with another system prompt is refused, naming why."""
    other = Prompt(
        text=build_prompt(load_chat_template(tiny_checkpoint), Q2, 1, "A different system prompt."),
        images=[image],
    )
    session = loaded.new_session(SamplingParams(), n_ctx=2048)
    with pytest.raises(InputError) as err:
        session.prefill(other, prefix=state)
    assert_error(err.value, "prefix", "does not match")
    session.close()


@pytest.mark.llama
@pytest.mark.parametrize("fixture", ["tiny_gguf_f32", "tiny_gguf_q4"])
def test_llama_prefix_restore_equals_fresh(fixture, request, prompts, tiny_checkpoint, image):
    pytest.importorskip("llama_cpp")
    from qvq_local.backends import llamacpp

    files = request.getfixturevalue(fixture)
    loaded = llamacpp.load(files.model, files.mmproj)
    try:
        state, a, b, ids, a2, b2 = _roundtrip(loaded, prompts)
        _check_equal(a, b, a2, b2, ids)
        _mismatch(loaded, state, tiny_checkpoint, image)
    finally:
        loaded.close()


@pytest.mark.mlx
@pytest.mark.parametrize("fixture", ["tiny_mlx_f32", "tiny_mlx_q4"])
def test_mlx_prefix_restore_equals_fresh(fixture, request, prompts, tiny_checkpoint, image):
    pytest.importorskip("mlx_vlm")
    from qvq_local.backends import mlx

    loaded = mlx.load(request.getfixturevalue(fixture))
    try:
        state, a, b, ids, a2, b2 = _roundtrip(loaded, prompts)
        _check_equal(a, b, a2, b2, ids)
        _mismatch(loaded, state, tiny_checkpoint, image)
    finally:
        loaded.close()


@pytest.mark.llama
def test_llama_a_state_at_an_earlier_image_restores_and_encodes_only_the_later_ones(
    tiny_gguf_f32, prompts, tiny_checkpoint, image
):
    """The registry's partial_prefix: a conversation's turn 1 state (its image) under turn 2's prompt
    (turn 1, its answer, a new image): the same logits as a fresh prefill, one image encoded, and the kept
    state is the one at the new last image (restored whole next, encoding nothing)."""
    pytest.importorskip("llama_cpp")
    from PIL import Image

    from qvq_local.backends import llamacpp
    from qvq_local.conversation import Turn

    second_image = Image.new("RGB", (168, 112), (30, 160, 90))
    history = [Turn.user(Q1, ["turn 1's image"]), Turn.assistant("The fourth, by 30.")]
    text = build_prompt(load_chat_template(tiny_checkpoint), Q2, 1, history=history)
    turn2 = Prompt(text=text, images=[image, second_image])
    loaded = llamacpp.load(tiny_gguf_f32.model, tiny_gguf_f32.mmproj)
    try:
        first = loaded.new_session(SamplingParams(), n_ctx=2048)
        first.prefill(prompts[0], keep_prefix=True)
        state = first.prefix_state
        first.close()
        fresh = loaded.new_session(SamplingParams(), n_ctx=2048)
        fresh.prefill(turn2, keep_prefix=True)
        reused = loaded.new_session(SamplingParams(), n_ctx=2048)
        reused.prefill(turn2, prefix=state, keep_prefix=True)
        assert (fresh.images_encoded, reused.images_encoded) == (2, 1)
        assert reused.n_past == fresh.n_past
        a, b = fresh.last_logits(), reused.last_logits()
        ids = (fresh.step().id, reused.step().id)
        _check_equal(a, b, fresh.last_logits(), reused.last_logits(), ids)
        kept = reused.prefix_state
        assert (
            kept.meta["image_tokens"] == fresh.prefix_state.meta["image_tokens"]
            and len(kept.meta["image_tokens"]) == 2
        )
        for s in (fresh, reused):
            s.close()
        whole = loaded.new_session(SamplingParams(), n_ctx=2048)
        whole.prefill(turn2, prefix=kept)
        assert whole.images_encoded == 0
        whole.close()
    finally:
        loaded.close()
