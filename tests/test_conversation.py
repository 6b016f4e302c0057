"""The rules an earlier-turns history keeps (qvq_local.conversation): each broken one is one line naming
the turn."""

from __future__ import annotations

import re

import pytest
from helpers import assert_error

from qvq_local.conversation import Turn, check_history, image_count
from qvq_local.errors import InputError


def test_turns_and_dicts_are_accepted_and_counted():
    turns = check_history(
        [
            {"role": "user", "text": "What is it?", "images": "a.png"},
            {"role": "assistant", "content": "A chart."},
            Turn.user("And now?", images=["b.png", "c.png"]),
        ]
    )
    assert [t.role for t in turns] == ["user", "assistant", "user"]
    assert turns[0].images == ("a.png",) and turns[1].text == "A chart."
    assert image_count(turns) == 3
    assert check_history(None) == () and check_history([]) == ()


@pytest.mark.parametrize(
    ("history", "message"),
    [
        ([Turn("assistant", "A chart.", ("a.png",))], "history[0]: an assistant turn cannot hold images"),
        ([Turn.user("q", ["a.png"]), Turn.assistant("  ")], "history[1]: the assistant turn is empty"),
        ([Turn.user("  ")], "history[0]: the user turn is empty (no text and no image)"),
        ([Turn("tool", "x")], "history[0]: a turn's role is user or assistant, got 'tool'"),
        ([{"role": "user", "text": "q", "picture": "a.png"}], "history[0]: unknown key(s) picture"),
        (["just text"], "history[0] must be a Turn (or a dict with role, text and images), got str"),
        ("text", "history must be a list of turns"),
        ([Turn.user(3)], "history[0]: the text must be a string, got int"),
    ],
)
def test_a_broken_turn_is_one_line_naming_it(history, message):
    with pytest.raises(InputError) as err:
        check_history(history)
    assert_error(err, re.escape(message))


def test_errors_use_the_callers_names():
    with pytest.raises(InputError) as err:
        check_history([Turn.user("q"), Turn.assistant("")], names=["messages[1]", "messages[2]"])
    assert_error(err, re.escape("messages[2]: the assistant turn is empty"))
