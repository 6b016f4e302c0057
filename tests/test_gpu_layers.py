"""``--gpu-layers`` / ``$QVQ_GPU_LAYERS``: how many text layers llama.cpp puts on the GPU.

This machine may have no GPU and a CPU-only llama.cpp build, so the decision is checked on recorded
inputs and by watching the value reach ``llama_model_load_from_file``'s params; the figures on a real
GPU are in the README (measured on a lent H200).
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

from qvq_local.backends import llama_buffers as lb
from qvq_local.errors import InputError


def test_option_then_environment_then_none(monkeypatch):
    monkeypatch.delenv(lb.GPU_LAYERS_ENV, raising=False)
    assert lb.requested_gpu_layers(None) is None  # the backend decides: all where there is a GPU
    assert [lb.requested_gpu_layers(v) for v in ("all", " ALL ", "-1", -1, "0", 0, "20", 20)] == [
        -1, -1, -1, -1, 0, 0, 20, 20,
    ]  # fmt: skip
    monkeypatch.setenv(lb.GPU_LAYERS_ENV, "14")
    assert lb.requested_gpu_layers(None) == 14
    assert lb.requested_gpu_layers("3") == 3  # the option beats the environment
    monkeypatch.setenv(lb.GPU_LAYERS_ENV, "most")
    with pytest.raises(InputError) as err:
        lb.requested_gpu_layers(None)
    assert (
        str(err.value)
        == f"{lb.GPU_LAYERS_ENV} must be a whole number of layers (0 or more), or all (-1), got 'most'"
    )
    for bad in ("-2", -5, "2.5", 2.5, True):
        with pytest.raises(InputError, match="^--gpu-layers must be a whole number"):
            lb.requested_gpu_layers(bad)


def test_placement_in_words():
    from qvq_local.backends.llamacpp import LlamaModel

    def where(offload: bool, layers: int, total: int = 28) -> str:
        return LlamaModel.placement(SimpleNamespace(gpu_offload=offload, n_gpu_layers=layers, n_layers=total))

    assert where(True, -1) == "GPU (all 28 layers)"
    assert where(True, 28) == where(True, 99) == "GPU (all 28 layers)"  # llama.cpp clamps to the model
    assert where(True, 14) == "GPU 14 of 28 layers, CPU the rest"
    assert where(False, -1) == "CPU"  # a CPU-only build ignores the request
    assert where(False, 0) == "CPU"


@pytest.mark.llama
def test_the_layer_count_reaches_llama_cpp(tiny_gguf_q4, monkeypatch):
    """The value handed to ``llama_model_load_from_file`` is the option's, else the environment's, else
    the build's default (all on a GPU build, 0 on a CPU-only one)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from qvq_local.backends import llamacpp

    real = llama_cpp.llama_model_load_from_file
    seen: list[int] = []

    def spy(path, params):
        seen.append(int(params.n_gpu_layers))
        return real(path, params)

    monkeypatch.setattr(llama_cpp, "llama_model_load_from_file", spy)
    gpu_build = bool(llama_cpp.llama_supports_gpu_offload())
    model_path, mmproj = tiny_gguf_q4.model, tiny_gguf_q4.mmproj

    def load(**kw):
        model = llamacpp.load(model_path, mmproj, **kw)
        model.close()
        return model

    monkeypatch.delenv(lb.GPU_LAYERS_ENV, raising=False)
    default = load()
    monkeypatch.setenv(lb.GPU_LAYERS_ENV, "1")
    from_env = load()
    from_option = load(n_gpu_layers="all")
    assert seen == [-1 if gpu_build else 0, 1, -1]
    assert (default.n_gpu_layers, from_env.n_gpu_layers, from_option.n_gpu_layers) == (seen[0], 1, -1)
    assert from_env.n_layers >= 2  # llama.cpp's own count, which placement() reports against
    if not gpu_build:
        assert from_env.placement() == "CPU" and not from_env.gpu_offload
    with pytest.raises(InputError, match="^n_gpu_layers must be a whole number"):
        llamacpp.load(model_path, mmproj, n_gpu_layers=-3)


def test_bench_hands_gpu_layers_to_its_workers_and_restores_the_environment(monkeypatch):
    from qvq_local.bench import harness, report

    seen = {}

    def fake_run_bench(**kw):
        seen["env"] = os.environ.get(lb.GPU_LAYERS_ENV)
        return {"backends": {"llama": {"available": True}}, "elapsed_s": 0.0}

    monkeypatch.setattr(harness, "run_bench", fake_run_bench)
    monkeypatch.setattr(report, "render_tables", lambda *a, **k: None)
    monkeypatch.setenv(lb.GPU_LAYERS_ENV, "5")
    common = dict(
        model="m", shape=None, backend="llama", image_sizes="224", runs=1, decode_tokens=4, quant="q4",
        raw=False, json_path=None, chart_path=None, bandwidth_mib=8,
    )  # fmt: skip
    harness.bench_command(**common, gpu_layers="all")
    assert seen["env"] == "-1"  # the workers are child processes: they read it from there
    assert os.environ[lb.GPU_LAYERS_ENV] == "5"  # the caller's own value is back
    with pytest.raises(InputError, match="^--gpu-layers must be"):
        harness.bench_command(**common, cpu_buffers="none", gpu_layers="lots")
    assert os.environ[lb.GPU_LAYERS_ENV] == "5"
    assert lb.ENV_VAR not in os.environ  # a bad value leaves nothing half-set
