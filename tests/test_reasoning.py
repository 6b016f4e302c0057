"""The reasoning controller on scripted streams: split, budget forcing, loops, stop reasons, boxed answers."""

from __future__ import annotations

import itertools
import random

import pytest
from fakes import ScriptedSession, chop
from helpers import assert_error

from qvq_local.backends.base import Prompt
from qvq_local.errors import InputError
from qvq_local.events import Finished, Forced, TextDelta
from qvq_local.loops import LoopDetector, LoopSettings
from qvq_local.reasoning import ReasoningConfig, run_reasoning
from qvq_local.splitter import (
    DEFAULT_FORCED_TEXT,
    OUT_OF_TIME,
    ThoughtAnswerSplitter,
    infer_answer,
    split_text,
)

MARKER = "**Final Answer**"

QVQ_TEXT = (
    "Let me look at the chart. The first bar is 3 and the second is 4.\n\n"
    "So the sum is 3 + 4 = 7.\n\n**Final Answer**\n\n\\[ \\boxed{7} \\]"
)
THINK_TEXT = "<think>\nThe bars are 3 and 4, so 7.\n</think>\n\nThe total is \\boxed{7}."
QWEN3_TEXT = "The bars are 3 and 4, so 7.\n</think>\n\nThe total is 7."


def run(session, **config):
    events = list(run_reasoning(session, ReasoningConfig(**config)))
    assert isinstance(events[-1], Finished)
    assert sum(isinstance(e, Finished) for e in events) == 1
    return events, events[-1].result


def joined(events, phase):
    return "".join(e.text for e in events if isinstance(e, TextDelta) and e.phase == phase)


def endless(text="word "):
    return itertools.cycle(chop(text))


# ------------------------------------------------------------------------------------------- split


@pytest.mark.parametrize(
    "text, thought, answer, marker",
    [
        (
            QVQ_TEXT,
            "Let me look at the chart. The first bar is 3 and the second is 4.\n\nSo the sum is 3 + 4 = 7.",
            "\\[ \\boxed{7} \\]",
            MARKER,
        ),
        (THINK_TEXT, "The bars are 3 and 4, so 7.", "The total is \\boxed{7}.", "</think>"),
        (QWEN3_TEXT, "The bars are 3 and 4, so 7.", "The total is 7.", "</think>"),
        ("Thinking.\n**Final Answer:** 42", "Thinking.", "42", "**Final Answer:**"),
        ("No marker here.\n\nStill none.", "No marker here.\n\nStill none.", "", None),
        ("  <think>x<think>y", "x<think>y", "", None),  # only an opening tag at the very start is dropped
        ("a **Final Answer** b </think> c", "a", "b </think> c", MARKER),  # the first marker wins
    ],
)
def test_split_text(text, thought, answer, marker):
    assert split_text(text) == (thought, answer, marker)


@pytest.mark.parametrize(
    "text", [QVQ_TEXT, THINK_TEXT, QWEN3_TEXT, "No marker.\n\nAt all.", "<thi", "  \n  "]
)
@pytest.mark.parametrize("pieces", ["chop", "chars", "whole"])
def test_streaming_split_matches_whole_split(text, pieces):
    parts = {"chop": chop(text), "chars": list(text), "whole": [text]}[pieces]
    splitter = ThoughtAnswerSplitter()
    out = []
    for part in parts:
        out += splitter.feed(part)
    out += splitter.finish()
    thought = "".join(t for p, t in out if p == "thought")
    answer = "".join(t for p, t in out if p == "answer")
    expected = split_text(text)
    assert (thought, answer, splitter.marker) == expected
    assert (splitter.thought, splitter.answer) == expected[:2]


def test_splitter_holds_back_only_a_possible_marker_start():
    splitter = ThoughtAnswerSplitter()
    assert splitter.feed("The answer is near. **Final") == [("thought", "The answer is near.")]
    assert splitter.feed(" Answer** 5") == [("answer", "5")]
    splitter = ThoughtAnswerSplitter()
    assert splitter.feed("a < b and **bold** text") == [("thought", "a < b and **bold** text")]
    assert splitter.feed(" then **") == [("thought", " then")]  # "**" may start a marker


def test_custom_marker_is_used():
    cfg = ReasoningConfig(extra_marker="ANSWER:")
    assert "ANSWER:" in cfg.markers
    _events, result = run(ScriptedSession("Reasoning here.\nANSWER: blue"), extra_marker="ANSWER:")
    assert (result.thought, result.answer, result.stop_reason) == ("Reasoning here.", "blue", "answer")
    assert result.settings["answer_source"] == "marker"


def test_infer_answer_rule():
    assert infer_answer("Step one.\n\nStep two.\n\nThe answer is 4.") == (
        "Step one.\n\nStep two.",
        "The answer is 4.",
    )
    assert infer_answer("A plain reply.") == ("", "A plain reply.")


# ------------------------------------------------------------------------------------- controller


@pytest.mark.parametrize(
    "text, thought, answer",
    [
        (QVQ_TEXT, split_text(QVQ_TEXT)[0], "\\[ \\boxed{7} \\]"),
        (THINK_TEXT, "The bars are 3 and 4, so 7.", "The total is \\boxed{7}."),
        (QWEN3_TEXT, "The bars are 3 and 4, so 7.", "The total is 7."),
    ],
)
def test_model_answers_on_its_own(text, thought, answer):
    session = ScriptedSession(text)
    events, result = run(session, think_budget=10_000)
    assert (result.thought, result.answer) == (thought, answer)
    assert result.stop_reason == "answer"
    assert session.fed == [] and result.forced == []
    assert not any(isinstance(e, Forced) for e in events)
    assert joined(events, "thought") == result.thought and joined(events, "answer") == result.answer
    n_tokens = len(chop(text))
    assert result.thought_tokens + result.answer_tokens == n_tokens
    assert sum(e.tokens for e in events if isinstance(e, TextDelta)) == n_tokens
    assert result.prompt_tokens == 10


def test_boxed_is_extracted():
    _, result = run(ScriptedSession(QVQ_TEXT))
    assert result.boxed == "7"


def test_no_marker_last_paragraph_is_the_answer():
    text = "First I count the bars.\n\nThere are five.\n\nThe chart shows five bars."
    _events, result = run(ScriptedSession(text))
    assert result.stop_reason == "answer"
    assert result.thought == "First I count the bars.\n\nThere are five."
    assert result.answer == "The chart shows five bars."
    assert result.settings["answer_source"] == "last_paragraph"
    assert result.answer_tokens == len(chop(result.answer))
    assert result.thought_tokens + result.answer_tokens == len(chop(text))


def test_budget_forcing_stops_within_budget_plus_grace_and_feeds_marker_once():
    session = ScriptedSession(endless("word "), "The answer is \\boxed{3}.")
    session.prefill(Prompt(text="question", images=["img"]))
    prefills, encoded = len(session.prefill_calls), session.images_encoded
    events, result = run(session, think_budget=40, grace_tokens=8)
    assert result.stop_reason == "budget"
    assert 40 <= result.thought_tokens <= 40 + 8
    assert len(session.fed) == 1 and session.fed[0].endswith("**Final Answer**\n\n")
    assert session.transcript.count(MARKER) == 1
    assert MARKER not in result.thought + result.answer  # the marker is the boundary, on neither side
    assert result.thought.endswith("I have run out of time to think, so I will answer now.")
    assert result.answer == "The answer is \\boxed{3}." and result.boxed == "3"
    forced = [e for e in events if isinstance(e, Forced)]
    assert len(forced) == 1 and forced[0].reason == "budget" and forced[0].at_token == result.thought_tokens
    assert forced[0].text == session.fed[0] and result.forced == forced
    # the forced answer never re-encodes the image
    assert (len(session.prefill_calls), session.images_encoded) == (prefills, encoded)
    assert joined(events, "thought") == result.thought and joined(events, "answer") == result.answer
    # forced text deltas carry no tokens: generated tokens only
    assert sum(e.tokens for e in events if isinstance(e, TextDelta)) == session.steps - 1  # minus EOS


def test_budget_waits_for_a_sentence_end():
    sentence = chop("This is one short sentence of thought. ")
    session = ScriptedSession(itertools.cycle(sentence), "ok")
    _, result = run(session, think_budget=3, grace_tokens=20, loop=None)
    model_text = "".join(session.generated)[: -len("ok")]
    assert model_text.rstrip(" ").endswith(".")
    assert result.thought_tokens <= 3 + 20
    assert session.fed[0] == DEFAULT_FORCED_TEXT


def test_budget_grace_zero_forces_exactly_at_budget():
    session = ScriptedSession(endless("word "), "ok")
    _, result = run(session, think_budget=7, grace_tokens=0)
    assert result.thought_tokens == 7 and len(session.fed) == 1


#: The documented default grace after the budget (``ReasoningConfig.grace_tokens``), written out here on
#: purpose: a test that read the default from the code would follow it wherever a bug took it.
DEFAULT_GRACE = 32
BUDGET = 10


def word(i: int) -> str:
    """A distinct word for each ``i`` ("wb", "wc", ..., "wz", "wba", ...): letters only, since "w10." could still
    become a decimal number and does not end a sentence."""
    letters = ""
    while i:
        i, digit = divmod(i, 26)
        letters = "abcdefghijklmnopqrstuvwxyz"[digit] + letters
    return "w" + letters


def words_with_a_full_stop_at(position: int):
    """Endless distinct word tokens (" wb", " wc", ...: nothing for the loop detector), except token
    ``position`` (1-based), which ends the sentence with a full stop."""
    for i in itertools.count(1):
        yield "." if i == position else f" {word(i)}"


@pytest.mark.parametrize("after_budget", [1, DEFAULT_GRACE // 2, DEFAULT_GRACE])
def test_default_grace_forces_the_answer_right_after_a_sentence_ending_within_it(after_budget):
    """Without ``grace_tokens``, a thought whose sentence ends within 32 tokens of the budget is cut right
    after that full stop: the user reads a whole last sentence, then the forced one."""
    end = BUDGET + after_budget
    session = ScriptedSession(words_with_a_full_stop_at(end), "ok")
    events, result = run(session, think_budget=BUDGET)  # the default grace
    model_text = "".join(itertools.islice(words_with_a_full_stop_at(end), end)).strip()
    assert model_text.endswith(f" {word(end - 1)}.")
    assert result.thought == f"{model_text}\n\n{OUT_OF_TIME['en']}"
    assert result.thought_tokens == end
    assert [(f.reason, f.at_token) for f in result.forced] == [("budget", end)]
    assert result.answer == "ok"
    assert joined(events, "thought") == result.thought


def test_default_grace_cuts_a_sentence_still_going_at_budget_plus_32():
    """With no sentence end within the default grace, the thought is cut mid-sentence at budget + 32
    tokens; the full stop one token later never reaches the thought."""
    cut = BUDGET + DEFAULT_GRACE
    session = ScriptedSession(words_with_a_full_stop_at(cut + 1), "ok")
    _, result = run(session, think_budget=BUDGET)  # the default grace
    model_text = "".join(itertools.islice(words_with_a_full_stop_at(cut + 1), cut)).strip()
    assert model_text.endswith(f" {word(cut)}") and "." not in model_text
    assert result.thought == f"{model_text}\n\n{OUT_OF_TIME['en']}"
    assert result.thought_tokens == cut
    assert [(f.reason, f.at_token) for f in result.forced] == [("budget", cut)]
    assert "." not in "".join(session.generated)  # the full stop was never generated: the cut came first


def test_forced_text_drops_newlines_the_model_already_wrote():
    session = ScriptedSession(itertools.cycle(["line", "\n"]), "ok")
    _, _result = run(session, think_budget=2, grace_tokens=4, loop=None)
    assert session.fed == [DEFAULT_FORCED_TEXT[1:]]  # the model ended a line; one newline is enough
    assert "\n\n\n" not in session.transcript


def test_own_marker_before_budget_means_no_forcing():
    session = ScriptedSession("Short thought.\n\n**Final Answer**\n\n42")
    _events, result = run(session, think_budget=50)
    assert session.fed == [] and result.forced == [] and result.stop_reason == "answer"
    assert result.answer == "42"


def test_marker_within_grace_window_cancels_forcing():
    text = "a b c d e f g h i j k l **Final Answer** 42"
    session = ScriptedSession(text)
    _, result = run(session, think_budget=5, grace_tokens=30)  # no sentence end before the marker
    assert session.fed == [] and result.stop_reason == "answer" and result.answer == "42"


def test_custom_forced_text_without_a_marker_still_switches_to_answer():
    session = ScriptedSession(endless(), "blue")
    _, result = run(session, think_budget=4, grace_tokens=0, forced_text=" Time is up. Answer: ")
    assert result.answer == "blue" and result.thought.endswith("Time is up. Answer:")
    assert result.settings["answer_source"] == "forced"


def test_loop_forces_the_answer_with_reason_loop():
    sentence = "Wait, let me check the second bar again carefully to be sure. "
    session = ScriptedSession(itertools.cycle(chop(sentence)), "\\boxed{4}")
    events, result = run(session)
    forced = [e for e in events if isinstance(e, Forced)]
    assert [f.reason for f in forced] == ["loop"] and result.stop_reason == "loop"
    assert result.boxed == "4"
    assert result.thought.count(sentence.strip()) <= 6  # caught after a few repeats, not 10,000 tokens


def test_loop_inside_the_answer_stops():
    answer = itertools.cycle(chop("The answer is four, the answer is four, the answer is four. "))
    session = ScriptedSession(itertools.chain(chop("Thinking.\n**Final Answer**\n"), answer))
    _, result = run(session)
    assert session.fed == [] and result.stop_reason == "loop" and result.answer_tokens < 200


def test_answer_budget_exhausted_is_max_tokens():
    session = ScriptedSession(endless(), endless("yes "))
    _, result = run(session, think_budget=5, grace_tokens=0, answer_budget=12, loop=None)
    assert result.stop_reason == "max_tokens" and result.answer_tokens == 12


def test_max_tokens_caps_everything_and_leaves_room_for_an_answer():
    session = ScriptedSession(endless(), endless("yes "))
    _, result = run(session, max_tokens=100, answer_budget=20, grace_tokens=4, loop=None)
    assert session.steps <= 100
    assert result.stop_reason == "max_tokens"
    assert len(session.fed) == 1  # forced before the cap so that there is an answer at all
    assert result.answer_tokens == 20 and result.thought_tokens <= 100 - 20


def test_context_guard_forces_early_and_never_overflows():
    session = ScriptedSession(endless(), endless("yes "), n_ctx=200, prompt_tokens=50)
    _, result = run(session, think_budget=10_000, answer_budget=1000, grace_tokens=4, loop=None)
    assert len(session.fed) == 1 and result.forced[0].reason == "budget"
    assert session.n_past <= session.n_ctx
    assert result.stop_reason == "max_tokens" and result.answer_tokens > 0


def test_context_too_small_for_forcing_stops_cleanly():
    session = ScriptedSession(endless(), n_ctx=15, prompt_tokens=10)
    _, result = run(session)
    assert session.fed == [] and result.stop_reason == "max_tokens" and session.n_past <= 15


def test_eos_in_thought_without_marker():
    session = ScriptedSession("Just a reply without reasoning.")
    _, result = run(session, think_budget=100)
    assert result.stop_reason == "answer" and result.answer == "Just a reply without reasoning."


def test_ignore_eos_keeps_going():
    # benchmark mode: no answer reserve and no grace, so max_tokens is a plain cap and nothing is forced
    session = ScriptedSession("abc")  # one token, then EOS on every further step
    _, result = run(session, max_tokens=5, ignore_eos=True, loop=None, answer_reserve=0, grace_tokens=0)
    assert session.steps == 5 and result.stop_reason == "max_tokens" and result.thought == "abc"
    assert session.fed == []


def test_small_max_tokens_still_leaves_half_for_thinking():
    session = ScriptedSession(endless(), endless("yes "))
    _, result = run(session, max_tokens=40, loop=None)
    assert result.forced and result.thought_tokens == 20 and session.steps == 40


def test_sentence_end_detection():
    from qvq_local.reasoning import _at_boundary

    assert _at_boundary("It is red.") and _at_boundary("Is it? ") and _at_boundary("a line\n")
    assert _at_boundary('He said "stop."') and _at_boundary("The answer is 3. ")
    assert not _at_boundary("The value is 3.") and not _at_boundary("half a sent")


def test_default_forced_text_follows_the_template():
    from qvq_local.splitter import (
        THINK_TAG_FORCED_TEXT,
        ZH_FORCED_TEXT,
        ZH_THINK_TAG_FORCED_TEXT,
        default_forced_text,
        default_markers,
    )

    assert default_forced_text("{{ '<think>\\n' }}") == THINK_TAG_FORCED_TEXT
    assert default_forced_text(None) == DEFAULT_FORCED_TEXT
    assert default_forced_text("{{ '<think>\\n' }}", "哪一根柱子最高？") == ZH_THINK_TAG_FORCED_TEXT
    assert default_forced_text(None, "哪一根柱子最高？") == ZH_FORCED_TEXT
    assert default_forced_text(None, "Which bar is tallest?") == DEFAULT_FORCED_TEXT
    assert "</think>" in ZH_THINK_TAG_FORCED_TEXT and "**答案**" in ZH_FORCED_TEXT
    assert default_markers("{{ '<think>\\n' }}") == ("</think>",)
    assert "**答案**" in default_markers(None) and "**Final Answer**" in default_markers(None)
    session = ScriptedSession(endless(), "7")
    _, result = run(session, think_budget=3, grace_tokens=0, forced_text=THINK_TAG_FORCED_TEXT)
    assert session.transcript.count("</think>") == 1 and result.answer == "7"


def test_interrupt_inside_step_keeps_partial_output():
    session = ScriptedSession(endless("thinking hard. "), interrupt_at=30)
    _events, result = run(session)
    assert result.stop_reason == "interrupted"
    assert result.thought.startswith("thinking hard.") and result.thought_tokens == 29
    assert result.answer == ""


def test_interrupt_thrown_in_by_the_caller():
    session = ScriptedSession(endless("thinking hard. "))
    gen = run_reasoning(session, ReasoningConfig())
    seen = [next(gen) for _ in range(10)]
    final = gen.throw(KeyboardInterrupt)
    assert isinstance(final, Finished) and final.result.stop_reason == "interrupted"
    assert final.result.thought.startswith("".join(e.text for e in seen).strip()[:10])
    with pytest.raises(StopIteration):
        next(gen)


def test_result_base_and_timings_are_filled():
    from qvq_local.events import ImageInfo, Timings

    clock = itertools.count(0.0, 0.5).__next__
    base = {
        "model": "tiny",
        "backend": "fake",
        "quantization": "q4",
        "prompt_tokens": 99,
        "images": [ImageInfo("a.png", (10, 10), (56, 56), 4)],
        "settings": {"seed": 1},
        "timings": Timings(prefill_s=2.0),
    }
    session = ScriptedSession(endless(), "ok")
    events = list(
        run_reasoning(
            session,
            ReasoningConfig(think_budget=3, grace_tokens=0),
            result_base=base,
            started_at=-1.0,
            clock=clock,
        )
    )
    r = events[-1].result
    assert (r.model, r.backend, r.quantization, r.prompt_tokens) == ("tiny", "fake", "q4", 99)
    assert r.images[0].path == "a.png" and r.settings["seed"] == 1 and r.settings["think_budget"] == 3
    assert r.timings.prefill_s == 2.0 and r.timings.first_token_s > 1.0
    assert r.timings.decode_s > 0 and r.timings.decode_tok_s > 0 and r.timings.forced_step_s == 0.5
    assert r.to_dict()["stop_reason"] == "budget"


# ------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"think_budget": 0}, "think budget must be a positive"),
        ({"think_budget": -5}, "think budget must be a positive"),
        ({"answer_budget": 0}, "answer budget must be a positive"),
        ({"max_tokens": -1}, "max tokens must be a positive"),
        ({"grace_tokens": -1}, "grace tokens must be zero or more"),
        ({"think_budget": 1.5}, "whole number"),
        ({"think_budget": True}, "whole number"),
        ({"forced_text": "  "}, "forced text"),
        ({"extra_marker": ""}, "answer marker"),
    ],
)
def test_bad_config_is_an_input_error(kwargs, words):
    with pytest.raises(InputError) as info:
        ReasoningConfig(**kwargs)
    assert_error(info, words)
    assert "\n" not in str(info.value)


def test_bad_loop_settings():
    with pytest.raises(InputError):
        LoopSettings(min_span=0)
    with pytest.raises(InputError):
        LoopSettings(min_span=50, max_span=10)


# ------------------------------------------------------------------------------------ loop detector

VARIED = " ".join(
    f"Step {i}: the bar at position {i * 7 % 13} has height {i * i % 17}, which is {'more' if i % 3 else 'less'}"
    f" than the previous one by {i % 5} units."
    for i in range(200)
)


def feed_all(detector, text, size=4):
    for i in range(0, len(text), size):
        if detector.feed(text[i : i + size]):
            return detector.detected
    return detector.detected


def test_loop_detector_no_false_positive_on_varied_text():
    assert feed_all(LoopDetector(), VARIED) is None


@pytest.mark.parametrize("span", [25, 150, 390])
def test_loop_detector_finds_periodic_loops(span):
    rng = random.Random(span)
    unit = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz     ,") for _ in range(span - 1)) + "."
    text = "Some ordinary opening text that does not repeat. " + unit * 12
    info = feed_all(LoopDetector(LoopSettings(sentence_min_chars=10_000)), text)
    assert info is not None and info.kind == "periodic"
    assert len(info.span) % span == 0 or span % len(info.span) == 0


def test_loop_detector_finds_sentence_cycles():
    a = "Let me recount the bars in the chart one more time to be sure."
    b = "The third bar looks taller than the fourth bar in the picture."
    c = "Maybe I should consider the legend before deciding anything."
    text = f"{a} {b} {a} {c} {a} {b} {a} {c} {b}"
    info = feed_all(LoopDetector(), text)
    assert info is not None and info.kind == "sentence" and info.span == a


def test_loop_detector_repeats_short_span_needs_more_copies():
    unit = "the same line again\n"  # 20 chars: needs 10 copies (200 chars) to count
    det = LoopDetector()
    assert feed_all(det, unit * 5) is None
    assert feed_all(det, unit * 10) is not None


def test_a_colon_is_dropped_only_after_a_marker():
    assert split_text("Thought.\n\n**答案**：B")[1] == "B"
    assert split_text("Thought.\n\n**Final Answer**: 42")[1] == "42"
    session = ScriptedSession(endless(), ": blue")  # forced text without a marker: the colon is the model's
    _, result = run(session, think_budget=4, grace_tokens=0, forced_text=" Time is up. ")
    assert result.answer == ": blue"
