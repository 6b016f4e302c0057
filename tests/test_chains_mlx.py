"""N chains from one MLX prefill (``MlxSession.fork``: a batched KV cache) against N separate sessions.

As for llama.cpp (tests/test_chains_llama.py): chain i must give the tokens and logits of a plain session
of the same size seeded ``seed + i``, one chain being fed forced text (so the others run padding rows that
must stay invisible to them), with one batched forward per round of steps.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

pytest.importorskip("mlx.core")
pytest.importorskip("mlx_vlm")

from qvq_local.backends.base import Prompt, SamplingParams, Session
from qvq_local.prompt import build_prompt

pytestmark = pytest.mark.mlx

QUESTION = "Which bar is the tallest?"
FORCED = "\n\nTime is up.\n\n**Final Answer**\n"
STEPS = 16
FEED_AT = {1: 5}
N_CTX_CHAIN = 1024


@pytest.fixture(scope="module")
def loaded(tiny_mlx_f32):
    from qvq_local.backends import mlx as backend

    model = backend.load(tiny_mlx_f32)
    yield model
    model.close()


@pytest.fixture(scope="module")
def prompt(loaded, sample_image) -> Prompt:
    from PIL import Image

    with Image.open(sample_image) as img:
        image = img.convert("RGB")
    return Prompt(text=build_prompt(loaded.chat_template, QUESTION, 1), images=[image])


def _drive(session, i, steps, logits):
    steps.append(session.step().id)
    if len(steps) == FEED_AT.get(i):
        session.feed(FORCED)
    if len(steps) == STEPS:
        logits.append(session.last_logits())


@pytest.mark.parametrize(
    "sampling",
    [
        SamplingParams(temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.05, seed=0),
        SamplingParams(temperature=1.5, top_p=1.0, top_k=0, repetition_penalty=1.0, seed=7),
    ],
    ids=["greedy", "seeded"],
)
def test_forked_chains_match_separate_sessions(loaded, prompt, sampling):
    n = 3
    ref_tokens, ref_logits = [], []
    for i in range(n):
        session = loaded.new_session(replace(sampling, seed=sampling.seed + i), n_ctx=N_CTX_CHAIN)
        session.prefill(prompt)
        steps, logits = [], []
        for _ in range(STEPS):
            _drive(session, i, steps, logits)
        ref_tokens.append(steps)
        ref_logits.append(logits[-1])
        session.close()

    session = loaded.new_session(sampling, n_ctx=N_CTX_CHAIN, n_seq=n)
    stats = session.prefill(prompt)
    session.n_ctx = stats.prompt_tokens + n * (N_CTX_CHAIN - stats.prompt_tokens)
    chains = session.fork(n)
    assert all(isinstance(c, Session) for c in chains)
    tokens, logits = [[] for _ in range(n)], [[] for _ in range(n)]
    for _ in range(STEPS):
        for i, chain in enumerate(chains):
            _drive(chain, i, tokens[i], logits[i])
    assert tokens == ref_tokens
    for got, want in zip(logits, ref_logits):
        np.testing.assert_allclose(got[-1], want, atol=1e-4, rtol=0)
    assert session.images_encoded == 1
    if sampling.temperature:
        assert len({tuple(t) for t in tokens}) == n
    # one forward per round of steps (the last round: one per chain, as each reads its logits); the fed
    # chain's forced text goes through in the same pass as the others' tokens
    assert chains[0].group.forwards == STEPS - 1 + n
    for c in chains:
        c.close()
    session.close()
