"""Earlier turns through the Python API (``Model.stream/ask(history=...)``): the prompt they render, the
reasoning of earlier replies dropped, the images of earlier turns kept in the prefix cache (a follow-up
encodes no image), the same answer as with no cache at all, and the budgets of the new turn alone."""

from __future__ import annotations

import pytest
from fakes import FAKE_BACKEND
from helpers import assert_error
from test_api import FakeLoaded

from qvq_local.conversation import Turn
from qvq_local.errors import InputError
from qvq_local.families import DEFAULT_FAMILY
from qvq_local.model import Model

BLOCK = DEFAULT_FAMILY.image_block
ASK = {"think_budget": 12, "answer_budget": 6, "seed": 0}


def _fake() -> tuple[Model, FakeLoaded]:
    loaded = FakeLoaded(thought="Looking at the bars. " * 3, answer="It is \\boxed{4}.")
    return Model(loaded, name="fake", spec=FAKE_BACKEND, quantization="none"), loaded


def test_earlier_turns_reach_the_prompt_with_answers_only(sample_image):
    model, loaded = _fake()
    reply = "Let me count the bars one by one. There are five.\n\n**Final Answer**\n\nFive bars."
    history = [Turn.user("How many bars?", [sample_image]), Turn.assistant(reply)]
    result = model.ask([], "Which is tallest?", history=history, think_budget=8, answer_budget=8)
    text = loaded.sessions[0].prefill_calls[0].text
    assert f"<|im_start|>user\n{BLOCK}How many bars?<|im_end|>" in text
    assert "<|im_start|>assistant\nFive bars.<|im_end|>" in text  # the thought and marker dropped
    assert "one by one" not in text
    assert text.endswith("<|im_start|>user\nWhich is tallest?<|im_end|>\n<|im_start|>assistant\n")
    assert len(loaded.sessions[0].prefill_calls[0].images) == 1  # the earlier turn's image
    assert [i.path for i in result.images] == [str(sample_image)]
    assert result.settings["earlier_turns"] == 2
    assert result.thought_tokens <= 8 + 32  # the budget is the new turn's


def test_a_think_block_is_dropped_for_a_think_tag_model(sample_image):
    from qvq_local.families import FAMILIES

    model, loaded = _fake()
    loaded.chat_template = FAMILIES["Qwen3-VL"].fallback_chat_template.replace(
        "<|im_start|>assistant\n{% endif %}", "<|im_start|>assistant\n<think>\n{% endif %}"
    )
    assert "<think>" in loaded.chat_template  # a template that opens a think block: </think> alone ends it
    history = [Turn.user("How many?", [sample_image]), Turn.assistant("<think>\ncounting\n</think>\n\nFive.")]
    model.ask([], "Tallest?", history=history, think_budget=8)
    text = loaded.sessions[0].prefill_calls[0].text
    assert "counting" not in text and "<|im_start|>assistant\nFive.<|im_end|>" in text


def test_conversations_without_any_image_or_with_a_broken_turn_are_refused(sample_image):
    model, loaded = _fake()
    with pytest.raises(InputError) as err:
        model.ask([], "q", history=[Turn.user("hi"), Turn.assistant("hello")])
    assert_error(err, "no image given")
    with pytest.raises(InputError) as err:
        model.ask(sample_image, "q", history=[Turn.user("hi"), Turn("assistant", "x", (sample_image,))])
    assert_error(err, "history\\[1\\]: an assistant turn cannot hold images")
    with pytest.raises(InputError) as err:
        model.ask(sample_image, "q", history=[Turn.user("a \ud800 b")])
    assert_error(err, "history\\[0\\] holds a lone UTF-16 surrogate")
    assert not loaded.sessions  # refused before any session opened


def _second_turn_encodes_nothing(model, sample_image):
    opened = []
    original = model.loaded.new_session

    def new_session(*args, **kwargs):
        opened.append(original(*args, **kwargs))
        return opened[-1]

    model.loaded.new_session = new_session
    first = model.ask(sample_image, "Which bar is highest?", **ASK)
    history = [
        Turn.user("Which bar is highest?", [sample_image]),
        Turn.assistant(first.answer or "The fourth."),
    ]
    second = model.ask([], "And the lowest?", history=history, **ASK)
    assert [s.images_encoded for s in opened] == [1, 0]  # turn 2 restored turn 1's image prefix
    assert first.settings["prefix_cache"]["source"] == "fresh"
    assert second.settings["prefix_cache"]["source"] == "memory"
    # the same as with no cache at all: the restore is exact
    model.prefix_cache = None
    plain = model.ask([], "And the lowest?", history=history, **ASK)
    assert opened[-1].images_encoded == 1
    assert (plain.thought, plain.answer) == (second.thought, second.answer)


@pytest.mark.llama
def test_llama_second_turn_reuses_the_first_turns_image(tiny_gguf_q4, sample_image):
    pytest.importorskip("llama_cpp")
    from qvq_local.api import load

    with load(tiny_gguf_q4.model, backend="llama") as model:
        _second_turn_encodes_nothing(model, sample_image)


@pytest.mark.mlx
def test_mlx_second_turn_reuses_the_first_turns_image(tiny_mlx_f32, sample_image):
    pytest.importorskip("mlx_vlm")
    from qvq_local.api import load

    with load(tiny_mlx_f32, backend="mlx") as model:
        _second_turn_encodes_nothing(model, sample_image)


@pytest.mark.llama
def test_llama_a_new_image_in_a_later_turn_encodes_only_that_image(tiny_gguf_q4, sample_image, tmp_path):
    """Turn 2 brings a second image: turn 1's state (at its image) is restored and only the new image is
    encoded (the registry's partial_prefix); turn 3 restores the state at turn 2's image whole.  Every
    answer equals the one with no cache at all."""
    pytest.importorskip("llama_cpp")
    from PIL import Image

    from qvq_local.api import load

    other = tmp_path / "other.png"
    Image.new("RGB", (168, 112), (30, 160, 90)).save(other)
    with load(tiny_gguf_q4.model, backend="llama") as model:
        opened = []
        original = model.loaded.new_session

        def new_session(*args, **kwargs):
            opened.append(original(*args, **kwargs))
            return opened[-1]

        model.loaded.new_session = new_session
        first = model.ask(sample_image, "Which bar is highest?", **ASK)
        history = [
            Turn.user("Which bar is highest?", [sample_image]),
            Turn.assistant(first.answer or "The fourth."),
        ]
        second = model.ask([other], "And in this one?", history=history, **ASK)
        history += [Turn.user("And in this one?", [other]), Turn.assistant(second.answer or "Green.")]
        third = model.ask([], "Which is brighter?", history=history, **ASK)
        assert [s.images_encoded for s in opened] == [1, 1, 0]
        assert [r.settings["prefix_cache"]["images_reused"] for r in (first, second, third)] == [0, 1, 2]
        assert second.settings["prefix_cache"]["source"] == "memory"
        model.prefix_cache = None  # no cache: the same answers
        plain_second = model.ask([other], "And in this one?", history=history[:2], **ASK)
        plain_third = model.ask([], "Which is brighter?", history=history, **ASK)
        assert [s.images_encoded for s in opened[3:]] == [2, 2]
        assert (plain_second.thought, plain_second.answer) == (second.thought, second.answer)
        assert (plain_third.thought, plain_third.answer) == (third.thought, third.answer)
