"""``--gpu-layers`` / ``$QVQ_GPU_LAYERS`` and doctor's GPU memory advice (NVIDIA and Metal).

This machine has no GPU and a CPU-only llama.cpp build, so the decisions are checked on recorded inputs
(nvidia-smi output, llama.cpp's log lines, Metal's working set) and by watching the value reach
``llama_model_load_from_file``'s params.  No figures from a real GPU exist yet: ``examples/gpu_fit.py``
and ``qvq bench --gpu-layers`` measure them where there is one.
"""

from __future__ import annotations

import json
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
    """Counted as llama.cpp counts (its "offloaded 29/29 layers"): the 28 blocks and the output layer."""
    from qvq_local.backends.llamacpp import LlamaModel

    def where(offload: bool, layers: int, blocks: int = 28) -> str:
        return LlamaModel.placement(SimpleNamespace(gpu_offload=offload, gpu_layers=layers, n_layers=blocks))

    assert where(True, -1) == "GPU (all 29 layers)"
    assert where(True, 29) == where(True, 99) == "GPU (all 29 layers)"  # llama.cpp clamps to the model
    assert where(True, 28) == "GPU 28 of 29 layers, CPU the rest"  # the output layer and 27 blocks
    assert where(True, 14) == "GPU 14 of 29 layers, CPU the rest"
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

    def load(options=None):
        model = llamacpp.load(model_path, mmproj, options)
        model.close()
        return model

    monkeypatch.delenv(lb.GPU_LAYERS_ENV, raising=False)
    default = load()
    monkeypatch.setenv(lb.GPU_LAYERS_ENV, "1")
    from_env = load()
    from_option = load(lb.LlamaOptions(gpu_layers="all"))
    assert seen == [-1 if gpu_build else 0, 1, -1]
    assert (default.gpu_layers, from_env.gpu_layers, from_option.gpu_layers) == (seen[0], 1, -1)
    assert from_env.n_layers >= 2  # llama.cpp's own count, which placement() reports against
    if not gpu_build:
        assert from_env.placement() == "CPU" and not from_env.gpu_offload
    with pytest.raises(InputError, match="^gpu_layers must be a whole number"):
        llamacpp.load(model_path, mmproj, lb.LlamaOptions(gpu_layers=-3))


def test_bench_hands_the_llama_options_to_its_workers_in_their_spec_not_the_environment(
    monkeypatch, tmp_path
):
    """``qvq bench --gpu-layers/--cpu-buffers``: each measured backend gets the options its own type takes,
    checked and normalised before any work, in its workers' job spec; the environment is left alone."""
    from qvq_local.bench import harness, report

    seen = {}
    real_run_bench = harness.run_bench

    def fake_run_bench(**kw):
        seen.update(kw, env=os.environ.get(lb.GPU_LAYERS_ENV))
        return {"backends": {"llama": {"available": True}}, "elapsed_s": 0.0}

    monkeypatch.setattr(harness, "run_bench", fake_run_bench)
    monkeypatch.setattr(report, "render_tables", lambda *a, **k: None)
    monkeypatch.setenv(lb.GPU_LAYERS_ENV, "5")
    monkeypatch.delenv(lb.ENV_VAR, raising=False)
    common = dict(
        model="m", shape=None, backend="llama", image_sizes="224", runs=1, decode_tokens=4, quant="q4",
        raw=False, json_path=None, chart_path=None, bandwidth_mib=8,
    )  # fmt: skip
    labels = {"gpu_layers": "--gpu-layers", "cpu_buffers": "--cpu-buffers"}
    harness.bench_command(**common, options={"gpu_layers": "all"}, option_labels=labels)
    assert seen["options"] == {"gpu_layers": "all"} and seen["option_labels"] == labels
    assert seen["env"] == "5" and os.environ[lb.GPU_LAYERS_ENV] == "5"  # nothing goes through it
    # what the workers get: per backend, the options its type takes, normalised ("all" is -1)
    given = {"gpu_layers": "all", "cpu_buffers": "NONE", "think": None}
    assert harness.load_options(["llama", "mlx"], given, labels) == {
        "llama": {"gpu_layers": -1, "cpu_buffers": "none"},
        "mlx": {},
    }
    with pytest.raises(InputError, match="^--gpu-layers must be"):  # checked by LlamaOptions, before any work
        harness.load_options(["llama"], {"cpu_buffers": "none", "gpu_layers": "lots"}, labels)
    with pytest.raises(InputError, match="^the mlx backend has no option --gpu-layers"):
        harness.load_options(["mlx"], {"gpu_layers": 2}, labels)
    with pytest.raises(InputError, match="^--gpu-layers must be"):  # run_bench checks them before any work
        real_run_bench(
            model="m", backend="llama", options={"gpu_layers": "lots"}, option_labels=labels, home=tmp_path
        )
    assert not any(tmp_path.iterdir())
    assert lb.ENV_VAR not in os.environ and os.environ[lb.GPU_LAYERS_ENV] == "5"


# ---------------------------------------------------------------- how many layers fit in the GPU's memory

#: ``nvidia-smi --query-gpu=name,memory.total,memory.free --format=csv,noheader,nounits`` (the query
#: hardware.NVIDIA_SMI_MEMORY_QUERY sends) as printed on a desktop with a busy RTX 4090.  No reading from
#: the H200 that is lent at times is recorded yet: tools/gpu/run.py records one for tests/data/gpu/.
SMI_MEMORY_4090 = "NVIDIA GeForce RTX 4090, 24564, 23354\n"


def test_nvidia_smi_memory_parses():
    from qvq_local import hardware

    assert hardware.parse_nvidia_smi_memory(SMI_MEMORY_4090) == [
        {
            "name": "NVIDIA GeForce RTX 4090",
            "total_bytes": 24564 * 2**20,
            "free_bytes": (24564 - 1210) * 2**20,
        }
    ]
    two = "NVIDIA H100 80GB HBM3, 81559, 81003\nNVIDIA H100 80GB HBM3, 81559, 80999\n"
    assert [g["free_bytes"] for g in hardware.parse_nvidia_smi_memory(two)] == [81003 * 2**20, 80999 * 2**20]
    assert hardware.parse_nvidia_smi_memory("NVIDIA-SMI has failed because it couldn't communicate\n") == []
    assert hardware.parse_nvidia_smi_memory("Tesla T4, [N/A], [N/A]\n") == []


GB = 10**9


def test_offload_plan_puts_what_fits_and_names_the_gpu_layers_option():
    from qvq_local import fit

    # QVQ-72B Q4_K_M in round figures: 80 blocks of 0.55 GB, a 1.2 GB output layer, a 1.3 GB F16 mmproj,
    # KV 2 x 2,400 tokens x 8 heads x 128 x 2 bytes per block
    layers, head, mmproj, kv = [int(0.55 * GB)] * 80, int(1.2 * GB), int(1.3 * GB), 2 * 2400 * 8 * 128 * 2
    big = fit.gpu_offload_plan(layers, head, kv, mmproj, 141 * GB)
    assert big["fits"] and big["gpu_layers"] == "all" and big["layers"] == 81  # llama.cpp's count
    assert 44 * GB < big["needed_bytes"] < 55 * GB  # weights + KV + 10% + 1 GiB
    desk = fit.gpu_offload_plan(layers, head, kv, mmproj, 23 * GB)
    n = desk["gpu_layers"]
    assert not desk["fits"] and n == 32  # the output layer and 31 blocks

    def used(blocks):
        return (blocks * 0.55 * GB + 1.2 * GB + 1.3 * GB) * 1.1 + blocks * kv + fit.GPU_RESERVE

    assert used(n - 1) <= 23 * GB < used(n)  # the N it names fits, N + 1 does not
    tiny = fit.gpu_offload_plan(layers, head, kv, mmproj, 2 * GB)
    assert tiny["gpu_layers"] == 0 and not tiny["fits"]


def test_gpu_need_follows_llama_cpps_count():
    """``--gpu-layers N``: the output layer first, then the last N - 1 blocks; 0: nothing, the vision
    encoder included (it follows the text layers)."""
    from qvq_local import fit

    layers, head, kv, mmproj = [10, 20, 30], 100, 1, 5
    reserve = fit.GPU_RESERVE
    assert fit.gpu_need_bytes(layers, head, kv, mmproj, 0) == 0
    assert fit.gpu_need_bytes(layers, head, kv, mmproj, 1) == 105 + int(10.5) + reserve  # output + encoder
    assert fit.gpu_need_bytes(layers, head, kv, mmproj, 2) == 135 + 1 + int(13.5) + reserve  # + last block
    everything = fit.gpu_need_bytes(layers, head, kv, mmproj, 4)
    assert everything == 165 + 3 + int(16.5) + reserve
    assert fit.gpu_need_bytes(layers, head, kv, mmproj, -1) == everything
    assert fit.gpu_need_bytes(layers, head, kv, mmproj, 40) == everything  # more than there are: all


def test_tied_head_counts_the_embedding_copy():
    from qvq_local import fit

    class T:
        def __init__(self, n):
            self.n_bytes = n

    tensors = {"token_embd.weight": T(500), "output_norm.weight": T(4), "blk.0.attn_q.weight": T(10),
               "blk.0.ffn_up.weight": T(20), "blk.1.attn_q.weight": T(11)}  # fmt: skip
    assert fit.gguf_layer_bytes(tensors) == ([30, 11], 504)  # no output.weight: the embedding is copied
    tensors["output.weight"] = T(300)
    assert fit.gguf_layer_bytes(tensors) == ([30, 11], 304)


def test_doctor_says_how_many_layers_fit(tiny_gguf_q4, monkeypatch):
    """``qvq doctor --model`` on a machine whose GPU (recorded nvidia-smi) is too small for the model."""
    from typer.testing import CliRunner

    from qvq_local import fit, hardware
    from qvq_local.cli import app
    from qvq_local.formats.gguf import read_gguf_header

    monkeypatch.setattr(fit, "GPU_RESERVE", 0)
    layers, head = fit.gguf_layer_bytes(read_gguf_header(tiny_gguf_q4.model).tensors)
    mmproj = tiny_gguf_q4.mmproj.stat().st_size
    # the arithmetic is tested above; here the wiring: a GPU (MiB, as nvidia-smi counts) with room for
    # the output layer and one block, not for the whole model
    shape = fit.gguf_shape(tiny_gguf_q4.model)
    kv = 2 * 16 * shape["kv_heads"] * shape["head_dim"] * shape["kv_bytes"]  # --context 16
    free = fit.gpu_need_bytes(layers, head, kv, mmproj, 2)
    assert free < fit.gpu_need_bytes(layers, head, kv, mmproj, -1)
    real_describe = hardware.describe

    def describe(probe_gpu=False):
        facts = real_describe(probe_gpu=False)
        facts["nvidia"] = {"present": True, "gpus": ["NVIDIA GeForce RTX 4090"], "driver": "550.54.15",
                           "memory": [{"name": "NVIDIA GeForce RTX 4090", "total_bytes": free + 2**30, "free_bytes": free}]}  # fmt: skip
        return facts

    monkeypatch.setattr(hardware, "describe", describe)
    result = CliRunner().invoke(app, ["doctor", "--model", str(tiny_gguf_q4.model), "--context", "16"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert f"--gpu-layers 2 puts 2 of {len(layers) + 1} layers there and runs the rest on the CPU" in text
    assert "NVIDIA GeForce RTX 4090" in text


def test_a_gpu_allocation_failure_names_the_option():
    from qvq_local.backends.llama_runtime import load_failure_hint

    # llama.cpp's own lines when the weights do not fit (ggml-cuda.cu, llama-model.cpp)
    oom = (
        "ggml_backend_cuda_buffer_type_alloc_buffer: allocating 45312.00 MiB on device 0: cudaMalloc failed:"
        " out of memory llama_model_load: error loading model: unable to allocate CUDA0 buffer"
        " llama_model_load_from_file_impl: failed to load model"
    )
    assert "put fewer layers with --gpu-layers N there" in load_failure_hint(oom, -1)
    assert "put fewer than --gpu-layers 40 there" in load_failure_hint(oom, 40)
    assert load_failure_hint(oom, 0) is None  # nothing was going to the GPU
    host = "ggml_backend_cpu_buffer_type_alloc_buffer: failed to allocate buffer of size 47513075712"
    assert load_failure_hint(host, -1) is None  # main memory, not the GPU's
    corrupt = "llama_model_load: error loading model: tensor 'blk.0.attn_q.weight' data is not within the file bounds"
    assert load_failure_hint(corrupt, -1) is None


@pytest.mark.llama
def test_doctor_reads_every_part_of_a_split_gguf(tiny_gguf_q4, tmp_path):
    """A split model's blocks and output layer lie in several files: the estimate counts all of them."""
    from gguf_split import split_gguf  # tests/gguf_split.py: llama.cpp's split layout

    from qvq_local.fit import gguf_layer_bytes, gpu_fit
    from qvq_local.formats.gguf import read_gguf_header

    parts = split_gguf(tiny_gguf_q4.model, tmp_path, "tiny-Q4_K_M", 3)
    shape, gpus = {"kv_heads": 2, "head_dim": 32, "kv_bytes": 2}, [{"name": "GPU", "free_bytes": 2**20}]

    def fit(path):
        return gpu_fit(SimpleNamespace(format="gguf", path=path, mmproj=tiny_gguf_q4.mmproj), shape, 16, gpus)

    assert fit(parts[0]) == fit(tiny_gguf_q4.model)
    first_only = gguf_layer_bytes(read_gguf_header(parts[0]).tensors)
    assert first_only != gguf_layer_bytes(read_gguf_header(tiny_gguf_q4.model).tensors)  # it matters


def test_a_bad_value_stops_api_load_before_the_model_is_looked_up(monkeypatch, tmp_path):
    """Checked before resolving (a hub id would be downloaded first): the model here does not exist."""
    from qvq_local import api

    missing = str(tmp_path / "no-such-model.gguf")
    with pytest.raises(InputError, match="^gpu_layers must be a whole number"):
        api.load(missing, gpu_layers="lots")
    monkeypatch.setenv(lb.GPU_LAYERS_ENV, "lots")
    with pytest.raises(InputError, match=f"^{lb.GPU_LAYERS_ENV} must be a whole number"):
        api.load(missing)


@pytest.mark.llama
def test_gpu_fit_example_prints_the_real_use_beside_the_estimate(tiny_gguf_q4, monkeypatch, capsys):
    """examples/gpu_fit.py with nvidia-smi's readings recorded (this machine has no GPU): in use before
    and after each load, the difference against doctor's estimate for the same --gpu-layers."""
    import runpy
    from pathlib import Path

    from qvq_local import fit, hardware, hub

    in_use = iter([0, 0, 3 * GB, GB])  # the GPU check, one reading before the loads, one after each
    monkeypatch.setattr(
        hardware,
        "nvidia_memory",
        lambda: [{"name": "GPU", "total_bytes": 80 * GB, "free_bytes": 80 * GB - next(in_use)}],
    )
    script = Path(__file__).parents[1] / "examples" / "gpu_fit.py"
    monkeypatch.setattr("sys.argv", ["gpu_fit.py", str(tiny_gguf_q4.model), "--gpu-layers", "all,1"])
    runpy.run_path(str(script), run_name="__main__")
    lines = capsys.readouterr().out.splitlines()
    resolved = hub.resolve(str(tiny_gguf_q4.model), download=False)
    shape = fit.gguf_shape(resolved.path)
    sizes = fit.offload_sizes(resolved, shape, fit.default_context(shape["context_length"]))
    for value, layers, real in (("all", -1, 3 * GB), ("1", 1, GB)):
        row = next(line.split() for line in lines if line.split()[:1] == [value])
        estimate = fit.gpu_need_bytes(*sizes, layers)
        assert row[-3:] == [f"{real / 1e9:.2f}", f"{estimate / 1e9:.2f}", f"{estimate / real:.2f}"]


# ---------------------------------------------------------------- Apple Silicon: Metal's working set

GIB = 2**30


def test_metal_working_set_from_mlx_device_info():
    from qvq_local import hardware

    # Published readings of Metal's recommendedMaxWorkingSetSize: an M5 Max with 128 GB (107.52 GiB)
    assert hardware.metal_working_set({"max_recommended_working_set_size": int(107.52 * GIB)}) == int(
        107.52 * GIB
    )
    assert hardware.metal_working_set({}) is None  # what mlx's CPU build on Linux returns


def test_metal_fit_names_the_sysctl_only_where_the_memory_is_there():
    from qvq_local import fit

    mac64 = 64 * GIB
    ok = fit.metal_fit(40 * GIB, 48 * GIB, mac64)
    assert ok["fits"] and "sysctl" not in ok
    tight = fit.metal_fit(50 * GIB, 48 * GIB, mac64)  # QVQ-72B GGUF with its KV cache, say
    assert not tight["fits"]
    assert tight["sysctl"] == f"sudo sysctl iogpu.wired_limit_mb={50 * 1024 + 1024}"
    near = fit.metal_fit(51 * GIB, 48 * GIB, mac64)  # the spare GiB would pass the ceiling: capped
    assert near["sysctl"] == f"sudo sysctl iogpu.wired_limit_mb={int((64 - 12.8) * 1024)}"
    too_big = fit.metal_fit(60 * GIB, 48 * GIB, mac64)  # the system needs its share: no sysctl
    assert not too_big["fits"] and "sysctl" not in too_big
    small = fit.metal_fit(9 * GIB, int(10.67 * GIB), 16 * GIB)  # a 16 GB Mac (published: 10.67 GiB)
    assert small["fits"]
    over = fit.metal_fit(12 * GIB, int(10.67 * GIB), 16 * GIB)  # 8 GiB stay with the system there
    assert not over["fits"] and "sysctl" not in over
    unknown = fit.metal_fit(50 * GIB, 48 * GIB, None)  # total memory unread: no advice either way
    assert not unknown["fits"] and "sysctl" not in unknown


def test_metal_rows_in_words():
    from qvq_local.doctor import metal_fit_line

    row = {"working_set_bytes": 48 * GIB, "needed_bytes": 50 * GIB, "fits": False}
    assert metal_fit_line({**row, "total_bytes": None}).endswith(
        "the model needs 50.0 GiB: more than Metal may use"
    )
    assert metal_fit_line({**row, "total_bytes": 64 * GIB}).endswith(
        "too much for this Mac, whose system needs the rest"
    )
    assert metal_fit_line({**row, "fits": True, "total_bytes": 64 * GIB}).endswith(": it fits")


def test_doctor_shows_the_metal_row(tiny_checkpoint, monkeypatch):
    from typer.testing import CliRunner

    from qvq_local import hardware
    from qvq_local.cli import app

    real_describe = hardware.describe

    def describe(probe_gpu=False):
        facts = real_describe(probe_gpu=False)
        facts.update(metal=True, metal_working_set_bytes=1024, memory_total_bytes=64 * GIB)
        return facts

    monkeypatch.setattr(hardware, "describe", describe)
    result = CliRunner().invoke(app, ["doctor", "--model", str(tiny_checkpoint), "--json"])
    assert result.exit_code == 0, result.output
    metal = json.loads(result.stdout)["model"]["metal"]
    assert metal["working_set_bytes"] == 1024 and metal["fits"] is False
    assert metal["sysctl"].startswith("sudo sysctl iogpu.wired_limit_mb=")
    text = " ".join(CliRunner().invoke(app, ["doctor", "--model", str(tiny_checkpoint)]).output.split())
    assert "Metal may wire 1.0 KiB of this Mac's memory; the model needs" in text
    assert "raise the limit until the next restart with `sudo sysctl iogpu.wired_limit_mb=" in text
