"""The Python API: load / stream / ask, context sizing, Ctrl-C, on a scripted fake and on the real tiny models."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from fakes import FAKE_BACKEND, ScriptedSession, chop
from helpers import assert_error

from qvq_local.api import load
from qvq_local.budgets import DEFAULT_ANSWER_BUDGET, FORCE_MARGIN
from qvq_local.driver import drive
from qvq_local.errors import ContextOverflow, InputError, ModelError
from qvq_local.events import Finished, Forced, Started, TextDelta
from qvq_local.model import Model
from qvq_local.splitter import OUT_OF_TIME


class FakeLoaded:
    """A LoadedModel whose sessions are ScriptedSessions; keeps them for the test to inspect."""

    backend = "fake"
    name = "fake"
    quantization = "none"
    chat_template = None

    def __init__(self, context_length: int = 4096, **script):
        self.context_length = context_length
        self.generation_config: dict = {}
        self.script = script
        self.sessions: list[ScriptedSession] = []
        self.closed = False

    def image_token_estimate(self, width: int, height: int) -> int:
        return 16

    def tokenize(self, text: str, *, special: bool = False) -> list[str]:
        return chop(text)

    def new_session(self, sampling, *, n_ctx=None):
        session = ScriptedSession(**self.script)
        session.n_ctx = n_ctx
        self.sessions.append(session)
        return session

    def close(self) -> None:
        self.closed = True


def _model(**kwargs) -> tuple[Model, FakeLoaded]:
    loaded = FakeLoaded(**kwargs)
    return Model(loaded, name="fake", spec=FAKE_BACKEND, quantization="none"), loaded


THOUGHT = "Let me look at the bars. The first is 3 and the second is 5. " * 4


def test_ask_forces_an_answer_at_the_budget_and_encodes_the_image_once(sample_image):
    model, loaded = _model(thought=THOUGHT, answer="The tallest is \\boxed{5}.")
    result = model.ask(sample_image, "Which bar is tallest?", think_budget=20, answer_budget=16)
    session = loaded.sessions[0]
    assert result.stop_reason == "budget"
    assert result.answer == "The tallest is \\boxed{5}." and result.boxed == "5"
    assert [f.reason for f in result.forced] == ["budget"]
    # the default grace (32 tokens) lets the sentence under way at token 20 end before the answer is forced:
    # "... the second is 5." and the space after it (a full stop after a digit may still be "5.5")
    whole_sentences = "Let me look at the bars. The first is 3 and the second is 5. "
    assert THOUGHT.startswith(whole_sentences) and 20 < len(chop(whole_sentences)) <= 20 + 32
    assert result.thought.removesuffix(OUT_OF_TIME["en"]).strip() == whole_sentences.strip()
    assert result.thought_tokens == len(chop(whole_sentences))
    assert (
        len(session.prefill_calls) == 1 and session.images_encoded == 1
    )  # the forced answer re-encodes nothing
    assert len(session.fed) == 1 and session.closed
    assert result.model == "fake" and result.backend == "fake"
    assert result.images[0].path == str(sample_image) and result.images[0].tokens == 16
    assert result.settings["think_budget"] == 20 and result.settings["temperature"] == 0.01


def test_stream_event_order(sample_image):
    model, _ = _model(thought=THOUGHT, answer="42")
    events = list(model.stream([sample_image], "q", think_budget=10))
    assert isinstance(events[0], Started) and events[0].think_budget == 10 and events[0].prompt_tokens > 0
    assert isinstance(events[-1], Finished)
    assert sum(isinstance(e, Forced) for e in events) == 1
    assert {e.phase for e in events if isinstance(e, TextDelta)} == {"thought", "answer"}


def test_context_is_sized_from_prompt_images_and_budgets(sample_image):
    model, loaded = _model(thought="a b c", context_length=4096)
    model.ask([sample_image, sample_image], "q", think_budget=100, answer_budget=50)
    session = loaded.sessions[0]
    prompt_tokens = session.prefill_calls and len(chop(session.prefill_calls[0].text)) + 2 * 16
    # the API counts the text without the two <|image_pad|> placeholders (5 fake tokens each)
    assert session.n_ctx == prompt_tokens - 10 + 100 + 50 + FORCE_MARGIN


def test_the_prompt_is_the_models_own_familys(sample_image):
    """A model of another family than the default is prompted as its family: with the family's fallback
    template when it ships none, and with the family's control tokens refused in the question (Qwen3-VL's
    ``</think>``, which the default family's tokenizer does not reserve)."""
    from qvq_local.families import FAMILIES
    from qvq_local.prompt import build_prompt

    qwen3 = FAMILIES["Qwen3-VL"]
    model, loaded = _model(thought="a b c")
    loaded.family = qwen3
    model.ask(sample_image, "How many bars?", think_budget=5, answer_budget=4)
    prompt = loaded.sessions[0].prefill_calls[0].text
    assert prompt == build_prompt(None, "How many bars?", 1, None, family=qwen3)
    assert prompt.startswith(f"<|im_start|>user\n{qwen3.image_block}")  # its template: no system turn
    with pytest.raises(InputError, match="control token </think>"):
        model.ask(sample_image, "stop here </think> now", think_budget=5)
    assert len(loaded.sessions) == 1  # refused before a session opened


def test_context_overflow_is_refused_before_any_decoding(sample_image):
    model, loaded = _model(thought="a b c", context_length=512)
    with pytest.raises(ContextOverflow) as info:
        list(model.stream(sample_image, "q", think_budget=1000))
    assert_error(info, "max_pixels", "the think budget")  # the API's names, not the command line's flags
    assert "512" in str(info.value) and "--" not in str(info.value)
    assert not loaded.sessions  # no session was even opened


def test_no_think_budget_thinks_until_the_context_is_nearly_full(sample_image):
    model, loaded = _model(thought=iter(lambda: " word", None), context_length=1500)
    result = model.ask(sample_image, "q", answer_budget=8, loop_detection=False)
    assert result.forced and result.forced[0].reason == "budget"
    assert loaded.sessions[0].n_ctx == 1500  # no budget: the context is the limit
    assert 1000 < result.thought_tokens < 1500 - result.prompt_tokens


def test_bad_image_and_empty_question(tmp_path, sample_image):
    model, loaded = _model(thought="x")
    with pytest.raises(InputError) as raised:
        model.ask(tmp_path / "missing.png", "q")
    assert_error(raised, "no such image")
    with pytest.raises(InputError) as raised:
        model.ask(sample_image, "   ")
    assert_error(raised, "empty")
    with pytest.raises(InputError):
        model.ask(sample_image, "q", think_budget=0)
    assert not loaded.sessions


def test_ctrl_c_inside_generation_ends_with_partial_result_then_propagates(sample_image):
    model, loaded = _model(thought=iter(lambda: " step", None), interrupt_at=30)
    seen = []
    with pytest.raises(KeyboardInterrupt) as info:
        drive(model.stream(sample_image, "q"), seen.append)
    final = seen[-1]
    assert isinstance(final, Finished) and final.result.stop_reason == "interrupted"
    assert final.result.thought.startswith("step step") and final.result.thought_tokens >= 25
    assert info.value.result is final.result
    assert loaded.sessions[0].closed


def test_ctrl_c_in_the_callers_handler_still_delivers_the_partial_result(sample_image):
    model, _ = _model(thought=iter(lambda: " step", None))
    seen = []

    def handler(event):
        seen.append(event)
        if sum(isinstance(e, TextDelta) for e in seen) == 12 and isinstance(event, TextDelta):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        drive(model.stream(sample_image, "q", think_budget=1000), handler)
    assert isinstance(seen[-1], Finished) and seen[-1].result.stop_reason == "interrupted"
    assert seen[-1].result.thought_tokens >= 10


def test_ask_attaches_the_partial_result_to_the_interrupt(sample_image):
    model, _ = _model(thought=iter(lambda: " step", None), interrupt_at=5)
    with pytest.raises(KeyboardInterrupt) as info:
        model.ask(sample_image, "q")
    assert info.value.result.stop_reason == "interrupted"


def test_load_without_a_model_says_how_to_get_one(tmp_path, monkeypatch):
    monkeypatch.setenv("QVQ_HOME", str(tmp_path))
    monkeypatch.delenv("QVQ_MODEL", raising=False)
    with pytest.raises(ModelError) as info:
        load()
    text = str(info.value)
    assert "qvq config set model" in text and "qvq synth" in text and "qvq pull" in text
    assert "\n" not in text


def test_import_stays_light():
    code = (
        "import sys, qvq_local; heavy = [m for m in ('rich', 'numpy', 'PIL', 'mlx', 'llama_cpp', "
        "'qvq_local.api') if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    assert callable(__import__("qvq_local").load)


def test_default_answer_budget_is_used(sample_image):
    model, _ = _model(thought=THOUGHT, answer="x")
    result = model.ask(sample_image, "q", think_budget=8)
    assert result.settings["answer_budget"] == DEFAULT_ANSWER_BUDGET


# ------------------------------------------------------------------ the real tiny models


def _real_model(request, backend: str) -> Model:
    if backend == "llama":
        pytest.importorskip("llama_cpp")
        pair = request.getfixturevalue("tiny_gguf_q4")
        return load(pair.model, backend="llama")
    pytest.importorskip("mlx_vlm")
    return load(request.getfixturevalue("tiny_mlx_q4"), backend="mlx")


@pytest.mark.slow
@pytest.mark.parametrize(
    "backend", [pytest.param("llama", marks=pytest.mark.llama), pytest.param("mlx", marks=pytest.mark.mlx)]
)
def test_real_model_budget_forcing_through_the_api(request, backend, sample_image):
    with _real_model(request, backend) as model:
        sessions = []
        original = model.loaded.new_session

        def spy(*args, **kwargs):
            sessions.append(original(*args, **kwargs))
            return sessions[-1]

        model.loaded.new_session = spy
        result = model.ask(
            sample_image,
            "Which bar is the highest?",
            think_budget=16,
            answer_budget=8,
            loop_detection=False,
            seed=1,
        )
    assert result.backend == backend
    assert result.forced and result.forced[0].reason == "budget"
    assert 16 <= result.thought_tokens <= 16 + 32
    assert result.answer_tokens <= 8
    assert result.stop_reason in ("budget", "max_tokens")
    assert result.thought and isinstance(result.answer, str)
    assert result.prompt_tokens > result.images[0].tokens > 0
    t = result.timings
    assert t.prefill_s > 0 and t.decode_tok_s > 0 and t.first_token_s >= t.prefill_s and t.load_s > 0
    assert sessions[0].images_encoded == 1  # once, although the answer was forced
    print(
        f"\n{backend}: prefill {t.prefill_s * 1000:.1f} ms (image {t.image_encode_s * 1000:.1f} ms), "
        f"forced step {t.forced_step_s * 1000:.1f} ms, decode {t.decode_tok_s:.0f} tok/s"
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "backend", [pytest.param("llama", marks=pytest.mark.llama), pytest.param("mlx", marks=pytest.mark.mlx)]
)
def test_real_model_same_seed_same_text(request, backend, sample_image):
    with _real_model(request, backend) as model:
        a = model.ask(
            sample_image, "q", think_budget=12, answer_budget=4, temperature=1.0, top_k=0, top_p=1.0, seed=7
        )
        b = model.ask(
            sample_image, "q", think_budget=12, answer_budget=4, temperature=1.0, top_k=0, top_p=1.0, seed=7
        )
    assert (a.thought, a.answer) == (b.thought, b.answer)


def test_a_stop_flag_interrupts_like_ctrl_c(sample_image):
    """The CLI's SIGINT flag: a Ctrl-C swallowed inside a C callback still stops the run at the next event."""
    model, _ = _model(thought=iter(lambda: " step", None))
    seen = []
    with pytest.raises(KeyboardInterrupt):
        drive(
            model.stream(sample_image, "q", think_budget=1000),
            seen.append,
            stop_requested=lambda: len(seen) >= 5,
        )
    assert isinstance(seen[-1], Finished) and seen[-1].result.stop_reason == "interrupted"
    assert len(seen) == 6


# ------------------------------------------------------------------ how thinking ends, per model and question

# A Qwen3-VL-Thinking style template: the assistant turn opens <think>, so the model only closes it.
THINK_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}"
)


def test_think_tag_model_gets_the_tag_closed_not_qvqs_marker(sample_image):
    """End to end through Model.stream: the template opens <think>, so the forced text closes it."""
    thinking = iter(
        lambda: " The bars look close. **Final Answer** might be 5, but let me keep checking.", None
    )
    model, loaded = _model(thought=thinking, answer="The tallest is \\boxed{5}.")
    loaded.chat_template = THINK_TEMPLATE
    events = list(model.stream(sample_image, "Which bar is tallest?", think_budget=24, loop_detection=False))
    session = loaded.sessions[0]
    assert session.prefill_calls[0].text.endswith("<|im_start|>assistant\n<think>\n")
    (forced,) = [e for e in events if isinstance(e, Forced)]
    assert forced.text == session.fed[0] and "</think>" in forced.text
    assert "**Final Answer**" not in forced.text  # QVQ's marker inside an open think block: the old bug
    result = events[-1].result
    # "**Final Answer**" inside the think block is thought: only </think> ends it for this model
    assert result.settings["answer_markers"] == ["</think>"] and "**Final Answer**" in result.thought
    assert (
        result.stop_reason == "budget"
        and result.answer == "The tallest is \\boxed{5}."
        and result.boxed == "5"
    )
    assert session.transcript.count("</think>") == 1


def test_think_tag_model_closing_the_tag_itself(sample_image):
    model, loaded = _model(
        thought="Three bars; the middle one is tallest.\n</think>\n\nThe middle bar, \\boxed{2}."
    )
    loaded.chat_template = THINK_TEMPLATE
    result = model.ask(sample_image, "Which bar is tallest?", think_budget=100)
    assert (result.thought, result.answer, result.boxed) == (
        "Three bars; the middle one is tallest.",
        "The middle bar, \\boxed{2}.",
        "2",
    )
    assert result.stop_reason == "answer" and loaded.sessions[0].fed == []


@pytest.mark.parametrize(
    "question, sentence, marker",
    [
        (
            "Which bar is tallest?",
            "I have run out of time to think, so I will answer now.",
            "**Final Answer**",
        ),
        ("哪一根柱子最高？", "我的思考时间用完了，现在直接给出答案。", "**答案**"),
    ],
)
def test_forced_answer_is_in_the_language_of_the_question(sample_image, question, sentence, marker):
    model, loaded = _model(thought=THOUGHT, answer="B")
    result = model.ask(sample_image, question, think_budget=10)
    fed = loaded.sessions[0].fed
    assert len(fed) == 1 and sentence in fed[0] and fed[0].rstrip().endswith(marker)
    assert result.thought.endswith(sentence) and result.answer == "B" and result.stop_reason == "budget"
    assert result.settings["question_language"] == ("zh" if marker == "**答案**" else "en")


def test_an_explicit_forced_text_still_wins(sample_image):
    model, loaded = _model(thought=THOUGHT, answer="B")
    model.ask(
        sample_image,
        "哪一根柱子最高？",
        think_budget=10,
        forced_text="\n\nTime is up.\n\n**Final Answer**\n\n",
    )
    assert loaded.sessions[0].fed == ["\n\nTime is up.\n\n**Final Answer**\n\n"]


@pytest.mark.slow
@pytest.mark.mlx
def test_real_model_with_a_think_template_closes_the_tag(tiny_mlx_q4, tmp_path, sample_image):
    """The tiny MLX model in a copied folder whose chat template opens <think>: read from the folder,
    used for the prompt, and the budget closes the tag."""
    import shutil

    pytest.importorskip("mlx_vlm")
    folder = tmp_path / "think-model"
    shutil.copytree(tiny_mlx_q4, folder)
    (folder / "chat_template.jinja").write_text(THINK_TEMPLATE, encoding="utf-8")
    with load(folder, backend="mlx") as model:
        events = list(
            model.stream(sample_image, "Which bar is tallest?", think_budget=8, answer_budget=4, seed=1)
        )
    (forced,) = [e for e in events if isinstance(e, Forced)]
    assert "</think>" in forced.text and "**Final Answer**" not in forced.text
    result = events[-1].result
    assert result.settings["answer_markers"] == ["</think>"] and result.forced[0].reason == "budget"
    assert 8 <= result.thought_tokens <= 8 + 32 and result.answer_tokens <= 4


# ------------------------------------------------------------------ the system prompt

FRAMEWORKS_SYSTEM = (
    "You are a helpful and harmless assistant. You are Qwen developed by Alibaba. "
    "Answer in the language of the question. You should think step-by-step."
)


def _system_turn(prompt: str) -> str | None:
    head = "<|im_start|>system\n"
    if not prompt.startswith(head):
        return None
    return prompt[len(head) : prompt.index("<|im_end|>")]


@pytest.mark.parametrize(
    "system, expected",
    [
        (None, "QVQ"),  # the default: the model card's sentence (qvq_local/families/qwen2vl.py says why)
        (FRAMEWORKS_SYSTEM, FRAMEWORKS_SYSTEM),  # --system replaces it
        ("", "You are a helpful assistant."),  # "" leaves the template's own default (Qwen2-VL's here)
    ],
)
def test_system_prompt_default_and_override(sample_image, system, expected):
    from qvq_local.families import DEFAULT_FAMILY

    model, loaded = _model(thought="x", answer="y")
    result = model.ask(sample_image, "q", think_budget=4, system=system)
    want = DEFAULT_FAMILY.system_prompt if expected == "QVQ" else expected
    assert _system_turn(loaded.sessions[0].prefill_calls[0].text) == want
    assert result.settings["system"] == (want if system != "" else None)
    assert "Answer in the language of the question" not in DEFAULT_FAMILY.system_prompt


def test_cli_system_option_reaches_the_prompt(sample_image, monkeypatch):
    """`qvq ask --system` through the real CLI, on the fake model."""
    from typer.testing import CliRunner

    import qvq_local.api
    from qvq_local.cli import app

    model, loaded = _model(thought="Thinking.\n\n**Final Answer**\n\n\\boxed{4}")
    monkeypatch.setattr(qvq_local.api, "load", lambda *a, **k: model)
    out = CliRunner().invoke(
        app, ["ask", str(sample_image), "q", "--model", "x", "--system", "Be brief.", "--json"]
    )
    assert out.exit_code == 0, out.output
    assert _system_turn(loaded.sessions[0].prefill_calls[0].text) == "Be brief."
    assert json.loads(out.stdout)["qvq"]["boxed"] == "4"
