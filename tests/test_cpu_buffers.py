"""CPU feature detection and the llama.cpp buffer-type decision, on recorded inputs from real machines.

The machine running the tests may have none of these CPUs, so each case feeds a recording (a
``/proc/cpuinfo`` block, macOS ``sysctl`` output, llama.cpp's system-info string) to the same pure
functions the backend calls on the live machine.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from qvq_local.backends import llama_buffers as lb
from qvq_local.cpu import parse_cpuinfo, parse_darwin_sysctl
from qvq_local.errors import InputError

DATA = Path(__file__).parent / "data" / "cpu"

# llama.cpp system-info strings, in the format llama_print_system_info() prints.  The first is
# llama-cpp-python 0.3.36 built from source on a Sapphire Rapids Xeon (GGML_NATIVE).
INFO_AMX_NATIVE = (
    "CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX_VNNI = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | AVX512 = 1 | "
    "AVX512_VBMI = 1 | AVX512_VNNI = 1 | AVX512_BF16 = 1 | AMX_INT8 = 1 | LLAMAFILE = 1 | OPENMP = 1 | "
    "REPACK = 1 | "
)
INFO_AVX2 = (
    "CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | LLAMAFILE = 1 | "
    "OPENMP = 1 | REPACK = 1 | "
)
INFO_CUDA_AVX2 = "CUDA : ARCHS = 890 | USE_GRAPHS = 1 | PEER_MAX_BATCH_SIZE = 128 | " + INFO_AVX2
INFO_METAL = (
    "Metal : EMBED_LIBRARY = 1 | CPU : NEON = 1 | ARM_FMA = 1 | FP16_VA = 1 | DOTPROD = 1 | "
    "MATMUL_INT8 = 1 | ACCELERATE = 1 | REPACK = 1 | "
)


def cpu(name: str):
    text = (DATA / name).read_text()
    if name.endswith(".sysctl"):
        return parse_darwin_sysctl(text, "arm64")
    return parse_cpuinfo(text, "aarch64" if "arm64" in name else "x86_64")


def test_recorded_cpus_parse_to_the_features_that_matter():
    xeon = cpu("xeon-sapphire-rapids-amx.cpuinfo")
    assert xeon.has_amx and xeon.has_avx2 and xeon.has_avx512
    assert {"amx_tile", "amx_int8", "amx_bf16", "avx512_vnni"} <= set(xeon.shown())
    desktop = cpu("desktop-coffee-lake-avx2.cpuinfo")
    assert desktop.has_avx2 and not desktop.has_avx512 and not desktop.has_amx
    assert desktop.model == "Intel(R) Core(TM) i7-8700 CPU @ 3.20GHz"
    zen4 = cpu("ryzen-zen4-avx512.cpuinfo")
    assert zen4.has_avx512 and "avx512_vnni" in zen4.flags and not zen4.has_amx
    graviton = cpu("graviton3-arm64.cpuinfo")
    assert {"neon", "dotprod", "i8mm"} <= graviton.flags and not graviton.has_avx2
    m2 = cpu("apple-m2-pro.sysctl")
    assert m2.model == "Apple M2 Pro" and {"neon", "dotprod", "i8mm"} <= m2.flags and not m2.has_amx
    m1 = cpu("apple-m1.sysctl")
    assert "i8mm" not in m1.flags and "neon" in m1.flags


def test_intel_mac_sysctl_flags_are_normalised():
    text = (
        "machdep.cpu.brand_string: Intel(R) Xeon(R) W-3245 CPU @ 3.20GHz\n"
        "machdep.cpu.features: FPU VME SSE SSE2 SSE3 AVX1.0 FMA\n"
        "machdep.cpu.leaf7_features: SMEP AVX2 BMI2 AVX512F AVX512VNNI\n"
    )
    info = parse_darwin_sysctl(text, "x86_64")
    assert info.has_avx2 and info.has_avx512 and "avx512_vnni" in info.flags and not info.has_amx


def test_system_info_parses_backends_and_features():
    build = lb.parse_system_info(INFO_CUDA_AVX2)
    assert build.backends == ("CUDA", "CPU") and build.gpu_backends == ("CUDA",)
    assert {"AVX2", "REPACK", "USE_GRAPHS"} <= build.features and "AMX_INT8" not in build.features
    assert "AMX_INT8" in lb.parse_system_info(INFO_AMX_NATIVE).features
    assert lb.parse_system_info(INFO_METAL).gpu_backends == ("Metal",)
    assert lb.parse_system_info("CPU : AVX2 = 0 | REPACK = 1 |").features == {"REPACK"}


@pytest.mark.parametrize(
    ("machine", "info", "mode"),
    [
        ("xeon-sapphire-rapids-amx.cpuinfo", INFO_AMX_NATIVE, "none"),  # the crash this avoids
        ("xeon-sapphire-rapids-amx.cpuinfo", None, "none"),  # build unknown: stay safe
        ("xeon-sapphire-rapids-amx.cpuinfo", INFO_AVX2, "all"),  # a build without AMX code
        ("xeon-sapphire-rapids-amx.cpuinfo", INFO_CUDA_AVX2, "all"),
        ("desktop-coffee-lake-avx2.cpuinfo", INFO_AVX2, "all"),
        ("desktop-coffee-lake-avx2.cpuinfo", None, "all"),
        ("ryzen-zen4-avx512.cpuinfo", INFO_AVX2, "all"),
        ("graviton3-arm64.cpuinfo", None, "all"),
        ("apple-m2-pro.sysctl", INFO_METAL, "all"),
    ],
)
def test_auto_turns_amx_off_only_where_it_can_crash(machine, info, mode):
    build = lb.parse_system_info(info) if info else None
    plan = lb.choose("auto", cpu(machine), build)
    assert plan.mode == mode
    assert plan.use_extra_bufts == (mode == "all")
    if mode == "none":
        assert "20824" in plan.reason


@pytest.mark.parametrize("mode", ["all", "no-amx", "none"])
def test_explicit_modes_win_on_every_machine(mode):
    for machine in ("xeon-sapphire-rapids-amx.cpuinfo", "desktop-coffee-lake-avx2.cpuinfo"):
        assert lb.choose(mode, cpu(machine), lb.parse_system_info(INFO_AMX_NATIVE)).mode == mode


def test_requested_mode_reads_option_then_environment(monkeypatch):
    monkeypatch.delenv(lb.ENV_VAR, raising=False)
    assert lb.requested_mode(None) == "auto"
    monkeypatch.setenv(lb.ENV_VAR, "ALL")
    assert lb.requested_mode(None) == "all"
    assert lb.requested_mode("none") == "none"  # the option beats the environment
    monkeypatch.setenv(lb.ENV_VAR, "fast")
    with pytest.raises(InputError, match=f"{lb.ENV_VAR} must be one of auto, all, no-amx, none, got 'fast'"):
        lb.requested_mode(None)
    with pytest.raises(InputError, match="--cpu-buffers must be one of"):
        lb.requested_mode("amx")


@dataclass
class Rec:
    ggml_type: int
    shape: tuple[int, ...]


Q4_K, Q6_K, Q8_0, Q4_0, Q2_K, F32 = 12, 14, 8, 2, 10, 0


def _q4_k_m_model(layers: int = 3) -> dict[str, Rec]:
    """Tensor records shaped like a Q4_K_M Qwen2-VL GGUF: Q6_K on some ffn_down/attn_v layers."""
    t = {"token_embd.weight": Rec(Q4_K, (1536, 151936)), "output.weight": Rec(Q6_K, (1536, 151936))}
    for i in range(layers):
        t[f"blk.{i}.attn_norm.weight"] = Rec(F32, (1536,))
        t[f"blk.{i}.attn_q.weight"] = Rec(Q4_K, (1536, 1536))
        t[f"blk.{i}.attn_k.weight"] = Rec(Q4_K, (1536, 256))
        t[f"blk.{i}.attn_v.weight"] = Rec(Q6_K if i == 0 else Q4_K, (1536, 256))
        t[f"blk.{i}.attn_q.bias"] = Rec(F32, (1536,))
        t[f"blk.{i}.ffn_down.weight"] = Rec(Q6_K if i % 2 == 0 else Q4_K, (8960, 1536))
        t[f"blk.{i}.ffn_up.weight"] = Rec(Q4_K, (1536, 8960))
        t[f"blk.{i}.ffn_gate.weight"] = Rec(Q4_K, (1536, 8964))  # rows 8964: 8964 % 8 != 0
    return t


def test_repack_patterns_name_exactly_the_eligible_weights():
    import re

    xeon = cpu("xeon-sapphire-rapids-amx.cpuinfo")
    tensors = _q4_k_m_model()
    patterns = lb.repack_patterns(tensors, xeon)
    chosen = {name for name in tensors if any(re.search(p, name) for p in patterns)}
    assert chosen == {
        "blk.0.attn_q.weight", "blk.1.attn_q.weight", "blk.2.attn_q.weight",
        "blk.0.attn_k.weight", "blk.1.attn_k.weight", "blk.2.attn_k.weight",
        "blk.1.attn_v.weight", "blk.2.attn_v.weight",
        "blk.1.ffn_down.weight",
        "blk.0.ffn_up.weight", "blk.1.ffn_up.weight", "blk.2.ffn_up.weight",
    }  # fmt: skip
    # never the embedding (row lookup), Q6_K (no x86 repack), norms/biases, or rows not divisible by 8
    assert "blk.10.attn_q.weight" not in chosen and not re.search(patterns[0], "blk.10.attn_q.weight")


def test_repack_rules_per_cpu_and_type():
    desktop, zen4 = cpu("desktop-coffee-lake-avx2.cpuinfo"), cpu("ryzen-zen4-avx512.cpuinfo")
    name = "blk.0.ffn_up.weight"
    assert lb.repack_eligible(name, Q4_0, (64, 64), desktop)
    assert not lb.repack_eligible(name, Q8_0, (64, 64), desktop)  # x86 has no Q8_0 repack
    assert not lb.repack_eligible(name, Q2_K, (256, 64), desktop)  # needs AVX-512
    assert lb.repack_eligible(name, Q2_K, (256, 64), zen4)
    assert not lb.repack_eligible(name, Q4_0, (64, 64), cpu("graviton3-arm64.cpuinfo"))
    assert lb.repack_patterns(_q4_k_m_model(), cpu("graviton3-arm64.cpuinfo")) == ()


def test_plan_for_model_adds_repack_only_when_amx_is_off_and_the_build_repacks():
    xeon = cpu("xeon-sapphire-rapids-amx.cpuinfo")
    tensors = _q4_k_m_model()
    amx_build = lb.parse_system_info(INFO_AMX_NATIVE)
    assert lb.plan_for_model("auto", xeon, amx_build, tensors).repack_patterns == ()  # auto: none on AMX
    plan = lb.plan_for_model("no-amx", xeon, amx_build, tensors)
    assert plan.mode == "no-amx" and plan.repack_patterns and not plan.use_extra_bufts
    assert "CPU_REPACK kept" in plan.describe()
    no_repack = lb.parse_system_info(INFO_AMX_NATIVE.replace("REPACK = 1", "REPACK = 0"))
    assert lb.plan_for_model("no-amx", xeon, no_repack, tensors).repack_patterns == ()
    assert lb.plan_for_model("none", xeon, amx_build, tensors).repack_patterns == ()
    zen4_plan = lb.plan_for_model(
        "auto", cpu("ryzen-zen4-avx512.cpuinfo"), lb.parse_system_info(INFO_AVX2), tensors
    )
    assert zen4_plan.mode == "all" and zen4_plan.repack_patterns == ()  # llama.cpp repacks by itself there


# ---------------------------------------------------------------- on the real library, this machine


def _prefill_logits(pair, mode):
    from qvq_local.backends import llamacpp
    from qvq_local.backends.base import Prompt, SamplingParams

    model = llamacpp.load(pair.model, pair.mmproj, lb.LlamaOptions(cpu_buffers=mode))
    try:
        prompt = Prompt(text="<|im_start|>user\nWhich bar is highest in the chart?<|im_end|>\n", images=[])
        session = model.new_session(SamplingParams(), n_ctx=model.context_needed(prompt, new_tokens=8))
        try:
            session.prefill(prompt)
            logits = session.last_logits()
            ids = [session.step().id for _ in range(6)]
        finally:
            session.close()
        return model.cpu_buffers, logits, ids
    finally:
        model.close()


@pytest.mark.llama
def test_kept_repack_computes_what_plain_buffers_compute(tiny_gguf_q4):
    """The tensors pinned to CPU_REPACK give the logits of the plain CPU path (same Q4_K weights,
    interleaved kernels): agreement to float rounding and the same greedy tokens."""
    import numpy as np

    pytest.importorskip("llama_cpp")
    from qvq_local.cpu import detect

    if not detect().has_avx2:
        pytest.skip("CPU_REPACK overrides are an x86 AVX2 rule; this CPU has no AVX2")
    repack_plan, repacked, repacked_ids = _prefill_logits(tiny_gguf_q4, "no-amx")
    plain_plan, plain, plain_ids = _prefill_logits(tiny_gguf_q4, "none")
    assert repack_plan.mode == "no-amx" and len(repack_plan.repack_patterns) >= 7
    assert plain_plan.mode == "none" and not plain_plan.repack_patterns
    corr = float(np.corrcoef(repacked, plain)[0, 1])
    print(f"\nrepack vs plain: max |diff| {np.max(np.abs(repacked - plain)):.2e}, correlation {corr:.6f}")
    assert corr > 0.999
    assert repacked_ids == plain_ids


def test_an_unreadable_cpu_with_an_amx_build_is_treated_as_amx():
    from qvq_local.cpu import CpuInfo

    unknown = CpuInfo(arch="x86_64")  # no /proc/cpuinfo (a sandbox, an odd OS)
    assert lb.choose("auto", unknown, lb.parse_system_info(INFO_AMX_NATIVE)).mode == "none"
    assert lb.choose("auto", unknown, lb.parse_system_info(INFO_AVX2)).mode == "all"
