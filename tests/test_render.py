"""Renderers fed scripted event lists: what each output shows, and what it must never contain."""

from __future__ import annotations

import io
import json
import re

import pytest
from rich.console import Console

from qvq_local.events import Finished, Forced, ImageInfo, Result, Started, TextDelta, Timings
from qvq_local.openai_format import completion_dict
from qvq_local.render import (
    JsonRenderer,
    LiveRenderer,
    PlainRenderer,
    _Tail,
    clean,
    highlight_boxed_markdown,
)
from qvq_local.transcript import render_transcript, write_transcript

ESC = re.compile(r"\x1b|\x9b")
IMAGES = [ImageInfo("examples/bar_chart.png", (640, 480), (448, 336), 192)]
FORCED_TEXT = "\n\nI have run out of time to think, so I will answer now.\n\n**Final Answer**\n\n"


def _events(
    reason: str = "budget",
    answer: str = "The tallest bar is C, so $\\boxed{42}$.",
    stop: str = "budget",
    thought_words: int = 40,
) -> list:
    thought = "".join(f"step{i} " + ("\n" if i % 9 == 8 else "") for i in range(thought_words))
    events: list = [Started("tiny-q4", "llama", "Q4_K_M", IMAGES, 250, 64, 32, 0.1, 0.4)]
    events += [
        TextDelta("thought", f"step{i} " + ("\n" if i % 9 == 8 else ""), 1) for i in range(thought_words)
    ]
    forced = Forced(reason, FORCED_TEXT, at_token=thought_words, seconds=0.01)  # type: ignore[arg-type]
    events.append(forced)
    events.append(TextDelta("answer", answer, 9))
    result = Result(
        thought=thought.strip(),
        answer=answer,
        boxed="42" if "boxed" in answer else None,
        stop_reason=stop,  # type: ignore[arg-type]
        thought_tokens=thought_words,
        answer_tokens=9,
        prompt_tokens=250,
        forced=[forced],
        timings=Timings(
            load_s=0.5,
            prefill_s=0.4,
            image_encode_s=0.1,
            first_token_s=0.45,
            decode_s=1.0,
            decode_tok_s=49.0,
            forced_step_s=0.01,
            total_s=1.5,
        ),
        model="tiny-q4",
        backend="llama",
        quantization="Q4_K_M",
        images=IMAGES,
        settings={"think_budget": 64, "answer_budget": 32, "temperature": 0.01},
    )
    events.append(Finished(result))
    return events


def _plain(events, hide_thinking=False) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    PlainRenderer(out, err, hide_thinking=hide_thinking).run(events)
    return out.getvalue(), err.getvalue()


def test_plain_answer_to_stdout_thought_to_stderr_no_escape_codes():
    out, err = _plain(_events())
    assert out == "The tallest bar is C, so $\\boxed{42}$.\n"
    assert "step0 step1" in err and "step39" in err
    assert "[thinking budget reached at 40 tokens: answer forced]" in err
    assert "stop: budget" in err
    assert not ESC.search(out) and not ESC.search(err)


def test_plain_hide_thinking_keeps_the_forced_marker_but_not_the_thought():
    out, err = _plain(_events(), hide_thinking=True)
    assert "step0" not in err
    assert "answer forced" in err
    assert out.startswith("The tallest bar")


def test_plain_loop_marker_and_control_characters_stripped():
    events = _events(reason="loop", stop="loop", answer="evil\x1b[2Jtext\x9b31m done")
    out, err = _plain(events)
    assert "[reasoning loop detected at 40 thought tokens: cut, answer forced]" in err
    assert out == "evil[2Jtext31m done\n"
    assert not ESC.search(out)


def test_plain_interrupted_says_partial():
    events = _events()
    events[-1].result.stop_reason = "interrupted"
    _, err = _plain(events)
    assert "[interrupted: output is partial]" in err


def test_json_has_openai_shape_and_qvq_fields():
    buf = io.StringIO()
    JsonRenderer(buf).run(_events())
    lines = buf.getvalue().splitlines()
    assert len(lines) == 1  # one object, one line
    data = json.loads(lines[0])
    assert data["object"] == "chat.completion"
    assert data["id"].startswith("chatcmpl-") and isinstance(data["created"], int)
    assert data["model"] == "tiny-q4"
    choice = data["choices"][0]
    assert choice["index"] == 0 and choice["finish_reason"] == "stop"
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"].endswith("$\\boxed{42}$.")
    assert choice["message"]["reasoning_content"].startswith("step0 step1")
    usage = data["usage"]
    assert usage["prompt_tokens"] == 250 and usage["completion_tokens"] == 49
    assert usage["reasoning_tokens"] == 40 and usage["total_tokens"] == 299
    assert usage["completion_tokens_details"]["reasoning_tokens"] == 40
    qvq = data["qvq"]
    assert qvq["boxed"] == "42" and qvq["stop_reason"] == "budget"
    assert qvq["forced"][0]["reason"] == "budget" and qvq["forced"][0]["at_token"] == 40
    assert qvq["timings"]["decode_tok_s"] == 49.0 and qvq["timings"]["prefill_s"] == 0.4
    assert qvq["backend"] == "llama" and qvq["quantization"] == "Q4_K_M"
    assert qvq["images"][0] == {
        "path": "examples/bar_chart.png",
        "original_size": [640, 480],
        "size": [448, 336],
        "tokens": 192,
    }


@pytest.mark.parametrize(
    "stop, finish",
    [("answer", "stop"), ("max_tokens", "length"), ("interrupted", "interrupted"), ("loop", "stop")],
)
def test_json_finish_reason(stop, finish):
    result = _events()[-1].result
    result.stop_reason = stop
    assert completion_dict(result)["choices"][0]["finish_reason"] == finish


def _live(events, width=80, height=30, **kwargs) -> str:
    console = Console(record=True, force_terminal=True, width=width, height=height, color_system="truecolor")
    with LiveRenderer(console, **kwargs) as renderer:
        for event in events:
            renderer.handle(event)
    return console.export_text()


def test_live_shows_header_thought_mark_status_answer_and_boxed():
    text = _live(_events())
    assert "tiny-q4" in text and "llama" in text and "Q4_K_M" in text
    assert "bar_chart.png (640×480→448×336, 192 tokens)" in text
    assert "step39" in text  # the tail shows the latest thought
    assert "⏱ thinking budget reached at 40 tokens: answer forced" in text
    assert "40/64 thought" in text  # the status line against the budget
    assert "The tallest bar is C, so 42." in text  # Markdown, \boxed{} turned into bold
    assert "boxed answer:  42" in text
    assert "stop: budget" in text and "49.0 tok/s" in text


def test_live_loop_mark_and_hidden_thinking():
    text = _live(_events(reason="loop", stop="loop"), hide_thinking=True)
    assert "reasoning loop detected" in text
    assert "step3" not in text
    assert "thinking hidden" in text


def test_live_tail_is_bounded_for_long_thoughts():
    """Thousands of tokens: the screen shows only the tail and the buffer stays bounded."""
    events = _events(thought_words=5000)
    console = Console(record=True, force_terminal=True, width=80, height=24)
    renderer = LiveRenderer(console)
    for event in events[:-1]:
        renderer.handle(event)
    assert len(renderer.thought.lines) <= 500
    frame = renderer._renderables(24)
    renderer.handle(events[-1])
    text = console.export_text()
    assert "step4999" in text and "step10 " not in text
    assert frame  # drawing a frame from a 5000-token thought works


def test_tail_wraps_and_collapses_blank_lines():
    tail = _Tail(width=20)
    tail.add("a" * 50 + "\n\n\n\n" + "word " * 3)
    lines = [line for line, _ in tail.view(10)]
    assert lines[:3] == ["a" * 20, "a" * 20, "a" * 10]
    assert lines.count("") == 1
    assert all(len(line) <= 20 for line in lines)


def test_highlight_boxed_markdown():
    assert highlight_boxed_markdown("so $\\boxed{x^{2}}$ then") == "so **x^{2}** then"
    assert highlight_boxed_markdown("\\[ \\boxed{7} \\]") == "**7**"
    assert highlight_boxed_markdown("no box") == "no box"
    assert highlight_boxed_markdown("cut \\boxed{12") == "cut \\boxed{12"


def test_clean_removes_terminal_controls_keeps_text():
    assert clean("a\x1b]0;title\x07b\tc\nd\x9b") == "a]0;titleb\tc\nd"


def test_transcript_holds_question_images_settings_thought_answer(tmp_path):
    result = _events()[-1].result
    text = render_transcript(result, "Which bar is highest?")
    assert "## Question" in text and "Which bar is highest?" in text
    assert "`examples/bar_chart.png`: 448×336 (resized from 640×480), 192 image tokens" in text
    assert "- think_budget: 64" in text and "- stop reason: budget" in text
    assert "step0 step1" in text and "**Boxed answer:** `42`" in text
    path = write_transcript(tmp_path / "run.md", result, "Which bar is highest?")
    assert path.read_text(encoding="utf-8") == text
    assert [p.name for p in tmp_path.iterdir()] == ["run.md"]  # no temporary file left behind


def test_transcript_marks_interrupted_runs():
    result = _events()[-1].result
    result.stop_reason = "interrupted"
    assert "> **Interrupted**: the output below is partial." in render_transcript(result, "q")


def test_speculation_on_the_status_line_and_in_the_summary():
    """The panel's status line shows accepted tokens per step while guesses are checked ('spec off'
    when auto turned them off); the summary line and --json carry the session's report."""
    from qvq_local.events import Speculating
    from qvq_local.render import speculation_note, speculation_status

    events = _events()
    report = {
        "mode": "ngram",
        "plan": "fixed",
        "k": 5,
        "tokens_per_step": 1.47,
        "drafted": 100,
        "acceptance": 0.31,
    }
    events[-1].result.settings["speculation"] = report
    events.insert(-1, Speculating("ngram", True, tokens=40, steps=27, accepted=13, drafted=42))
    console = Console(record=True, force_terminal=True, width=100, height=30)
    renderer = LiveRenderer(console)
    for event in events[:-1]:
        renderer.handle(event)
    frame = Console(record=True, width=140, file=io.StringIO())
    frame.print(*renderer._renderables(30))
    assert "1.48 tok/step" in frame.export_text()  # 40 tokens in 27 passes, on the status line
    renderer.handle(events[-1])
    assert "speculation: 1.47 tokens/step, 31% of guesses right" in console.export_text()
    assert "speculation: 1.47 tokens/step" in _plain(events)[1]
    buf = io.StringIO()
    JsonRenderer(buf).run(events)
    assert json.loads(buf.getvalue())["qvq"]["settings"]["speculation"]["tokens_per_step"] == 1.47
    assert speculation_status(Speculating("auto", False, 10, 10)) == " · spec off"
    assert speculation_status(None) == ""
    assert speculation_note(None) is None and speculation_note({"mode": "off"}) == "speculation off"
    auto_off = {"mode": "auto", "plan": "auto", "k": 0, "drafted": 0}
    assert speculation_note(auto_off) == "speculation: auto kept it off (no gain on this machine)"
