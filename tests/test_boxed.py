"""The one \\boxed{} parser: the result's value and the renderer's highlighting come from the same spans."""

from __future__ import annotations

import pytest

from qvq_local.boxed import extract_boxed, find_boxed
from qvq_local.render import highlight_boxed_markdown

CASES = [
    # (text, value of the last box, highlighted markdown)
    ("\\boxed{42}", "42", "**42**"),
    ("so \\boxed{\\frac{1}{2}} done", "\\frac{1}{2}", "so **\\frac{1}{2}** done"),
    ("\\boxed {  x + 1 }", "x + 1", "**x + 1**"),
    ("\\boxed {5}", "5", "**5**"),
    ("\\boxed\n{5}", "5", "**5**"),
    ("\\boxed{1} then \\boxed{2}", "2", "**1** then **2**"),
    ("\\boxed{3} and a truncated \\boxed{\\frac{1}{", "3", "**3** and a truncated \\boxed{\\frac{1}{"),
    ("\\boxed{\\{a\\}}", "\\{a\\}", "**\\{a\\}**"),
    ("\\boxed{a\\}b}", "a\\}b", "**a\\}b**"),
    ("\\boxed{\\boxed{1}}", "\\boxed{1}", "**\\boxed{1}**"),
    ("\\boxedx{1}", None, "\\boxedx{1}"),
    ("no box", None, "no box"),
    ("\\boxed{", None, "\\boxed{"),
    ("}}}\\boxed{a}{{{", "a", "}}}**a**{{{"),
    ("", None, ""),
    # QVQ's English ending: display math
    ("**Final Answer**\n\n$$ \\boxed{-29} $$", "-29", "**Final Answer**\n\n**-29**"),
    ("$$\\boxed{-29}$$", "-29", "**-29**"),
    ("\\[ \\boxed{7} \\]", "7", "**7**"),
    ("\\[\n\\boxed{\\dfrac{3}{4}}\n\\]", "\\dfrac{3}{4}", "**\\dfrac{3}{4}**"),
    ("so $\\boxed{x^{2}}$ then", "x^{2}", "so **x^{2}** then"),
    ("\\( \\boxed{y} \\)", "y", "**y**"),
    ("$x = \\boxed{5}$", "5", "$x = **5**$"),  # the math holds more than the box: keep it
    ("$$ a $$ \\boxed{1} $$ b $$", "1", "$$ a $$ **1** $$ b $$"),  # delimiters of other formulas
    ("\\boxed{\\text{B}}", "B", "**B**"),
    ("\\boxed{\\text{ (C) 12 apples }}", "(C) 12 apples", "**(C) 12 apples**"),
    ("\\boxed{3\\text{ cm}}", "3\\text{ cm}", "**3\\text{ cm}**"),
    ("\\boxed{\\text{a} + \\text{b}}", "\\text{a} + \\text{b}", "**\\text{a} + \\text{b}**"),
    ("$$ \\boxed{\\dfrac{\\sqrt{3}}{2}} $$", "\\dfrac{\\sqrt{3}}{2}", "**\\dfrac{\\sqrt{3}}{2}**"),
    ("答案是 $\\boxed{\\text{A}}$。", "A", "答案是 **A**。"),
]


@pytest.mark.parametrize("text, value, markdown", CASES)
def test_value_and_highlight(text, value, markdown):
    assert extract_boxed(text) == value
    assert highlight_boxed_markdown(text) == markdown


@pytest.mark.parametrize("text", [c[0] for c in CASES])
def test_result_and_renderer_agree(text):
    """Whatever the result reports is exactly what the renderer makes bold, box for box."""
    boxes = find_boxed(text)
    assert extract_boxed(text) == (boxes[-1].value if boxes else None)
    markdown = highlight_boxed_markdown(text)
    assert markdown.count("**") - text.count("**") == 2 * len(boxes)
    for box in boxes:
        assert f"**{box.value}**" in markdown
        assert text[box.start : box.end].startswith("\\boxed") and text[box.end - 1] == "}"
        assert box.outer_start <= box.start < box.end <= box.outer_end


def test_truncated_box_at_the_end_is_not_a_value():
    (box,) = find_boxed("First \\boxed{4}, then $$ \\boxed{\\dfrac{1}{")
    assert (box.value, box.outer_start, box.outer_end) == ("4", 6, 15)


def test_nested_box_inside_a_truncated_one_counts():
    assert extract_boxed("\\boxed{x = \\boxed{2}") == "2"
