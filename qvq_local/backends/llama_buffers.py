"""Which CPU buffer types llama.cpp may put a model's weights in: the AMX crash, and what to keep.

llama.cpp's CPU backend can store weights in "extra" buffer types that re-layout them for faster kernels:
``AMX`` (Intel AMX tiles, only in builds compiled on or for an AMX CPU) and ``CPU_REPACK`` (interleaved
blocks for AVX2 / AVX-512 / NEON GEMV and GEMM).  In the llama.cpp bundled with llama-cpp-python 0.3.x the
AMX one segfaults on the first decode of Q4_K_M and Q8_0 models (upstream issue #20824, unfixed); F16
models are not affected.  ``llama_model_params.use_extra_bufts = False`` avoids the crash, and drops the
repacking with it.

Repacking can be kept without AMX: ``no-amx`` turns the extra buffer types off and puts back, tensor by
tensor through ``tensor_buft_overrides``, exactly the weights CPU_REPACK would have taken on x86:

* type Q4_0, Q4_K, IQ4_NL or MXFP4 with AVX2, or Q2_K with AVX-512 (ggml-cpu/repack.cpp,
  ``ggml_repack_get_optimal_repack_type``), and a row count (``ne[1]``) divisible by 8;
* a matrix that only ever enters a matrix multiplication (the attention and FFN projections and the
  output head; never ``token_embd``, which is read by row lookup).

A tensor pinned to CPU_REPACK that repack cannot handle aborts the load inside llama.cpp, so the rule is
deliberately a subset of llama.cpp's: anything in doubt stays in the plain CPU buffer.

Measured on an AMX Xeon (Sapphire Rapids, 2 cores, a 2b-shaped Q4_K_M model, interleaved A/B runs, in
two sessions): ``none`` prefilled ~300 tokens ~25% faster each time (7.6 s against 9.9 s; 8.2 against
10.4), while decode differed by under 12%, one way in one session (10.5 against 9.9 tok/s) and the other
way in the next (8.7 against 9.5).  Every AMX CPU has AVX-512, whose plain kernels do not need the
AVX2-shaped repacked layout, so ``auto`` picks ``none`` on AMX CPUs; ``no-amx`` stays available to
measure on a machine of your own (``qvq bench --cpu-buffers no-amx``, ``examples/cpu_buffers_ab.py``).

Modes (``--cpu-buffers`` / ``QVQ_LLAMA_CPU_BUFFERS``): ``auto`` (default: ``none`` where the CPU has AMX
and the build may use it, else ``all``), ``all`` (llama.cpp's own choice: for a build whose AMX bug is
fixed), ``no-amx`` (AMX off, repacking kept per tensor) and ``none`` (every extra buffer type off).

Where the layers go (``--gpu-layers`` / ``QVQ_GPU_LAYERS``): how many of the text model's layers llama.cpp
puts in GPU memory.  Unset: all of them when the build has a GPU backend (CUDA, Metal, ...), none on a
CPU-only build; ``all`` or -1: all; 0: none; N: N of them (llama.cpp takes the last N), the rest stay on
the CPU (partial offload, for a model larger than the GPU's memory).  The vision encoder follows: on the
GPU unless 0 layers are.

Both options are the llama backend's load options, :class:`LlamaOptions` (checked once, when built).

Decision functions take recorded inputs (a :class:`~qvq_local.cpu.CpuInfo`, llama.cpp's system-info
string, GGUF tensor records); only :func:`apply` touches ctypes.  The backend's hooks for ``qvq doctor``
and ``qvq bench`` (:func:`machine_facts`) and for ``qvq ask`` (:func:`load_notices`) are here too: what
this machine's llama.cpp build can do and where it puts the weights.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from qvq_local.backends.options import LoadOptions
from qvq_local.build_flags import CUDA_REBUILD
from qvq_local.cpu import CpuInfo
from qvq_local.errors import InputError

MODES = ("auto", "all", "no-amx", "none")
ENV_VAR = "QVQ_LLAMA_CPU_BUFFERS"
GPU_LAYERS_ENV = "QVQ_GPU_LAYERS"
UPSTREAM_BUG = "llama.cpp issue #20824"

# ggml_type numbers (ggml.h; the gguf package's GGMLQuantizationType agrees).
_Q4_0, _Q2_K, _Q4_K, _IQ4_NL, _MXFP4 = 2, 10, 12, 20, 39
_REPACK_AVX2 = frozenset({_Q4_0, _Q4_K, _IQ4_NL, _MXFP4})
_REPACK_AVX512 = frozenset({_Q2_K})

#: Weights that only enter MUL_MAT: per-layer projections and the output head.
_MATMUL_WEIGHT = re.compile(
    r"^blk\.(\d+)\.(attn_q|attn_k|attn_v|attn_output|attn_qkv|ffn_gate|ffn_up|ffn_down)\.weight$"
)


@dataclass(frozen=True)
class BufferPlan:
    """What the llama backend does with extra buffer types for one model on one machine."""

    mode: str  # the resolved mode: all | no-amx | none
    requested: str  # what the user asked for (auto | all | no-amx | none)
    reason: str
    repack_patterns: tuple[str, ...] = field(default=())  # tensor_buft_overrides to CPU_REPACK

    @property
    def use_extra_bufts(self) -> bool:
        return self.mode == "all"

    def describe(self) -> str:
        """One line for doctor and bench: which buffer types the weights go to, and why."""
        if self.mode == "all":
            return f"llama.cpp's choice (AMX and repack where available): {self.reason}"
        if self.mode == "none":
            return f"plain CPU buffers only: {self.reason}"
        kept = (
            f", CPU_REPACK kept for {len(self.repack_patterns)} tensor groups" if self.repack_patterns else ""
        )
        return f"AMX off{kept}: {self.reason}"


@dataclass(frozen=True)
class LlamaBuild:
    """What a llama.cpp build says of itself in ``llama_print_system_info()``: its backends (``CPU``,
    ``CUDA``, ``MTL``/``Metal``, ``Vulkan``...) and the features reported as on (``AMX_INT8``, ``REPACK``,
    ``AVX2``...), upper case."""

    backends: tuple[str, ...]
    features: frozenset[str]

    @property
    def gpu_backends(self) -> tuple[str, ...]:
        return tuple(b for b in self.backends if b not in ("CPU", "BLAS", "RPC"))


def parse_system_info(info: str) -> LlamaBuild:
    """Parse ``"CUDA : ARCHS = 890 | CPU : SSE3 = 1 | AVX2 = 1 | AMX_INT8 = 1 | REPACK = 1 |"``."""
    backends: list[str] = []
    on = set()
    for part in info.replace("\n", "|").split("|"):
        if ":" in part:  # "CPU : SSE3 = 1" starts each backend's section
            section, part = part.split(":", 1)
            if section.strip() and section.strip() not in backends:
                backends.append(section.strip())
        name, sep, value = part.partition("=")
        if sep and value.strip() not in ("", "0"):
            on.add(name.strip().upper())
    return LlamaBuild(tuple(backends), frozenset(on))


def requested_mode(option: str | None = None, label: str | None = "--cpu-buffers") -> str:
    """The mode asked for: the option, else ``$QVQ_LLAMA_CPU_BUFFERS``, else ``auto``; validated.

    ``label`` names the option in the message (the CLI's flag, the API's keyword)."""
    source = label or "--cpu-buffers"
    value = option
    if not value:
        value, source = os.environ.get(ENV_VAR, ""), ENV_VAR
    value = (value or "auto").strip().lower()
    if value not in MODES:
        raise InputError(f"{source} must be one of {', '.join(MODES)}, got {value!r}")
    return value


def requested_gpu_layers(option: int | str | None = None, label: str | None = "--gpu-layers") -> int | None:
    """Text layers to put on the GPU: the option, else ``$QVQ_GPU_LAYERS``, else None (llama.cpp's GPU,
    where the build has one, takes them all); ``all`` or -1 means all, 0 none.  Validated.

    ``label`` names the option in the message (the CLI's flag, the API's keyword)."""
    source, value = label or "--gpu-layers", option
    if value is None or (isinstance(value, str) and not value.strip()):
        source, value = GPU_LAYERS_ENV, os.environ.get(GPU_LAYERS_ENV, "").strip()
        if not value:
            return None
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "all":
            return -1
        try:
            value = int(text)
        except ValueError:
            value = text
    if isinstance(value, bool) or not isinstance(value, int) or value < -1:
        raise InputError(f"{source} must be a whole number of layers (0 or more), or all (-1), got {value!r}")
    return value


@dataclass(frozen=True)
class LlamaOptions(LoadOptions):
    """The llama backend's load options, checked and resolved once, here.

    ``gpu_layers``: text layers on the GPU (:func:`requested_gpu_layers`: the value, else
    ``$QVQ_GPU_LAYERS``; None: all where the build has a GPU backend, none on a CPU-only one; -1: all).
    ``cpu_buffers``: which CPU buffer types hold the weights (:func:`requested_mode`: the value, else
    ``$QVQ_LLAMA_CPU_BUFFERS``, else ``auto``).
    """

    gpu_layers: int | str | None = None
    cpu_buffers: str | None = None

    def __post_init__(self) -> None:
        self._set("gpu_layers", requested_gpu_layers(self.gpu_layers, self.label("gpu_layers")))
        self._set("cpu_buffers", requested_mode(self.cpu_buffers, self.label("cpu_buffers")))


def choose(requested: str, cpu: CpuInfo, build: LlamaBuild | None) -> BufferPlan:
    """Resolve ``requested`` for this CPU and llama.cpp build (``None``: build features unknown).

    ``auto`` turns AMX off when the CPU has AMX and the build may use it: a build that reports its CPU
    features without ``AMX_INT8`` has no AMX code, so nothing needs turning off there.
    """
    if requested not in MODES:
        raise InputError(f"unknown CPU buffer mode {requested!r}: choose {', '.join(MODES)}")
    if requested == "all":
        return BufferPlan("all", requested, "asked for (--cpu-buffers all)")
    if requested == "none":
        return BufferPlan("none", requested, "asked for (--cpu-buffers none)")
    if requested == "no-amx":
        return BufferPlan("no-amx", requested, "asked for (--cpu-buffers no-amx)")
    amx_build = None if build is None else "AMX_INT8" in build.features
    # An unreadable CPU (no /proc/cpuinfo) with a build that has AMX code may be an AMX CPU: stay safe.
    if (cpu.has_amx or (cpu.source == "unknown" and amx_build)) and amx_build is not False:
        return BufferPlan(
            "none",
            requested,
            f"this CPU has AMX, whose llama.cpp buffer type crashes on quantised models ({UPSTREAM_BUG}); "
            "its AVX-512 kernels outrun repacking",
        )
    if cpu.has_amx:
        return BufferPlan("all", requested, "this CPU has AMX but the llama.cpp build has no AMX code")
    return BufferPlan("all", requested, "no AMX on this CPU")


def repack_eligible(name: str, ggml_type: int, shape: tuple[int, ...], cpu: CpuInfo) -> bool:
    """Whether CPU_REPACK would take this weight on this x86 CPU (a strict subset of llama.cpp's rule)."""
    if len(shape) != 2 or shape[1] % 8:
        return False
    if not (_MATMUL_WEIGHT.match(name) or name == "output.weight"):
        return False
    if ggml_type in _REPACK_AVX2:
        return cpu.has_avx2
    if ggml_type in _REPACK_AVX512:
        return cpu.has_avx512
    return False


def repack_patterns(tensors: dict[str, Any], cpu: CpuInfo) -> tuple[str, ...]:
    """Anchored regexes naming the eligible tensors, one per role (``ffn_down``...) with its layers.

    ``tensors`` maps names to records with ``ggml_type`` and ``shape`` (innermost first, as GGUF stores
    them).  Only x86 rules are known; other architectures get none (they have no AMX to avoid).
    """
    if cpu.arch not in ("x86_64", "amd64", "i686", "x86"):
        return ()
    layers: dict[str, list[int]] = defaultdict(list)
    patterns: list[str] = []
    for name, rec in tensors.items():
        if not repack_eligible(name, int(rec.ggml_type), tuple(rec.shape), cpu):
            continue
        m = _MATMUL_WEIGHT.match(name)
        if m:
            layers[m.group(2)].append(int(m.group(1)))
        else:
            patterns.append("^" + re.escape(name) + "$")
    for role in sorted(layers):
        ids = "|".join(str(i) for i in sorted(layers[role]))
        patterns.append(rf"^blk\.({ids})\.{role}\.weight$")
    return tuple(patterns)


def plan_for_model(
    requested: str, cpu: CpuInfo, build: LlamaBuild | None, tensors: dict[str, Any] | None
) -> BufferPlan:
    """:func:`choose`, plus the repack overrides for this model's tensors when AMX is turned off."""
    plan = choose(requested, cpu, build)
    if plan.mode != "no-amx" or not tensors:
        return plan
    if build is not None and "REPACK" not in build.features:
        return plan
    return BufferPlan(plan.mode, plan.requested, plan.reason, repack_patterns(tensors, cpu))


# ---------------------------------------------------------------- applying a plan (ctypes)


def current_build(llama_cpp: Any) -> LlamaBuild | None:
    """The loaded llama.cpp build's backends and features (None if it does not say)."""
    try:
        info = llama_cpp.llama_print_system_info() or b""
    except (AttributeError, OSError):
        return None
    build = parse_system_info(info.decode("utf-8", "replace"))
    return build if build.backends else None


def plan_here(llama_cpp: Any, mode: str, tensors: dict[str, Any] | None) -> BufferPlan:
    """:func:`plan_for_model` for this machine's CPU and the loaded llama.cpp build (``mode``: a checked
    one, :func:`requested_mode`)."""
    from qvq_local.cpu import detect

    return plan_for_model(mode, detect(), current_build(llama_cpp), tensors)


def _repack_buffer_type(llama_cpp: Any) -> int | None:
    """The address of llama.cpp's CPU_REPACK buffer type, asked of the CPU backend; None if it has none."""
    lib = llama_cpp._lib if hasattr(llama_cpp, "_lib") else llama_cpp.llama_cpp._lib
    try:
        lib.ggml_backend_dev_by_type.restype = ctypes.c_void_p
        lib.ggml_backend_dev_by_type.argtypes = [ctypes.c_int]
        lib.ggml_backend_dev_backend_reg.restype = ctypes.c_void_p
        lib.ggml_backend_dev_backend_reg.argtypes = [ctypes.c_void_p]
        lib.ggml_backend_reg_get_proc_address.restype = ctypes.c_void_p
        lib.ggml_backend_reg_get_proc_address.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.ggml_backend_buft_name.restype = ctypes.c_char_p
        lib.ggml_backend_buft_name.argtypes = [ctypes.c_void_p]
    except AttributeError:  # a libllama without the ggml backend API exported
        return None
    dev = lib.ggml_backend_dev_by_type(0)  # GGML_BACKEND_DEVICE_TYPE_CPU
    if not dev:
        return None
    reg = lib.ggml_backend_dev_backend_reg(dev)
    fn = lib.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_dev_get_extra_bufts") if reg else None
    if not fn:
        return None
    get_extra = ctypes.CFUNCTYPE(ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p)(fn)
    arr = get_extra(dev)
    i = 0
    while arr and arr[i]:
        if lib.ggml_backend_buft_name(arr[i]) == b"CPU_REPACK":
            return int(arr[i])
        i += 1
    return None


class _Override(ctypes.Structure):
    """``struct llama_model_tensor_buft_override`` (llama.h): a regex and a buffer type."""

    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


def apply(mparams: Any, plan: BufferPlan, llama_cpp: Any) -> tuple[BufferPlan, Any]:
    """Set ``use_extra_bufts`` and the repack overrides on a ``llama_model_params``.

    Returns the plan as applied (without overrides where the build has no CPU_REPACK buffer type) and
    the override array, which the caller keeps referenced until the model is loaded.
    """
    mparams.use_extra_bufts = plan.use_extra_bufts
    if plan.use_extra_bufts or not plan.repack_patterns:
        return plan, None
    buft = _repack_buffer_type(llama_cpp)
    if buft is None:
        return BufferPlan(plan.mode, plan.requested, plan.reason), None
    arr = (_Override * (len(plan.repack_patterns) + 1))()  # zeroed: the last entry is the terminator
    for i, pattern in enumerate(plan.repack_patterns):
        arr[i].pattern = pattern.encode("ascii")
        arr[i].buft = buft
    mparams.tensor_buft_overrides = ctypes.cast(arr, ctypes.c_void_p)
    return plan, arr


@contextlib.contextmanager
def high_level_llama(model_path: str | os.PathLike, option: str | None = None) -> Iterator[BufferPlan]:
    """Apply this machine's plan to every ``llama_cpp.Llama(...)`` built inside the block.

    ``Llama`` builds its own ``llama_model_params`` and has no argument for buffer types, so for the
    length of the block its call to ``llama_model_default_params`` returns params with the plan applied.
    Used by the bench's raw-library baseline and the tests, which must not crash on AMX CPUs either.
    """
    import llama_cpp
    from llama_cpp import llama_cpp as low

    from qvq_local.formats.gguf import read_gguf_header

    plan = plan_here(llama_cpp, requested_mode(option), read_gguf_header(model_path).tensors)
    original = low.llama_model_default_params

    def patched():
        params = original()
        _, params._qvq_buft_overrides = apply(params, plan, llama_cpp)  # lives as long as the Llama
        return params

    low.llama_model_default_params = patched
    try:
        yield plan
    finally:
        low.llama_model_default_params = original


# ---------------------------------------------------------------- the backend's hooks (registry.HOOKS)


def gpu_build_warning(nvidia: dict, llama_gpu_backends: tuple[str, ...] | None) -> str | None:
    """One line when an NVIDIA GPU is here but the installed llama.cpp cannot use it, else None.

    ``nvidia``: :func:`qvq_local.build_flags.detect_nvidia`'s record; ``llama_gpu_backends`` are the GPU
    backends the llama.cpp build reports (``("CUDA",)``, ``()`` for a CPU-only build, None when
    llama-cpp-python is not installed)."""
    if not nvidia.get("present") or llama_gpu_backends is None:
        return None
    if any(b.upper() in ("CUDA", "VULKAN") for b in llama_gpu_backends):
        return None
    name = ", ".join(nvidia.get("gpus") or []) or "an NVIDIA GPU"
    return (
        f"this machine has {name} but llama-cpp-python was built without CUDA, so models run on the CPU "
        f"(a 72B model takes hours, not minutes); rebuild it: {CUDA_REBUILD}"
    )


def probe_gpu() -> dict:
    """Ask llama.cpp whether it can offload layers, and which GPU backend it was built with."""
    import platform

    try:
        import llama_cpp
    except (ImportError, OSError) as exc:  # a broken shared library raises OSError
        return {"llama_gpu_offload": None, "llama_error": f"{type(exc).__name__}: {exc}"}

    offload = bool(llama_cpp.llama_supports_gpu_offload())
    build = current_build(llama_cpp)
    gpu_backends = tuple(b.upper() for b in build.gpu_backends) if build else ()
    return {
        "llama_gpu_offload": offload,
        "cuda": offload and "CUDA" in gpu_backends,
        # Metal builds print "MTL" (or "METAL") in the system info; a Mac's only GPU backend is Metal.
        "metal": offload
        and ("METAL" in gpu_backends or "MTL" in gpu_backends or platform.system() == "Darwin"),
        "llama_backends": list(build.backends) if build else [],
        "llama_gpu_backends": list(build.gpu_backends) if build else [],
        "llama_features": sorted(build.features) if build else [],
    }


def buffer_plan(cpu: CpuInfo) -> str | None:
    """Which CPU buffer types llama.cpp will put a quantised model's weights in on this machine."""
    try:
        import llama_cpp
    except (ImportError, OSError):  # a broken shared library: probe_gpu reports it
        return None
    try:
        plan = choose(requested_mode(None), cpu, current_build(llama_cpp))
    except InputError as err:
        return str(err)
    return plan.describe()


def machine_facts(facts: dict) -> dict:
    """The ``machine_facts`` hook: llama.cpp's GPU offload and build, where it puts the weights, and a
    warning when an NVIDIA GPU (``facts["nvidia"]``) is left idle; {} without llama-cpp-python."""
    from qvq_local import hardware
    from qvq_local.cpu import detect

    if not hardware.backend_installed("llama"):
        return {}
    found = probe_gpu()
    if "llama_error" not in found:  # the library loads: its build and the buffer plan mean something
        found["llama_cpu_buffers"] = buffer_plan(detect())
        found["gpu_warning"] = gpu_build_warning(
            facts.get("nvidia") or {}, tuple(found.get("llama_gpu_backends", ()))
        )
    return found


def load_notices(loaded: Any) -> list[str]:
    """The ``load_notices`` hook: one line when a model loaded on the CPU beside an NVIDIA GPU, because
    this llama-cpp-python was built without CUDA."""
    if loaded.gpu_offload:
        return []
    from qvq_local.hardware import detect_nvidia

    warning = gpu_build_warning(detect_nvidia(run_smi=False), ())
    return [warning] if warning else []


def run_facts(loaded: Any) -> dict:
    """The ``run_facts`` hook: the CPU buffer types the weights were loaded into, where the text
    layers run (:meth:`~qvq_local.backends.llamacpp.LlamaModel.placement`) and where images are encoded
    (mtmd uses the GPU when any layer is offloaded, as the model was loaded)."""
    buffers = loaded.cpu_buffers
    return {
        "cpu_buffers": buffers.describe() if buffers is not None else None,
        "placement": loaded.placement(),
        "summary": f"CPU buffers: {buffers.mode}" if buffers is not None else None,
        "image_encoder": "gpu" if loaded.gpu_offload else "cpu",
    }


def crash_advice() -> str:
    """The ``crash_advice`` hook: running without llama.cpp's extra CPU buffer types (AMX, repacking), where
    the known native crashes were, and how to see llama.cpp's log."""
    return (
        f"workaround: {ENV_VAR}=none (or --cpu-buffers none) runs llama.cpp without its extra CPU buffer "
        "types (AMX, repacking); run with QVQ_DEBUG=1 for llama.cpp's log"
    )
