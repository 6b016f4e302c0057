"""Published-style QVQ replies replayed through the controller: both languages, with and without a budget.

The replies follow QVQ-72B-Preview's published demo outputs: reasoning prose with no think tags, the
answer marker exactly once (``**Final Answer**`` for English questions, ``**答案**`` / ``**最终答案**``
for Chinese ones, sometimes with a colon), then the answer: display math with a box, a letter, a
sentence, several paragraphs or a numbered list; and the language mixing QVQ is known for.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
from fakes import ScriptedSession, chop

from qvq_local.events import Finished, Forced, TextDelta
from qvq_local.reasoning import ReasoningConfig, run_reasoning
from qvq_local.splitter import (
    DEFAULT_FORCED_TEXT,
    ZH_FORCED_TEXT,
    ThoughtAnswerSplitter,
    default_forced_text,
    question_language,
    split_text,
)


@dataclass(frozen=True)
class Replay:
    name: str
    question: str
    thought: str  # what the model writes before the marker
    marker: str
    answer: str  # what it writes after the marker (with the spacing it uses)
    boxed: str | None

    @property
    def text(self) -> str:
        return self.thought + self.marker + self.answer

    @property
    def language(self) -> str:
        return "zh" if self.name.startswith("zh") else "en"


STEPS_EN = " ".join(
    f"Step {i}: the segment from point {chr(65 + i % 26)} measures {i * 7 % 23} units, and the angle next to it "
    f"is {i * 11 % 90} degrees, so I carry {i % 5} forward."
    for i in range(40)
)

REPLAYS = [
    Replay(
        "en_display_math",
        "What is the value of f(-3) for the function in the graph?",
        "So I've got this graph of a function, and I need to find f(-3). Let me look at the axes first.\n\n"
        "The function looks like a parabola opening upwards, with its vertex near (1, -33). Wait, let me "
        "check that again. The points (0, -32) and (2, -32) are on it, so the vertex is at x = 1.\n\n"
        "So f(x) = (x - 1)^2 - 33, and f(-3) = 16 - 33 = -17. Hmm, that doesn't match the curve at x = -3, "
        "which sits lower. Let me recompute with the point (-1, -29): the value there is -29.\n\n"
        "Yes, reading the question again, it asks for the value at the marked point, which is -29.\n\n",
        "**Final Answer**",
        "\n\n$$ \\boxed{-29} $$",
        "-29",
    ),
    Replay(
        "en_long_colon_letter",
        "Which option matches the shaded area? (A) 12 (B) 18 (C) 24 (D) 30",
        "Let me work through the figure carefully. "
        + STEPS_EN
        + "\n\nSo the shaded area is 24, option C.\n\n",
        "**Final Answer:**",
        " \\boxed{C}",
        "C",
    ),
    Replay(
        "en_mixed_chinese_words",
        "What does the sign at the door say?",
        "The image shows a green sign above a door with the characters 出口 on it. In Chinese, 出口 means "
        "'exit'. There's also a small running figure, which is the usual emergency exit symbol.\n\n"
        "So the sign says exit.\n\n",
        "**Final Answer**",
        "\n\n\\[ \\boxed{\\text{exit}} \\]",
        "exit",
    ),
    Replay(
        "zh_boxed_dfrac",
        "图中阴影部分的面积占整个正方形的几分之几？",
        "好的，我来看看这道题。图中是一个正方形，边长为2，对角线把它分成两个三角形。\n\n"
        "阴影部分是其中一个三角形，面积是 \\( \\frac{1}{2} \\times 2 \\times 2 = 2 \\)，而正方形的面积是4。\n\n"
        "所以阴影部分占整个正方形的 \\( \\frac{2}{4} = \\frac{1}{2} \\)。\n\n",
        "**答案**",
        "\n\n\\[ \\boxed{\\dfrac{1}{2}} \\]",
        "\\dfrac{1}{2}",
    ),
    Replay(
        "zh_final_colon_letter",
        "下列选项中哪一个是图中物体的正确名称？A. 苹果 B. 梨 C. 桃 D. 橙子",
        "嗯，图中的水果是黄绿色的，上窄下宽，表面有小斑点。\n\n这很像梨，而不是苹果或桃子。所以选项B正确。\n\n",
        "**最终答案：**",
        "\n\nB",
        None,
    ),
    Replay(
        "zh_colon_after_sentence",
        "图中一共有几只鸟？",
        "我先数一下树枝上的鸟：左边有两只，中间有一只，右边有两只。\n\n再确认一遍，一共是五只。\n\n",
        "**答案**",
        "：图中共有5只鸟。",
        None,
    ),
    Replay(
        "zh_several_paragraphs",
        "请描述这两张图中的物体有什么不同。",
        "第一张图里有一个红色的圆形水果，应该是苹果。第二张图里是一个黄色的长条形水果，是香蕉。\n\n"
        "它们的颜色和形状都不一样。\n\n",
        "**答案**",
        "\n\n第一张图中的物体是苹果，红色，圆形。\n\n第二张图中的物体是香蕉，黄色，长条形。\n\n"
        "所以两者在颜色和形状上都不同。",
        None,
    ),
    Replay(
        "zh_numbered_list",
        "根据柱状图，回答以下问题：最高的柱子是多少？最低的是多少？相差多少？",
        "让我看看这个柱状图。一共有五根柱子，分别是40、90、60、120和75。\n\n"
        "最高的是120，最低的是40，相差 120 - 40 = 80。\n\n",
        "**最终答案**",
        "\n\n1. 最高的柱子是120。\n2. 最低的柱子是40。\n3. 两者相差 \\( \\boxed{80} \\)。",
        "80",
    ),
    Replay(
        "zh_mixed_english_words",
        "这张图表中2020年的GDP增长率是多少？",
        "嗯，这个 chart 显示的是 GDP growth rate。Let me check the numbers. 2019年是3%，2020年的柱子更高一些，"
        "大约是5%。\n\n再看一下 legend，确认这是 annual growth rate，没错。\n\n",
        "**答案**",
        "\n\n$$ \\boxed{5\\%} $$",
        "5\\%",
    ),
]
IDS = [r.name for r in REPLAYS]


def expected_split(replay: Replay) -> tuple[str, str]:
    answer = replay.answer.lstrip().lstrip(":：").strip()
    return replay.thought.strip(), answer


def run(session, **config):
    events = list(run_reasoning(session, ReasoningConfig(**config)))
    assert isinstance(events[-1], Finished) and sum(isinstance(e, Finished) for e in events) == 1
    return events, events[-1].result


def joined(events, phase):
    return "".join(e.text for e in events if isinstance(e, TextDelta) and e.phase == phase)


def irregular_chunks(text: str, seed: int) -> list[str]:
    rng = random.Random(seed)
    out, i = [], 0
    while i < len(text):
        n = rng.choice([1, 1, 2, 3, 5, 8])
        out.append(text[i : i + n])
        i += n
    return out


def test_fixture_questions_have_the_language_the_replies_use():
    assert [question_language(r.question) for r in REPLAYS] == [r.language for r in REPLAYS]


@pytest.mark.parametrize("replay", REPLAYS, ids=IDS)
def test_whole_text_split(replay):
    thought, answer = expected_split(replay)
    assert split_text(replay.text) == (thought, answer, replay.marker)


@pytest.mark.parametrize("replay", REPLAYS, ids=IDS)
def test_model_answers_by_itself_without_a_budget(replay):
    session = ScriptedSession(replay.text)
    events, result = run(session)
    thought, answer = expected_split(replay)
    assert (result.thought, result.answer, result.boxed) == (thought, answer, replay.boxed)
    assert result.stop_reason == "answer" and result.settings["answer_source"] == "marker"
    assert replay.marker not in result.thought and replay.marker not in result.answer
    assert session.fed == [] and not any(isinstance(e, Forced) for e in events)
    assert joined(events, "thought") == result.thought and joined(events, "answer") == result.answer
    assert result.thought_tokens + result.answer_tokens == len(chop(replay.text))


@pytest.mark.parametrize("replay", REPLAYS, ids=IDS)
def test_model_answers_by_itself_within_a_large_budget(replay):
    session = ScriptedSession(replay.text)
    _, result = run(session, think_budget=len(chop(replay.text)) + 10)
    assert (result.thought, result.answer) == expected_split(replay)
    assert (result.boxed, result.stop_reason, session.fed) == (replay.boxed, "answer", [])


@pytest.mark.parametrize("replay", REPLAYS, ids=IDS)
def test_budget_cuts_the_thought_and_forces_in_the_questions_language(replay):
    """The thought is cut at the budget; the model continues the forced marker with its usual answer."""
    forced_text = default_forced_text(None, replay.question)
    assert forced_text == (ZH_FORCED_TEXT if replay.language == "zh" else DEFAULT_FORCED_TEXT)
    session = ScriptedSession(replay.thought, replay.answer)
    events, result = run(session, think_budget=12, grace_tokens=6, forced_text=forced_text)
    _, answer = expected_split(replay)
    assert result.stop_reason == "budget" and [f.reason for f in result.forced] == ["budget"]
    assert 12 <= result.thought_tokens <= 12 + 6
    assert (result.answer, result.boxed) == (answer, replay.boxed)
    sentence = forced_text.strip().split("\n")[0]
    assert result.thought.endswith(sentence)
    for marker in ("**Final Answer**", "**答案**"):
        assert marker not in result.thought and marker not in result.answer
    assert session.transcript.count("**答案**" if replay.language == "zh" else "**Final Answer**") == 1
    assert joined(events, "thought") == result.thought and joined(events, "answer") == result.answer


@pytest.mark.parametrize("replay", REPLAYS, ids=IDS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_streaming_in_irregular_chunks_gives_the_whole_text_split(replay, seed):
    chunks = irregular_chunks(replay.text, seed)
    splitter = ThoughtAnswerSplitter()
    pieces = []
    for chunk in chunks:
        pieces += splitter.feed(chunk)
    pieces += splitter.finish()
    thought = "".join(t for p, t in pieces if p == "thought")
    answer = "".join(t for p, t in pieces if p == "answer")
    assert (thought, answer, splitter.marker) == split_text(replay.text)
    # and the controller, fed the same irregular tokens
    events, result = run(ScriptedSession(chunks))
    assert (result.thought, result.answer) == expected_split(replay)
    assert (result.boxed, result.stop_reason) == (replay.boxed, "answer")
    assert joined(events, "thought") == result.thought and joined(events, "answer") == result.answer
    assert sum(e.tokens for e in events if isinstance(e, TextDelta)) == len(chunks)


@pytest.mark.parametrize(
    "question, language",
    [
        ("Which bar is the highest?", "en"),
        ("图中最高的柱子是哪一根？", "zh"),
        ("图中的 GDP growth rate 是多少？", "zh"),  # Chinese with English terms
        ("求 \\frac{x}{2} 的值", "zh"),  # LaTeX commands are not words
        ("What does 出口 mean on this sign?", "en"),  # English quoting a Chinese word
        ("x = ?", "en"),
        ("この図で一番高い棒はどれですか", "en"),  # Japanese: kanji are not Chinese; no Chinese answer marker
        ("이 그림에서 가장 높은 막대는?", "en"),  # Korean
        ("12 + 7", "en"),
        ("", "en"),
    ],
)
def test_question_language(question, language):
    assert question_language(question) == language


def test_marker_after_chinese_reasoning_with_an_english_marker_is_still_a_marker():
    """Language mixing: a Chinese reply that ends with the English marker splits there too."""
    text = "我数了一下，一共有三个。\n\n**Final Answer**\n\n\\[ \\boxed{3} \\]"
    _, result = run(ScriptedSession(text))
    assert (result.thought, result.answer, result.boxed) == (
        "我数了一下，一共有三个。",
        "\\[ \\boxed{3} \\]",
        "3",
    )
