"""The bench's speculation section (qvq_local.bench.speculation) on the tiny models, in process.

What it must show, whatever this machine's speed: a cost curve over 1..k+1 tokens; the replay of the
published QVQ replies with the model's own tokenizer (and with Qwen's real vocabulary when installed: the
issue's 1.475 tokens per target step); a draft identical to the target right on every guess (k + 1 tokens
per pass); a mismatched draft wrong on nearly every guess, with ``auto`` ending off; and every
speculative run giving plain decoding's tokens on MLX (llama.cpp past 256 cells: see README).
"""

from __future__ import annotations

import pytest

from qvq_local.bench.speculation import measure_speculation, prompt_and_ids
from qvq_local.speculate.replay import PUBLISHED_REPLIES, read_replies

FIXTURE = PUBLISHED_REPLIES


def _models(backend, request, artifacts, checkpoint):
    if backend == "llama":
        pytest.importorskip("llama_cpp")
        from qvq_local.backends import llamacpp

        pair = request.getfixturevalue("tiny_gguf_q4")
        return llamacpp.load(pair.model, pair.mmproj), _other(backend, checkpoint, artifacts)
    pytest.importorskip("mlx_vlm")
    from qvq_local.backends import mlx

    return mlx.load(request.getfixturevalue("tiny_mlx_q4")), _other(backend, checkpoint, artifacts)


@pytest.fixture(scope="module")
def other_checkpoint(artifacts):
    """The tiny shape with other random weights (and the same synthetic tokenizer)."""
    from qvq_local.convert.synthetic import write_checkpoint

    return write_checkpoint(artifacts / "bench-spec-other", "tiny", dtype="f32", seed=5)


def _other(backend, checkpoint, artifacts):
    if backend == "llama":
        from qvq_local.convert.to_gguf import convert_to_gguf

        from qvq_local.backends import llamacpp

        pair = convert_to_gguf(
            checkpoint, artifacts / "bench-spec-other-q4", quant="q4_k_m", mmproj_quant="f16"
        )
        return llamacpp.load(pair.model, pair.mmproj)
    from qvq_local.convert.to_mlx import convert_to_mlx

    from qvq_local.backends import mlx

    return mlx.load(convert_to_mlx(checkpoint, artifacts / "bench-spec-other-mlx", bits=4, group_size=64))


@pytest.mark.parametrize("backend", ["llama", "mlx"])
def test_the_speculation_section(backend, request, artifacts, sample_image, other_checkpoint):
    from PIL import Image

    from qvq_local.bench.workload import QUESTION

    loaded, other = _models(backend, request, artifacts, other_checkpoint)
    try:
        with Image.open(sample_image) as img:
            image = img.convert("RGB")
        prompt, ids = prompt_and_ids(loaded, loaded.family, image, QUESTION, loaded.family.system_prompt)
        replies, source = read_replies(FIXTURE)
        out = measure_speculation(
            loaded,
            prompt,
            ids,
            k=4,
            replies=replies[:2],
            replay_source=source,
            mismatched=other,
            replay_tokens=48,
            draft_tokens=40,
            runs=1,
        )
    finally:
        loaded.close()
        other.close()
    curve = out["cost_curve"]
    assert (
        curve["sizes"] == [1, 2, 3, 4, 5]
        and all(s > 0 for s in curve["seconds"])
        and curve["ratio"][0] == 1.0
    )
    replay = out["replay"]
    assert replay["replies"] == 2 and replay["tokens"] == 96 and replay["tokens_per_step"] >= 1.0
    assert all(
        r["plain_s"] > 0 and r["spec_s"] > 0 and r["projected_speedup"] > 0 for r in replay["per_reply"]
    )
    if "real_vocabulary" in replay:
        assert replay["real_vocabulary"]["tokens_per_step"] > 1.2
    same = out["identical_draft"]["draft"]
    assert same["acceptance"] == 1.0 and same["tokens_per_step"] == 5.0
    wrong = out["mismatched_draft"]
    assert wrong["draft"]["acceptance"] < 0.2 and wrong["auto"]["final_k"] == 0
    if backend == "mlx":  # batch-invariant logits: exact at any length
        assert same["same_tokens"] and wrong["draft"]["same_tokens"] and wrong["auto"]["same_tokens"]
