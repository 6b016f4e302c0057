"""A recurrent state (Qwen3.5's Gated DeltaNet layers) through the prefix cache and the chains, on both
backends.

A linear-attention layer's state cannot be cut back to a shorter prefix, so a reused prefix, and a forked
chain, must carry a snapshot of it: llama.cpp's sequence state (``llama_state_seq_get_data`` /
``set_data``) holds the hybrid memory's recurrent cells with its KV cells, and ``llama_memory_seq_cp``
shares a recurrent cell that the first decode of either sequence copies (copy on write); the MLX session
exports and restores mlx-vlm's ``ArraysCache`` arrays beside the KV arrays and gives each chain its own copy
of the cache.  The reference is always a plain session that never reused or forked anything.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from vl_parity import chart_image

from qvq_local.backends.base import Prompt, SamplingParams
from qvq_local.families import qwen3_5
from qvq_local.prompt import build_prompt, load_chat_template

FAMILIES = [qwen3_5.FAMILY, qwen3_5.MOE_FAMILY]
Q1 = "Which bar is the tallest, and by how much?"
Q2 = "What colour is the line?"
FORCED = "\n\nTime is up.\n</think>\n\n"


def _load(backend: str, fam, request):
    if backend == "llama":
        pytest.importorskip("llama_cpp")
        from qvq_local.backends import llamacpp

        pair = request.getfixturevalue("q35_ggufs")[fam.name]
        return llamacpp.load(pair.model, pair.mmproj)
    pytest.importorskip("mlx_vlm")
    from qvq_local.backends import mlx

    return mlx.load(request.getfixturevalue("q35_mlx")[fam.name])


@pytest.fixture(scope="module", params=[(b, f) for b in ("llama", "mlx") for f in FAMILIES],
                ids=lambda p: f"{p[0]}-{p[1].name}")  # fmt: skip
def loaded(request):
    backend, fam = request.param
    model = _load(backend, fam, request)
    yield model
    model.close()


@pytest.fixture(scope="module")
def prompts(loaded, q35_ckpts):
    fam = loaded.family
    template = load_chat_template(q35_ckpts[fam.name])
    image = chart_image()
    return [
        Prompt(text=build_prompt(template, q, 1, system=None, family=fam), images=[image]) for q in (Q1, Q2)
    ]


def test_the_family_says_its_state_is_recurrent(loaded):
    assert loaded.family.recurrent_state


def test_restored_prefix_gives_a_fresh_prefills_logits(loaded, prompts):
    """Question 2 after question 1's prefix (its KV cells and its recurrent state, restored) gives the
    logits of question 2 prefilled from scratch, and one generated token later too; the image is not encoded
    again."""
    first = loaded.new_session(SamplingParams(), n_ctx=1024)
    first.prefill(prompts[0], keep_prefix=True)
    state = first.prefix_state
    first.close()
    assert state is not None and state.n_cells > 70
    if loaded.backend == "mlx":  # the linear layers' arrays are in the snapshot
        assert {"0.state0", "0.state1", "3.keys", "3.values"} <= set(state.tensors)
    fresh = loaded.new_session(SamplingParams(), n_ctx=1024)
    fresh.prefill(prompts[1])
    reused = loaded.new_session(SamplingParams(), n_ctx=1024)
    reused.prefill(prompts[1], prefix=state)
    assert fresh.images_encoded == 1 and reused.images_encoded == 0
    a, b = fresh.last_logits(), reused.last_logits()
    ta, tb = fresh.step(), reused.step()
    a2, b2 = fresh.last_logits(), reused.last_logits()
    for s in (fresh, reused):
        s.close()
    err = max(float(np.abs(a - b).max()), float(np.abs(a2 - b2).max()))
    print(f"\n{loaded.backend} {loaded.family.name}: restored prefix vs fresh, max |logit diff| {err:.3g}")
    assert ta.id == tb.id and err <= 1e-5


def test_a_state_written_to_disk_restores_too(loaded, prompts, tmp_path):
    """Through the prefix cache's own file (safetensors + checksum): the recurrent arrays survive."""
    from qvq_local import prefix_cache

    first = loaded.new_session(SamplingParams(), n_ctx=1024)
    first.prefill(prompts[0], keep_prefix=True)
    path = tmp_path / "state.safetensors"
    prefix_cache.write_state(path, "k", first.prefix_state)
    first.close()
    state = prefix_cache.read_state(path, "k")
    reused = loaded.new_session(SamplingParams(), n_ctx=1024)
    reused.prefill(prompts[0], prefix=state)
    fresh = loaded.new_session(SamplingParams(), n_ctx=1024)
    fresh.prefill(prompts[0])
    err = float(np.abs(fresh.last_logits() - reused.last_logits()).max())
    for s in (fresh, reused):
        s.close()
    assert err <= 1e-5, err


@pytest.mark.parametrize(
    "sampling",
    [
        SamplingParams(temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.05, seed=0),
        SamplingParams(temperature=1.5, top_p=1.0, top_k=0, repetition_penalty=1.0, seed=7),
    ],
    ids=["greedy", "seeded"],
)
def test_forked_chains_carry_their_own_recurrent_state(loaded, prompts, sampling):
    """Chain i gives the tokens (and, to llama.cpp's batching noise, the logits) of a plain session seeded
    ``seed + i``, chain 1 being fed forced text halfway: each chain's recurrent state is its own."""
    n, steps_per_chain, feed_at = 3, 12, 4

    def drive(session, i, tokens):
        for k in range(steps_per_chain):
            tokens.append(session.step().id)
            if k == feed_at and i == 1:
                session.feed(FORCED)
        return session.last_logits()

    ref = []
    for i in range(n):
        s = loaded.new_session(replace(sampling, seed=sampling.seed + i), n_ctx=1024)
        s.prefill(prompts[0])
        tokens: list[int] = []
        ref.append((tokens, drive(s, i, tokens)))
        s.close()
    session = loaded.new_session(sampling, n_ctx=1024 * n, n_seq=n)
    session.prefill(prompts[0])
    chains = session.fork(n)
    got = []
    for i, chain in enumerate(chains):  # one chain after the other: each must be untouched by the others
        tokens = []
        got.append((tokens, drive(chain, i, tokens)))
    assert [t for t, _ in got] == [t for t, _ in ref]
    atol = 1e-5 if loaded.backend == "mlx" else 2e-3  # llama.cpp: batched vs sequential decoding rounds apart
    for (_, a), (_, b) in zip(got, ref):
        np.testing.assert_allclose(a, b, atol=atol, rtol=0)
    if sampling.temperature:
        assert len({tuple(t) for t, _ in got}) == n
    for c in chains:
        c.close()
    session.close()


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["llama", "mlx"])
def test_the_api_reuses_the_prefix_and_runs_chains(backend, request, tmp_path):
    """Through the API: a second question about the same image restores the prefix (KV cells and recurrent
    state) from memory and answers as a model with the cache off does; samples=3 runs three chains from
    one prefill and each chain's answer is a separate session's."""
    from qvq_local import api

    pytest.importorskip("llama_cpp" if backend == "llama" else "mlx_vlm")
    fam = qwen3_5.FAMILY
    ref = (
        request.getfixturevalue("q35_ggufs")[fam.name].model
        if backend == "llama"
        else request.getfixturevalue("q35_mlx")[fam.name]
    )
    image = tmp_path / "chart.png"
    chart_image().save(image)
    kw = {"think_budget": 6, "answer_budget": 4, "system": "", "temperature": 0.0, "seed": 1}
    with api.load(str(ref), backend=backend) as cached, api.load(str(ref), backend=backend) as plain:
        plain.prefix_cache = None
        first = cached.ask(str(image), Q1, **kw)
        second = cached.ask(str(image), Q2, **kw)
        assert first.settings["prefix_cache"]["source"] == "fresh"
        assert second.settings["prefix_cache"]["source"] == "memory"
        again = plain.ask(str(image), Q2, **kw)
        assert again.settings["prefix_cache"]["source"] == "off"
        assert (second.thought, second.answer) == (again.thought, again.answer)
        chained = cached.ask(
            str(image), Q1, samples=3, **{**kw, "temperature": 1.5, "top_p": 1.0, "top_k": 0}
        )
        assert len(chained.chains) == 3 and chained.settings["samples"] == 3
        assert len({c.thought for c in chained.chains}) > 1  # each chain went its own way


@pytest.mark.llama
def test_a_backend_that_cannot_hold_the_state_says_so_and_runs_without_it(request, tmp_path):
    """A backend with prefix states and chains but not the ``recurrent_state`` capability (a plugin's, say):
    a Qwen3.5 question runs without prefix reuse and with one chain, each said in one line."""
    from dataclasses import replace as dc_replace

    from qvq_local import api
    from qvq_local.backends import registry

    pytest.importorskip("llama_cpp")
    pair = request.getfixturevalue("q35_ggufs")[qwen3_5.FAMILY.name]
    image = tmp_path / "chart.png"
    chart_image().save(image)
    notices: list[str] = []
    with api.load(str(pair.model), backend="llama") as model:
        model.spec = dc_replace(model.spec, capabilities=model.spec.capabilities - {registry.RECURRENT_STATE})
        model.cache_notice = notices.append
        kw = {"think_budget": 4, "answer_budget": 2, "system": ""}
        for _ in range(2):
            result = model.ask(str(image), Q1, **kw)
            assert result.settings["prefix_cache"]["source"] == "off"
        result = model.ask(str(image), Q1, samples=3, **kw)
    assert result.chains == [] and "samples" not in result.settings
    assert len(notices) == 4 and all("\n" not in n for n in notices)
    assert notices[0] == (
        "prefix cache: the llama backend cannot snapshot Qwen3.5's recurrent state; running without it"
    )
    assert (
        "samples 3: the llama backend cannot copy Qwen3.5's recurrent state per chain; running one chain"
        in notices
    )
