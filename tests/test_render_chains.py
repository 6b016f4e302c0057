"""The compact display of ``--samples N``: one line per chain, the vote, and every chain in --json."""

from __future__ import annotations

import io

from fakes import ScriptedSession
from rich.console import Console

from qvq_local.chains import run_chains
from qvq_local.events import Started
from qvq_local.openai_format import completion_dict
from qvq_local.reasoning import ReasoningConfig
from qvq_local.render import JsonRenderer, LiveRenderer, PlainRenderer


def _reply(n: int, boxed: str) -> str:
    return " ".join(f"w{i}" for i in range(n)) + f"\n\n**Final Answer**\n\n$$\\boxed{{{boxed}}}$$"


def _events():
    sessions = [
        ScriptedSession(_reply(4, "7")),
        ScriptedSession(_reply(30, "5")),
        ScriptedSession(_reply(12, "5")),
    ]
    started = Started(
        model="tiny",
        backend="llama",
        quantization="F32",
        images=[],
        prompt_tokens=10,
        think_budget=None,
        answer_budget=None,
    )
    return [started, *run_chains(sessions, ReasoningConfig(loop=None))]


def test_plain_prints_one_line_per_chain_and_the_vote_not_the_streams():
    out, err = io.StringIO(), io.StringIO()
    PlainRenderer(out, err).run(_events())
    lines = err.getvalue().splitlines()
    assert lines[1].startswith("[#1 answer · ") and "boxed 7" in lines[1]  # chain 1 finished first
    assert [line.split(" ")[0] for line in lines[1:4]] == ["[#1", "[#3", "[#2"]
    assert "w20" not in err.getvalue()  # no thought streams of several chains interleaved
    assert "[majority 5 (2 of 3 chains: 5 ×2, 7 ×1) · answer from chain #3]" in lines
    assert out.getvalue() == "$$\\boxed{5}$$\n"  # the winning chain's answer only


def test_live_panel_shows_each_chain_compactly_then_the_vote():
    console = Console(record=True, force_terminal=True, width=100, height=30)
    events = _events()
    renderer = LiveRenderer(console)
    for event in events[:-1]:
        renderer.handle(event)
    with console.capture() as cap:
        console.print(*renderer._renderables(30))
    drawn = cap.get()
    assert "3 chains" in drawn
    assert all(f"#{i}" in drawn for i in (1, 2, 3))
    renderer.handle(events[-1])
    text = console.export_text()
    assert "majority 5 (2 of 3 chains" in text and "boxed answer:  5" in text


def test_json_carries_every_chain_and_the_vote():
    events = _events()
    out = io.StringIO()
    JsonRenderer(out).run(events)
    data = completion_dict(events[-1].result)
    assert [c["boxed"] for c in data["qvq"]["chains"]] == ["7", "5", "5"]
    assert data["qvq"]["vote"]["counts"] == {"5": 2, "7": 1}
    assert '"chains"' in out.getvalue()
    # one chain: no chains/vote keys at all
    single = completion_dict(events[-1].result.chains[0])
    assert "chains" not in single["qvq"] and "vote" not in single["qvq"]
