"""``samples=N`` / ``--samples N`` through the API and the CLI on the llama.cpp backend (tiny GGUF)."""

from __future__ import annotations

import json

import pytest
from helpers import assert_error

from qvq_local.errors import InputError
from qvq_local.events import ChainEvent, Finished, Started
from qvq_local.settings import AskSettings

QUESTION = "Which bar is the tallest?"


@pytest.fixture(scope="module")
def llama_model(tiny_gguf_f32):
    pytest.importorskip("llama_cpp")
    from qvq_local.api import load

    with load(tiny_gguf_f32.model, backend="llama") as model:
        yield model


def _count_calls(monkeypatch, cls, name):
    calls = []
    original = getattr(cls, name)

    def wrapper(self, *args, **kwargs):
        calls.append((args, kwargs))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, name, wrapper)
    return calls


def test_samples_run_n_chains_from_one_prefill_and_vote(llama_model, sample_image, monkeypatch):
    from qvq_local.backends import llama_chains, llama_session

    prefills = _count_calls(monkeypatch, llama_session.LlamaSession, "prefill")
    flushes = _count_calls(monkeypatch, llama_chains._Group, "flush")
    events = list(
        llama_model.stream([sample_image], QUESTION, think_budget=12, answer_budget=6, samples=4, seed=3)
    )
    assert isinstance(events[0], Started) and isinstance(events[-1], Finished)
    assert len(prefills) == 1  # one prefill (one image encode) for all four chains
    chain_events = [e for e in events if isinstance(e, ChainEvent)]
    assert {e.chain for e in chain_events} == {0, 1, 2, 3}
    result = events[-1].result
    assert len(result.chains) == 4 and result.settings["samples"] == 4
    tokens = [c.thought_tokens + c.answer_tokens for c in result.chains]
    # lockstep batching: far fewer decodes than tokens (one per round, not one per chain token)
    assert len(flushes) <= max(tokens) + 4 < sum(tokens)
    # greedy QVQ sampling is replaced by the chain sampling, so the chains differ (seeds 3..6)
    assert result.settings["temperature"] == 0.7
    assert len({c.thought for c in result.chains}) > 1
    v = result.vote
    assert v["chain"] in range(4) and sorted(v["finish_order"]) == [0, 1, 2, 3]
    winner = result.chains[v["chain"]]
    assert (result.thought, result.answer, result.boxed) == (winner.thought, winner.answer, winner.boxed)
    data = result.to_dict()
    assert len(data["chains"]) == 4 and data["vote"]["chain"] == v["chain"]


def test_one_sample_is_the_plain_path(llama_model, sample_image, monkeypatch):
    from qvq_local.backends import llama_session, llamacpp
    from qvq_local.prefix_cache import MemoryCache

    forks = _count_calls(monkeypatch, llama_session.LlamaSession, "fork")
    opened = _count_calls(monkeypatch, llamacpp.LlamaModel, "new_session")
    monkeypatch.setattr(llama_model, "prefix_cache", MemoryCache())  # empty: the first ask is fresh
    a = llama_model.ask([sample_image], QUESTION, think_budget=10, answer_budget=4, samples=1)
    b = llama_model.ask([sample_image], QUESTION, think_budget=10, answer_budget=4)
    assert forks == [] and all("n_seq" not in kw for _, kw in opened)
    assert a.chains == [] and a.vote is None and "chains" not in a.to_dict()
    # the second ask reuses the first's image prefix (in-memory cache): only that setting differs
    assert (a.settings["prefix_cache"]["source"], b.settings["prefix_cache"]["source"]) == ("fresh", "memory")
    same = {k: v for k, v in a.settings.items() if k != "prefix_cache"}
    assert (a.thought, a.answer, same) == (
        b.thought,
        b.answer,
        {k: v for k, v in b.settings.items() if k != "prefix_cache"},
    )
    assert "samples" not in a.settings and a.settings["temperature"] == b.settings["temperature"]


def test_samples_setting_is_checked():
    for bad in (0, -1, 65, 2.5, True):
        with pytest.raises(InputError) as err:
            AskSettings(samples=bad)
        assert_error(err, "samples", "1 to 64")


def test_samples_need_a_backend_that_forks(sample_image):
    from test_api import _model

    model, _ = _model(thought="a b c")
    with pytest.raises(InputError) as err:
        list(model.stream([sample_image], QUESTION, samples=2))
    assert_error(err, "samples 2", "llama.cpp", "MLX", "fake")


def test_cli_samples_json_carries_every_chain(tiny_gguf_f32, sample_image, capsys):
    pytest.importorskip("llama_cpp")
    from typer.testing import CliRunner

    from qvq_local.cli import app

    out = CliRunner().invoke(
        app,
        [
            "ask",
            str(sample_image),
            QUESTION,
            "--model",
            str(tiny_gguf_f32.model),
            "--backend",
            "llama",
            "--think-budget",
            "8",
            "--answer-budget",
            "4",
            "--samples",
            "3",
            "--json",
        ],
    )
    assert out.exit_code == 0, out.output
    data = json.loads(out.stdout.strip().splitlines()[-1])
    chains = data["qvq"]["chains"]
    assert len(chains) == 3 and all("answer" in c and "boxed" in c for c in chains)
    assert data["qvq"]["vote"]["chain"] in range(3)
    assert data["choices"][0]["message"]["content"] == chains[data["qvq"]["vote"]["chain"]]["answer"]


def test_samples_on_mlx_one_prefill_every_chain_reported(tiny_mlx_f32, sample_image, monkeypatch):
    pytest.importorskip("mlx_vlm")
    from qvq_local.api import load
    from qvq_local.backends import mlx_chains, mlx_session

    prefills = _count_calls(monkeypatch, mlx_session.MlxSession, "prefill")
    rounds = _count_calls(monkeypatch, mlx_chains._Group, "round")
    with load(tiny_mlx_f32, backend="mlx") as model:
        result = model.ask([sample_image], QUESTION, think_budget=10, answer_budget=4, samples=3, seed=1)
    assert len(prefills) == 1 and len(result.chains) == 3
    tokens = [c.thought_tokens + c.answer_tokens for c in result.chains]
    assert len(rounds) < sum(tokens)  # batched: fewer forward passes than chain tokens
    assert result.vote["chain"] in range(3) and sorted(result.vote["finish_order"]) == [0, 1, 2]
