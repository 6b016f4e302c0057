"""The speculation section of the benchmark: does checking guessed tokens pay on this machine?

Four figures, each from the smallest bench image and the bench question, greedy (QVQ's near-greedy
sampling):

1. **the verify cost curve**: seconds of one forward pass over ``n`` tokens after the prompt, for
   ``n`` = 1 .. k+1 (``speculate.costs.measure``), and the ratio to ``n`` = 1.  A bandwidth-bound GPU
   or Mac verifies 6 tokens for about the price of 1; a 2-core CPU is compute-bound and pays ~n times;
2. **replay of real reasoning text** (``--spec-replay FILE``): each reply is forced through the model
   as its "greedy" output (``speculate.replay``) with n-gram drafting, ``k`` guesses per pass, against
   the same replay one token per pass; tokens per target step, acceptance, the measured speedup and
   the speedup the cost curve projects for those passes.  The replay is tokenised by the model's own
   tokenizer; with Qwen's real vocabulary installed (dashscope) the model-free figure over the whole
   texts is reported too, with the speedup this machine's curve projects for it;
3. **a draft identical to the target** (the model drafting for itself): acceptance 1, k + 1 tokens per
   pass -- the ceiling of what checking guesses can give, and what it costs when the draft costs as much
   as the target;
4. **a mismatched draft** (the same shape, other random weights, the same tokenizer): acceptance near 0,
   and ``auto`` turning speculation off.

Speedups are wall-clock ratios against plain decoding of the same tokens in the same process, medians
of ``runs`` repetitions run in turn (plain, speculative, plain, ...) after a warm-up, so a neighbour's
load on a shared machine falls on both; every speculative run must give plain decoding's tokens
(``same_tokens``).  Run it on a model with ``python -m qvq_local.bench.speculation MODEL
[--spec-replay FILE] [--mismatched OTHER]`` (one JSON object; :func:`main`), or as a section of ``qvq
bench --speculation [--spec-replay FILE]`` (figures 1-3 on each backend that speculates; the mismatched
draft needs a second model, so only the module's command takes it).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from qvq_local.speculate.policy import DEFAULT_K

#: Tokens of each reply forced through the model (the model-free figure reads the whole text).
REPLAY_TOKENS = 384
#: Tokens generated per draft-model run.
DRAFT_TOKENS = 96


def _greedy():
    from qvq_local.backends.base import SamplingParams
    from qvq_local.bench.workload import greedy_sampling

    return SamplingParams(**greedy_sampling())


def _open(loaded, prompt, n_ctx: int, speculation=None):
    session = loaded.new_session(_greedy(), n_ctx=n_ctx, speculation=speculation)
    session.prefill(prompt)
    return session


def verify_curve(loaded, prompt, n_ctx: int, sizes: int, probe: int, repeats: int = 5):
    """The cost curve after the prompt: ``(figures, CostCurve)``."""
    from qvq_local.speculate import costs

    session = _open(loaded, prompt, n_ctx)
    try:
        curve = costs.measure(session.speculation_target(), probe, sizes, repeats=repeats)
    finally:
        session.close()
    return {
        "sizes": list(range(1, sizes + 1)),
        "seconds": curve.as_list(),
        "ratio": [round(curve.ratio(n), 3) for n in range(1, sizes + 1)],
    }, curve


def _replay_once(loaded, prompt, prompt_ids: list[int], ids: list[int], k: int, n_ctx: int):
    """``ids`` forced through the model after ``prompt`` with ``k`` n-gram guesses per pass (0: plain);
    ``(seconds, SpecStats)``."""
    from qvq_local.speculate.engine import Speculator
    from qvq_local.speculate.ngram import NgramDrafter
    from qvq_local.speculate.policy import FixedPlan
    from qvq_local.speculate.replay import ReplayTarget, replay

    session = _open(loaded, prompt, n_ctx)
    try:
        base = session.n_past
        spec = Speculator(
            ReplayTarget(ids, inner=session.speculation_target()),
            NgramDrafter(),
            FixedPlan(k),
            room=lambda: n_ctx - base - spec.stats.tokens,
        )
        spec.start(session.last_logits(), prompt_ids)
        t0 = time.perf_counter()
        stats = replay(spec, len(ids))
        return time.perf_counter() - t0, stats
    finally:
        session.close()


def replay_section(
    loaded,
    prompt,
    prompt_ids: list[int],
    replies,
    source: str,
    curve,
    *,
    k: int,
    max_tokens: int,
    n_ctx: int,
    runs: int,
) -> dict:
    """Figure 2 (see the module docstring)."""
    per_reply = []
    totals = dict.fromkeys(("tokens", "steps", "drafted", "accepted", "plain_s", "spec_s", "cost"), 0.0)
    for reply in replies:
        ids = list(loaded.tokenize(reply.text, special=False))[:max_tokens]
        _replay_once(loaded, prompt, prompt_ids, ids[:8], k, n_ctx)  # warm-up
        plain, spec = [], []
        for _ in range(runs):
            plain.append(_replay_once(loaded, prompt, prompt_ids, ids, 0, n_ctx)[0])
            seconds, stats = _replay_once(loaded, prompt, prompt_ids, ids, k, n_ctx)
            spec.append(seconds)
        plain_s, spec_s = statistics.median(plain), statistics.median(spec)
        cost = stats.projected_cost(curve.ratio)
        per_reply.append(
            {
                "name": reply.name,
                "tokens": stats.tokens,
                "tokens_per_step": round(stats.tokens_per_step, 3),
                "acceptance": round(stats.acceptance, 3),
                "plain_s": round(plain_s, 4),
                "spec_s": round(spec_s, 4),
                "speedup": round(plain_s / spec_s, 3) if spec_s > 0 else None,
                "projected_speedup": round(stats.tokens / cost, 3) if cost else None,
            }
        )
        for key, value in (
            ("tokens", stats.tokens),
            ("steps", stats.steps),
            ("drafted", stats.drafted),
            ("accepted", stats.accepted),
            ("plain_s", plain_s),
            ("spec_s", spec_s),
            ("cost", cost),
        ):
            totals[key] += value
    out = {
        "source": source,
        "replies": len(replies),
        "tokens_per_reply_cap": max_tokens,
        "tokenizer": "the model's own",
        "tokens": int(totals["tokens"]),
        "tokens_per_step": round(totals["tokens"] / totals["steps"], 3) if totals["steps"] else None,
        "acceptance": round(totals["accepted"] / totals["drafted"], 3) if totals["drafted"] else None,
        "speedup": round(totals["plain_s"] / totals["spec_s"], 3) if totals["spec_s"] else None,
        "projected_speedup": round(totals["tokens"] / totals["cost"], 3) if totals["cost"] else None,
        "per_reply": per_reply,
    }
    real = real_vocabulary_replay(replies, curve, k=k)
    if real is not None:
        out["real_vocabulary"] = real
    return out


def real_vocabulary_replay(replies, curve, *, k: int) -> dict | None:
    """The whole replies tokenised with Qwen's real vocabulary (dashscope's ``qwen.tiktoken``), n-gram
    drafting with no model: tokens per target step, and the speedup ``curve`` projects for those passes.
    None when the vocabulary is not installed."""
    from qvq_local.convert import tokenizer_qwen

    if not tokenizer_qwen.available():
        return None
    from tokenizers import Tokenizer

    from qvq_local.convert.tokenizer_synth import build_tokenizer_json
    from qvq_local.families import DEFAULT_FAMILY
    from qvq_local.speculate.replay import simulate

    tok = Tokenizer.from_str(
        build_tokenizer_json(DEFAULT_FAMILY.base_vocab, "qwen", DEFAULT_FAMILY.special_tokens)
    )
    tokens = steps = 0
    cost = 0.0
    per = []
    for reply in replies:
        prompt = (
            f"<|im_start|>system\n{DEFAULT_FAMILY.system_prompt}<|im_end|>\n"
            f"<|im_start|>user\n{reply.question}<|im_end|>\n<|im_start|>assistant\n"
        )
        stats = simulate(
            tok.encode(prompt, add_special_tokens=False).ids,
            tok.encode(reply.text, add_special_tokens=False).ids,
            k,
        )
        tokens += stats.tokens
        steps += stats.steps
        cost += stats.projected_cost(curve.ratio)
        per.append(round(stats.tokens_per_step, 3))
    return {
        "vocabulary": "Qwen (dashscope qwen.tiktoken)",
        "tokens": tokens,
        "tokens_per_step": round(tokens / steps, 3),
        "per_reply": per,
        "projected_speedup": round(tokens / cost, 3),
    }


def _steps(session, tokens: int) -> tuple[float, list[int]]:
    t0 = time.perf_counter()
    ids = [session.step().id for _ in range(tokens)]
    return time.perf_counter() - t0, ids


def _decode(loaded, prompt, n_ctx: int, tokens: int, speculation=None) -> tuple[float, list[int], dict]:
    session = _open(loaded, prompt, n_ctx, speculation)
    try:
        seconds, ids = _steps(session, tokens)
        return seconds, ids, session.speculation_report() or {}
    finally:
        session.close()


def draft_section(
    loaded, prompt, draft, n_ctx: int, *, k: int, tokens: int, runs: int, modes=("draft", "auto")
) -> dict:
    """Figures 3 and 4: ``tokens`` greedy steps plainly, then with ``draft`` drafting in each mode."""
    from qvq_local.speculate.config import SpecSettings

    settings = {mode: SpecSettings(mode=mode, k=k, draft=draft) for mode in modes}
    for mode in (None, *modes):  # warm-up
        _decode(loaded, prompt, n_ctx, min(tokens, 8), settings.get(mode))
    times: dict = {mode: [] for mode in (None, *modes)}
    ids: dict = {}
    reports: dict = {}
    for _ in range(runs):
        for mode in (None, *modes):
            seconds, ids[mode], reports[mode] = _decode(loaded, prompt, n_ctx, tokens, settings.get(mode))
            times[mode].append(seconds)
    plain_s = statistics.median(times[None])
    out: dict = {"tokens": tokens, "runs": runs, "plain_s": round(plain_s, 4)}
    for mode in modes:
        spec_s, report = statistics.median(times[mode]), reports[mode]
        out[mode] = {
            "same_tokens": ids[mode] == ids[None],
            "seconds": round(spec_s, 4),
            "speedup": round(plain_s / spec_s, 3) if spec_s > 0 else None,
            "tokens_per_step": report.get("tokens_per_step"),
            "acceptance": report.get("acceptance"),
            "drafted": report.get("drafted"),
            "final_k": report.get("k"),
            "expected_gain": report.get("expected_gain"),
        }
    return out


def measure_speculation(
    loaded,
    prompt,
    prompt_ids: list[int],
    *,
    k: int = DEFAULT_K,
    replies=None,
    replay_source: str = "",
    mismatched=None,
    replay_tokens: int = REPLAY_TOKENS,
    draft_tokens: int = DRAFT_TOKENS,
    runs: int = 3,
) -> dict:
    """The whole section (see the module docstring); ``mismatched``: a loaded draft model of other
    weights (None: that figure is skipped)."""
    probe = prompt_ids[-1]
    session = _open(loaded, prompt, 1 << 14)
    prompt_cells = session.n_past
    session.close()
    n_ctx = prompt_cells + max(draft_tokens, replay_tokens) + 2 * k + 64
    curve_figures, curve = verify_curve(loaded, prompt, n_ctx, k + 1, probe)
    out: dict = {"k": k, "runs": runs, "prompt_cells": prompt_cells, "cost_curve": curve_figures}
    if replies:
        out["replay"] = replay_section(
            loaded,
            prompt,
            prompt_ids,
            replies,
            replay_source,
            curve,
            k=k,
            max_tokens=replay_tokens,
            n_ctx=n_ctx,
            runs=runs,
        )
    out["identical_draft"] = draft_section(loaded, prompt, loaded, n_ctx, k=k, tokens=draft_tokens, runs=runs)
    if mismatched is not None:
        out["mismatched_draft"] = draft_section(
            loaded, prompt, mismatched, n_ctx, k=k, tokens=draft_tokens, runs=runs
        )
    return out


def prompt_and_ids(loaded, family, image, question: str, system: str | None) -> tuple[Any, list[int]]:
    """The bench prompt for one image, and its text tokens (the drafter's history)."""
    from qvq_local.backends.base import Prompt
    from qvq_local.prompt import build_prompt

    text = build_prompt(loaded.chat_template, question, 1, system, family=family)
    ids = list(loaded.tokenize(text.replace(family.image_block, ""), special=True))
    return Prompt(text=text, images=[image]), ids


def replies_file(path=None) -> str:
    """The replay's replies file, checked (:func:`qvq_local.speculate.replay.read_replies`): ``path``, or
    QVQ-72B-Preview's published replies shipped with the package; InputError (one line) for a bad one."""
    from qvq_local.speculate.replay import PUBLISHED_REPLIES, read_replies

    path = PUBLISHED_REPLIES if path is None else path
    read_replies(str(path))
    return str(path)


def job(spec: dict, load_model) -> dict:
    """The bench worker's ``speculation`` job: figures 1-3 on the model of ``spec`` (``load_model``: the
    worker's loader), from the smallest bench image; each reply replayed for up to 4 x the bench's decode
    tokens (at most :data:`REPLAY_TOKENS`), the identical draft run for its decode tokens (at most
    :data:`DRAFT_TOKENS`)."""
    from qvq_local.bench.workload import QUESTION
    from qvq_local.images import prepare_images
    from qvq_local.speculate.replay import read_replies

    replies, source = read_replies(spec["spec_replay"])
    model = load_model(spec)
    try:
        family = model.family
        size = sorted(spec["images"], key=int)[0]
        image = prepare_images([spec["images"][size]], model.max_pixels, factor=family.image_factor)[0].image
        prompt, ids = prompt_and_ids(model.loaded, family, image, QUESTION, family.system_prompt or None)
        decode = int(spec["decode_tokens"])  # the bench's decode length sizes the section's runs
        figures = measure_speculation(
            model.loaded,
            prompt,
            ids,
            replies=replies,
            replay_source=source,
            replay_tokens=min(REPLAY_TOKENS, 4 * decode),
            draft_tokens=min(DRAFT_TOKENS, decode),
            runs=int(spec["runs"]),
        )
    finally:
        model.close()
    return {"ok": True, "image_size": int(size), **figures}


def main(argv: list[str] | None = None) -> int:
    """``python -m qvq_local.bench.speculation MODEL [--spec-replay FILE] [--mismatched OTHER] [--k K]
    [--runs N] [--backend B] [--image PNG]``: the section on one model, printed as JSON.  ``FILE``: replies
    as :data:`~qvq_local.speculate.replay.PUBLISHED_REPLIES` holds them (those by default); ``OTHER``: a
    model of the same tokenizer and other weights for figure 4.  Bad input: one line, exit 2."""
    import argparse
    import json
    import sys

    from PIL import Image

    from qvq_local.api import load
    from qvq_local.bench.workload import QUESTION
    from qvq_local.errors import QvqError
    from qvq_local.speculate.replay import PUBLISHED_REPLIES, read_replies

    parser = argparse.ArgumentParser(prog="python -m qvq_local.bench.speculation")
    parser.add_argument("model")
    parser.add_argument("--spec-replay", default=str(PUBLISHED_REPLIES))
    parser.add_argument("--mismatched")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--image")
    parser.add_argument("--k", type=int, default=DEFAULT_K)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--replay-tokens", type=int, default=REPLAY_TOKENS)
    args = parser.parse_args(argv)
    try:
        replies, source = read_replies(args.spec_replay)
        if args.image:
            with Image.open(args.image) as img:
                image = img.convert("RGB")
        else:
            image = Image.new("RGB", (224, 168), "white")
        with load(args.model, backend=args.backend) as model:
            other = load(args.mismatched, backend=model.backend).loaded if args.mismatched else None
            try:
                loaded = model.loaded
                prompt, ids = prompt_and_ids(
                    loaded, model.family, image, QUESTION, model.family.system_prompt
                )
                out = measure_speculation(
                    loaded,
                    prompt,
                    ids,
                    k=args.k,
                    replies=replies,
                    replay_source=source,
                    mismatched=other,
                    replay_tokens=args.replay_tokens,
                    runs=args.runs,
                )
            finally:
                if other is not None:
                    other.close()
        out = {"model": model.name, "backend": model.backend, **out}
    except (QvqError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(out, indent=1))
    return 0


__all__ = [
    "DRAFT_TOKENS",
    "REPLAY_TOKENS",
    "draft_section",
    "job",
    "measure_speculation",
    "prompt_and_ids",
    "real_vocabulary_replay",
    "replay_section",
    "replies_file",
    "verify_curve",
]

if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
