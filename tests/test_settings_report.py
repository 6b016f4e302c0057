"""``--json``'s ``settings`` say what the sampler used: for each local backend, the sampling values in the
Result are those of the session that answered (its sampler's own), with nothing set and with values set.
(The remote backend's ``settings`` are what it sent: tests/test_openai_backend.py.)"""

from __future__ import annotations

import dataclasses

import pytest

from qvq_local.api import load

QUESTION = "Which bar is the highest?"
NAMES = ("temperature", "top_p", "top_k", "repetition_penalty", "seed")


def _sessions(model) -> list:
    """Every session the model opens, kept for inspection."""
    opened = []
    original = model.loaded.new_session

    def new_session(*args, **kwargs):
        opened.append(original(*args, **kwargs))
        return opened[-1]

    model.loaded.new_session = new_session
    return opened


def _check(model, sample_image):
    sessions = _sessions(model)
    for options in (
        {},
        {"temperature": 0.7, "top_k": 5, "seed": 3},
        {"top_p": 0.5, "repetition_penalty": 1.2},
    ):
        result = model.ask(sample_image, QUESTION, think_budget=4, answer_budget=2, **options)
        used = dataclasses.asdict(sessions[-1].sampling)  # what the session's sampler was built from
        assert {name: result.settings[name] for name in NAMES} == used, options
        assert all(used[name] == value for name, value in options.items())
        assert None not in used.values()  # every value resolved: the model's own where none was set


@pytest.mark.llama
def test_llama_settings_are_its_samplers(tiny_gguf_f32, sample_image):
    pytest.importorskip("llama_cpp")
    with load(tiny_gguf_f32.model, backend="llama") as model:
        _check(model, sample_image)


@pytest.mark.mlx
def test_mlx_settings_are_its_samplers(tiny_mlx_f32, sample_image):
    pytest.importorskip("mlx_vlm")
    with load(tiny_mlx_f32, backend="mlx") as model:
        _check(model, sample_image)
