"""On a real GPU: what the recorded-input tests (test_gpu_detection, test_gpu_layers) can only imitate.

Every test here needs an NVIDIA GPU with a CUDA build of llama.cpp, or MLX's CUDA build, and skips
cleanly elsewhere (marker ``gpu``).  ``tools/gpu/run.py`` runs them on a lent GPU machine
(``pytest -m gpu``); on a machine with a GPU, ``pytest -m gpu`` runs them directly.
"""

from __future__ import annotations

import pytest

from qvq_local import hardware

pytestmark = pytest.mark.gpu

_SMI_GPUS = hardware.nvidia_memory()
needs_nvidia = pytest.mark.skipif(not _SMI_GPUS, reason="no NVIDIA GPU here (nvidia-smi reports none)")


def _llama_cuda() -> bool:
    try:
        import llama_cpp
    except (ImportError, OSError):
        return False
    return bool(llama_cpp.llama_supports_gpu_offload())


def _mlx_gpu() -> bool:
    try:
        import mlx.core as mx
    except (ImportError, OSError):
        return False
    return mx.default_device() != mx.cpu


needs_llama_cuda = pytest.mark.skipif(
    not (_SMI_GPUS and _llama_cuda()), reason="needs an NVIDIA GPU and llama-cpp-python built with CUDA"
)
needs_mlx_gpu = pytest.mark.skipif(not _mlx_gpu(), reason="needs MLX on a GPU (Metal, or mlx[cuda13])")


@needs_nvidia
def test_memory_query_and_gpu_list_agree():
    """The memory query doctor's estimate relies on, read live: one row per GPU of ``nvidia-smi -L``,
    free memory within the total."""
    names = hardware.detect_nvidia()["gpus"]
    assert [g["name"] for g in _SMI_GPUS] == names
    for gpu in _SMI_GPUS:
        assert 0 < gpu["free_bytes"] <= gpu["total_bytes"]
        assert gpu["total_bytes"] > 2**30


@needs_llama_cuda
def test_doctor_sees_the_cuda_build_and_warns_of_nothing():
    facts = hardware.describe(probe_gpu=True)
    assert facts["cuda"] is True
    assert "CUDA" in [b.upper() for b in facts["llama_gpu_backends"]]
    assert facts["gpu_warning"] is None
    seen = [(g["name"], g["total_bytes"]) for g in facts["nvidia"]["memory"]]
    assert seen == [(g["name"], g["total_bytes"]) for g in _SMI_GPUS]


@needs_llama_cuda
@pytest.mark.llama
@pytest.mark.parametrize("with_image", [False, True], ids=["text", "image"])
def test_full_offload_logits_match_the_cpu(tiny_gguf_f32, tiny_checkpoint, sample_image, with_image):
    """The same f32 tiny model on the GPU (every layer, the projector too) and on the CPU: next-token
    logits after the prompt agree to the tolerance the CPU parity tests give transformers."""
    import numpy as np
    from PIL import Image

    from qvq_local.backends import llamacpp
    from qvq_local.backends.base import Prompt, SamplingParams
    from qvq_local.prompt import build_prompt, load_chat_template

    images = [Image.open(sample_image).convert("RGB")] if with_image else []
    text = build_prompt(load_chat_template(tiny_checkpoint), "What colour is it?", len(images))
    prompt = Prompt(text=text, images=images)
    logits, placements = [], []
    for layers in (-1, 0):
        model = llamacpp.load(tiny_gguf_f32.model, tiny_gguf_f32.mmproj, n_gpu_layers=layers)
        try:
            placements.append(model.placement())
            session = model.new_session(SamplingParams(), n_ctx=model.context_needed(prompt, new_tokens=8))
            try:
                session.prefill(prompt)
                logits.append(session.last_logits())
            finally:
                session.close()
        finally:
            model.close()
    assert placements[0].startswith("GPU (all") and placements[1] == "CPU"
    err = float(np.max(np.abs(logits[0] - logits[1])))
    print(f"\nGPU vs CPU, {'image' if with_image else 'text'} prompt: max |logit diff| = {err:.3e}")
    assert err < (5e-3 if with_image else 2e-3)
    assert int(logits[0].argmax()) == int(logits[1].argmax())


@needs_mlx_gpu
@pytest.mark.mlx
def test_mlx_on_a_gpu_computes_in_the_models_own_dtype(tiny_checkpoint_bf16, tmp_path):
    """Off the CPU, MLX keeps a bf16 model's half-precision activations (the float32 switch is for MLX's
    CPU backend only, where this model gets it), and a 4-bit matmul runs on the GPU."""
    import mlx.core as mx
    from qvq_local.convert.to_mlx import convert_to_mlx

    from qvq_local.backends import mlx as mlx_backend

    model = mlx_backend.load(convert_to_mlx(tiny_checkpoint_bf16, tmp_path / "mlx-q4", bits=4, group_size=64))
    try:
        assert model.compute_note is None
        x = mx.random.normal((4, 64)).astype(mx.bfloat16)
        w, scales, biases = mx.quantize(mx.random.normal((128, 64)).astype(mx.bfloat16), bits=4)
        y = mx.quantized_matmul(x, w, scales, biases, transpose=True, bits=4)
        mx.eval(y)
        assert y.dtype == mx.bfloat16 and y.shape == (4, 128)
        assert bool(mx.all(mx.isfinite(y)))
    finally:
        model.close()
