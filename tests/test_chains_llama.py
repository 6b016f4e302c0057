"""N chains from one llama.cpp prefill (``LlamaSession.fork``) against N separate sessions.

The reference for each chain is a plain session of the same size, prefilled with the same prompt and
stepped the same way: the batched decode must give the same tokens (greedy, and seeded sampling with
chain i seeded ``seed + i``) and the same logits, while each round of steps costs one ``llama_decode``.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

pytestmark = pytest.mark.llama

pytest.importorskip("llama_cpp")

from qvq_local.backends import llamacpp
from qvq_local.backends.base import Prompt, SamplingParams, Session
from qvq_local.errors import InputError
from qvq_local.prompt import build_prompt, load_chat_template

QUESTION = "Which bar is the tallest?"
FORCED = "\n\nTime is up.\n\n**Final Answer**\n"
STEPS = 20
FEED_AT = {1: 6}  # chain 1 gets the forced text after its 6th step, the others never
N_CTX_CHAIN = 512


@pytest.fixture(scope="module")
def model(tiny_gguf_f32):
    loaded = llamacpp.load(tiny_gguf_f32.model, tiny_gguf_f32.mmproj)
    yield loaded
    loaded.close()


@pytest.fixture(scope="module")
def prompt(tiny_checkpoint, sample_image) -> Prompt:
    from PIL import Image

    with Image.open(sample_image) as img:
        image = img.convert("RGB")
    return Prompt(text=build_prompt(load_chat_template(tiny_checkpoint), QUESTION, 1), images=[image])


def _drive(session, chain_index: int, steps: list, logits: list) -> None:
    tok = session.step()
    steps.append(tok.id)
    if len(steps) == FEED_AT.get(chain_index):
        session.feed(FORCED)
    logits.append(session.last_logits() if len(steps) == STEPS else None)


def _separate(model, prompt, sampling, n):
    """Each chain as its own session: n prefills, n image encodes."""
    tokens, last = [], []
    for i in range(n):
        sp = replace(sampling, seed=(sampling.seed or 0) + i)
        session = model.new_session(sp, n_ctx=N_CTX_CHAIN)
        session.prefill(prompt)
        steps, logits = [], []
        for _ in range(STEPS):
            _drive(session, i, steps, logits)
        tokens.append(steps)
        last.append(logits[-1])
        session.close()
    return tokens, last


def _forked(model, prompt, sampling, n):
    session = model.new_session(sampling, n_ctx=N_CTX_CHAIN, n_seq=n)
    stats = session.prefill(prompt)
    # give the forked session exactly n shares of what one separate session has after its prompt
    session.n_ctx = stats.prompt_tokens + n * (N_CTX_CHAIN - stats.prompt_tokens)
    chains = session.fork(n)
    tokens = [[] for _ in range(n)]
    last = [[] for _ in range(n)]
    for _ in range(STEPS):  # lockstep: one step per chain per round
        for i, chain in enumerate(chains):
            _drive(chain, i, tokens[i], last[i])
    group = chains[0].group
    out = (tokens, [x[-1] for x in last], session.images_encoded, group, chains)
    return out, session


@pytest.mark.parametrize(
    "sampling",
    [
        SamplingParams(temperature=0.0, repetition_penalty=1.05),
        SamplingParams(temperature=1.5, top_k=0, top_p=1.0, repetition_penalty=1.0, seed=7),
    ],
    ids=["greedy", "seeded"],
)
def test_forked_chains_match_separate_sessions(model, prompt, sampling):
    n = 3
    ref_tokens, ref_logits = _separate(model, prompt, sampling, n)
    (tokens, logits, encoded, group, chains), session = _forked(model, prompt, sampling, n)
    try:
        assert all(isinstance(c, Session) for c in chains)
        assert tokens == ref_tokens
        for got, want in zip(logits, ref_logits):
            np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
        assert encoded == 1  # one prefill for all chains
        if sampling.temperature:
            # seeded chains differ from one another (else this test could not tell sequences apart)
            assert len({tuple(t) for t in tokens}) == n
        # one llama_decode per round (the last round: one per chain, as each reads its logits), each
        # carrying every chain's token; the fed chain's forced text rides along in one of them
        assert group.decodes == STEPS - 1 + n
        n_forced = len(model.tokenize(FORCED))
        assert group.batched_tokens == n * STEPS + n_forced
        assert chains[1].n_past == chains[0].n_past + n_forced
    finally:
        for c in chains:
            c.close()
        session.close()


def test_fork_refuses_more_chains_than_the_session_holds(model, prompt):
    session = model.new_session(SamplingParams(temperature=0.0), n_ctx=N_CTX_CHAIN, n_seq=2)
    try:
        with pytest.raises(RuntimeError):
            session.fork(2)  # not prefilled yet
        session.prefill(prompt)
        with pytest.raises(InputError):
            session.fork(3)
    finally:
        session.close()
