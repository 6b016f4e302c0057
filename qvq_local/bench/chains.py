"""The ``--samples N`` section of the benchmark: aggregate decode tok/s of N chains decoded in one batch.

For each N in :data:`CHAIN_COUNTS`: one prefill of the smallest bench image with the question, then N
chains (``Session.fork``) stepped in lockstep for ``tokens`` steps each, timed from the first step to the
last (prefill excluded); N = 1 is the plain one-chain session (what ``qvq ask`` runs without
``--samples``), the baseline the others are divided by.  Sampling: :data:`qvq_local.chains.CHAIN_SAMPLING` (what
``--samples`` uses on a greedy model: temperature 0.7, top-k 40, top-p 0.95), chain i seeded ``i``; an end-of-turn token is not decoded, so the
figure counts tokens actually run through the model.  Each N is run ``runs`` times, interleaved
(1, 2, 4, 8, 1, 2, ...) so a neighbour's load hits every N alike; the median and min-max are reported.

Figures per N: ``agg_tok_s`` (all chains' tokens / seconds), ``per_chain_tok_s`` (agg / N) and
``speedup`` (agg / agg at N = 1, medians).  This runs in the bench's worker child (``job: chains`` in
:mod:`qvq_local.bench.worker`) for the backends with the registry's ``chains`` capability
(:func:`chains_not_measured` says why another is not measured); the table is drawn by
:mod:`qvq_local.bench.report`.
"""

from __future__ import annotations

import statistics
import time

CHAIN_COUNTS: tuple[int, ...] = (1, 2, 4, 8)


def chains_not_measured(spec) -> str | None:
    """Why the backend of registry entry ``spec`` gets no ``--samples`` figures (None: it gets them): only
    a backend with the registry's ``chains`` capability forks a prefilled session into chains."""
    from qvq_local.backends import registry

    if spec.has(registry.CHAINS):
        return None
    return f"the {spec.name} backend runs one chain at a time (it has no {registry.CHAINS} capability)"


def _sampling(seed: int = 0):
    from qvq_local.backends.base import SamplingParams
    from qvq_local.chains import CHAIN_SAMPLING

    return SamplingParams(repetition_penalty=1.05, seed=seed, **CHAIN_SAMPLING)


def _one(loaded, prompt, n: int, tokens: int, n_ctx_chain: int, prompt_cells: int) -> dict:
    """One timed run of ``n`` chains (n = 1: a plain session) for ``tokens`` steps each."""
    if n == 1:
        session = loaded.new_session(_sampling(), n_ctx=n_ctx_chain)
        chains = None
    else:
        session = loaded.new_session(
            _sampling(), n_ctx=prompt_cells + n * (n_ctx_chain - prompt_cells), n_seq=n
        )
    try:
        session.prefill(prompt)
        chains = [session] if n == 1 else session.fork(n)
        generated = 0
        t0 = time.perf_counter()
        for _ in range(tokens):
            for chain in chains:
                if not chain.step().is_eos:
                    generated += 1
        for chain in chains:  # the last round's tokens are decoded too (a batching chain defers them)
            chain.last_logits()
        seconds = time.perf_counter() - t0
    finally:
        if n > 1 and chains:
            for chain in chains:
                chain.close()
        session.close()
    agg = generated / seconds if seconds > 0 else 0.0
    return {"tokens": generated, "seconds": seconds, "agg_tok_s": agg, "per_chain_tok_s": agg / n}


def measure_chains(loaded, prompt, *, tokens: int, runs: int, counts=CHAIN_COUNTS) -> dict:
    """Run every N in ``counts`` ``runs`` times, interleaved; medians, spreads and the speedup over N = 1."""
    prompt_cells = _prompt_cells(loaded, prompt)
    n_ctx_chain = prompt_cells + tokens + 64
    _one(loaded, prompt, max(counts), min(tokens, 4), n_ctx_chain, prompt_cells)  # warm-up (kernels)
    samples: dict[int, list[dict]] = {n: [] for n in counts}
    for _ in range(runs):
        for n in counts:
            samples[n].append(_one(loaded, prompt, n, tokens, n_ctx_chain, prompt_cells))
    out: dict = {"tokens_per_chain": tokens, "runs": runs, "by_n": {}}
    base = statistics.median(s["agg_tok_s"] for s in samples[counts[0]]) if counts[0] == 1 else None
    for n in counts:
        aggs = [s["agg_tok_s"] for s in samples[n]]
        per = [s["per_chain_tok_s"] for s in samples[n]]
        med = statistics.median(aggs)
        out["by_n"][str(n)] = {
            "agg_tok_s": med,
            "agg_tok_s_min": min(aggs),
            "agg_tok_s_max": max(aggs),
            "per_chain_tok_s": statistics.median(per),
            "speedup": med / base if base else None,
            "samples": aggs,
        }
    return out


def _prompt_cells(loaded, prompt) -> int:
    """An upper bound on the prompt's KV cells: its text tokens (by the model's tokenizer where its backend
    has one, else the text's bytes) plus the image tokens."""
    from qvq_local.bench.workload import count_tokens
    from qvq_local.families import DEFAULT_FAMILY

    text = prompt.text.replace(DEFAULT_FAMILY.image_block, "")
    n_text = count_tokens(loaded, text, special=True)
    if n_text is None:
        n_text = len(text.encode("utf-8"))  # an upper bound: a token is at least one byte
    images = sum(int(loaded.image_token_estimate(*img.size)) for img in prompt.images)
    return n_text + images + 8
