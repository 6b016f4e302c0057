"""Whether a model fits this machine: the memory rules behind ``qvq doctor``, ``qvq models --available``
and the warning before a download that cannot fit.

An estimate, not a trial load: a 72B model takes minutes to load and may push the machine into swap, and
the numbers that decide whether it fits are on disk already.  The need is the weight files, plus the KV
cache for the context (2 x layers x context x KV heads x head size x bytes per value), plus a margin for
compute buffers and the vision encoder (:func:`memory_need`).  On a Mac the GPU may wire only part of the
unified memory (:func:`metal_fit`); with an NVIDIA GPU, llama.cpp's ``--gpu-layers`` decides what goes
there (:func:`gpu_split`, :func:`gpu_offload_plan`).

The context to plan for is the caller's; when none is given, what ``qvq ask`` opens with its default
budgets (:func:`default_context`, from :mod:`qvq_local.budgets`).  :func:`model_fit` is one model's
row of ``qvq doctor``; :func:`catalogue_fit` estimates a catalogue source before it is downloaded.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from qvq_local.budgets import DEFAULT_ANSWER_BUDGET, DEFAULT_MAX_THOUGHT, FORCE_MARGIN
from qvq_local.errors import ModelError
from qvq_local.formats.gguf import read_gguf_header, read_gguf_metadata
from qvq_local.models import ResolvedModel, model_family, model_files

#: Compute buffers, the vision encoder's scratch and the runtime, on top of weights and KV cache.
OVERHEAD_FRACTION = 0.10
OVERHEAD_FIXED = 512 * 1024**2
#: GPU memory llama.cpp takes beside the offloaded weights and their KV cache: the CUDA context and
#: compute buffers (and OVERHEAD_FRACTION of the offloaded weights, as for main memory).
GPU_RESERVE = 1024**3
#: What ``qvq ask`` asks for by default besides the image and the budgets: the prompt's text.
DEFAULT_PROMPT_TOKENS = 128


# ----------------------------------------------------------------------------- a model's shape
def folder_shape(folder: Path) -> dict[str, Any]:
    """The dimensions the KV cache needs, from a safetensors folder's config.json."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read config.json ({exc})", path=folder) from None
    text = dict(config)
    text.update(config.get("text_config") or {})
    heads = int(text.get("num_attention_heads") or 1)
    quant = config.get("quantization") or {}
    dtype = str(text.get("torch_dtype") or text.get("dtype") or "bfloat16")
    kv_bytes = 4 if dtype in ("float32", "f32") and not quant else 2
    return {
        "layers": int(text.get("num_hidden_layers") or 0),
        "kv_heads": int(text.get("num_key_value_heads") or heads),
        "head_dim": int(text.get("head_dim") or int(text.get("hidden_size") or 0) // heads),
        "context_length": int(text.get("max_position_embeddings") or 32768),
        "kv_bytes": kv_bytes,
    }


def gguf_shape(model_file: Path) -> dict[str, Any]:
    """The dimensions the KV cache needs, from a GGUF text model's metadata."""
    from gguf import Keys

    from qvq_local.families import DEFAULT_FAMILY

    arch = read_gguf_metadata(model_file, {Keys.General.ARCHITECTURE}).get(Keys.General.ARCHITECTURE)
    arch = arch or DEFAULT_FAMILY.gguf_text_arch
    key = {
        "layers": Keys.LLM.BLOCK_COUNT.format(arch=arch),
        "heads": Keys.Attention.HEAD_COUNT.format(arch=arch),
        "kv_heads": Keys.Attention.HEAD_COUNT_KV.format(arch=arch),
        "width": Keys.LLM.EMBEDDING_LENGTH.format(arch=arch),
        "context": Keys.LLM.CONTEXT_LENGTH.format(arch=arch),
        "head_dim": Keys.Attention.KEY_LENGTH.format(arch=arch),  # Qwen3-VL: not width / heads
    }
    meta = read_gguf_metadata(model_file, set(key.values()))
    heads = int(meta.get(key["heads"]) or 1)
    return {
        "layers": int(meta.get(key["layers"]) or 0),
        "kv_heads": int(meta.get(key["kv_heads"]) or heads),
        "head_dim": int(meta.get(key["head_dim"]) or int(meta.get(key["width"]) or 0) // heads),
        "context_length": int(meta.get(key["context"]) or 32768),
        "kv_bytes": 2,  # llama.cpp's KV cache is f16 by default
    }


def model_shape(model: ResolvedModel) -> dict[str, Any]:
    """:func:`gguf_shape` or :func:`folder_shape`, by the model's format."""
    return gguf_shape(model.path) if model.format == "gguf" else folder_shape(Path(model.path))


# ----------------------------------------------------------------------------- the context to plan for
def default_context(context_length: int) -> int:
    """The context ``qvq ask`` opens with default settings (no think budget: up to
    :data:`~qvq_local.budgets.DEFAULT_MAX_THOUGHT` thought tokens, one image at the default pixel bound):
    the context to plan for when none is given, at most ``context_length`` (0: unknown)."""
    from qvq_local import images

    image_tokens = int(images.DEFAULT_MAX_PIXELS) // images.FACTOR**2
    want = DEFAULT_PROMPT_TOKENS + image_tokens + DEFAULT_MAX_THOUGHT + DEFAULT_ANSWER_BUDGET + FORCE_MARGIN
    return min(context_length, want) if context_length else want


# ----------------------------------------------------------------------------- main memory
def memory_need(weights: int, shape: dict[str, Any], ctx: int) -> tuple[int, int, int]:
    """(KV cache, overhead, total) bytes to run ``weights`` bytes of a model of ``shape`` at ``ctx`` tokens."""
    kv = 2 * shape["layers"] * ctx * shape["kv_heads"] * shape["head_dim"] * shape["kv_bytes"]
    overhead = int(OVERHEAD_FRACTION * weights) + OVERHEAD_FIXED
    return kv, overhead, weights + kv + overhead


def fit_verdict(need: int, available: int | None, total: int | None) -> str:
    if available is None:
        return "unknown (memory could not be read)"
    if need <= available:
        return "fits"
    if total is not None and need <= total:
        return "tight: fits in total memory but not in what is free now"
    return "does not fit"


def metal_fit(need: int, working_set: int, total: int | None) -> dict[str, Any]:
    """Whether a model that needs ``need`` bytes fits in what Metal lets the GPU wire on a Mac
    (``working_set``); if not, the ``sysctl`` line that raises the limit, where the memory is there.

    Both backends put the whole model in Metal buffers on Apple Silicon, so a model over the working set
    fails or pages (mlx-lm warns of it) even when the unified memory holds it.  The raised limit leaves
    the system 8 GiB, or a fifth of a machine over 40 GiB, and lasts until the next restart."""
    out: dict[str, Any] = {
        "working_set_bytes": working_set,
        "total_bytes": total,
        "needed_bytes": need,
        "fits": need <= working_set,
    }
    if not out["fits"] and total:
        ceiling = total - max(8 * 1024**3, total // 5)
        if need <= ceiling:
            mib = -(-need // 2**20) + 1024  # the need, rounded up, and 1 GiB to spare
            out["sysctl"] = f"sudo sysctl iogpu.wired_limit_mb={min(mib, ceiling // 2**20)}"
    return out


# ----------------------------------------------------------------------------- one model, one source
def model_fit(
    model: ResolvedModel,
    n_ctx: int | None = None,
    available: int | None = None,
    total: int | None = None,
    gpus: list[dict] | None = None,
    working_set: int | None = None,
) -> dict[str, Any]:
    """Whether ``model`` fits in memory with a context of ``n_ctx`` tokens (default: what ask would open,
    :func:`default_context`); for a GGUF, with ``gpus`` (:func:`hardware.parse_nvidia_smi_memory`'s
    records), how many of its layers fit in their free memory (:func:`gpu_fit`); on a Mac, with Metal's
    ``working_set``, whether it fits there (:func:`metal_fit`).  The row ``qvq doctor`` shows."""
    files = model_files(model)
    weights = sum(p.stat().st_size for p in files)
    shape = model_shape(model)
    ctx = int(n_ctx) if n_ctx else default_context(shape["context_length"])
    kv, overhead, need = memory_need(weights, shape, ctx)
    return {
        "name": model.name,
        "family": model_family(model),
        "format": model.format,
        "path": str(model.path),
        "mmproj": str(model.mmproj) if model.mmproj else None,
        "quantization": model.quantization,
        "weights_bytes": weights,
        "context_tokens": ctx,
        "trained_context": shape["context_length"],
        "kv_cache_bytes": kv,
        "overhead_bytes": overhead,
        "needed_bytes": need,
        "available_bytes": available,
        "verdict": fit_verdict(need, available, total),
        "fits": need <= available if available is not None else None,
        "gpu": gpu_fit(model, shape, ctx, gpus) if gpus and model.format == "gguf" else None,
        "metal": metal_fit(need, working_set, total) if working_set else None,
    }


def catalogue_fit(entry: Any, source: Any, available: int | None, total: int | None) -> dict[str, Any]:
    """The fit estimate for a catalogue ``source`` (:mod:`qvq_local.catalogue`) before it is downloaded:
    its download size as the weights, the KV cache from its family's dimensions for the entry's shape."""
    from qvq_local.families import FAMILIES

    dims = FAMILIES[entry.family].synth_shapes[entry.shape]
    shape = {
        "layers": dims.num_hidden_layers,
        "kv_heads": dims.num_key_value_heads,
        "head_dim": dims.head_dim,
        "kv_bytes": 2,
    }
    ctx = default_context(dims.max_position_embeddings)
    _kv, _overhead, need = memory_need(source.size, shape, ctx)
    return {"needed_bytes": need, "verdict": fit_verdict(need, available, total)}


# ----------------------------------------------------------------------------- NVIDIA GPUs (llama.cpp)
def gpu_split(n_gpu_layers: int, n_blocks: int) -> tuple[int, bool]:
    """Where ``--gpu-layers n_gpu_layers`` puts a model of ``n_blocks`` repeating blocks, as the bundled
    llama.cpp does it (``llama-model.cpp``: the output layer counts as one more layer after the blocks,
    and the GPU takes the last N): ``(blocks on the GPU, whether the output layer is there)``.  -1 or more
    than the blocks: all of it; 0: none."""
    if n_gpu_layers < 0 or n_gpu_layers > n_blocks:
        return n_blocks, True
    if n_gpu_layers == 0:
        return 0, False
    return n_gpu_layers - 1, True


def gpu_fit(model: ResolvedModel, shape: dict[str, Any], ctx: int, gpus: list[dict]) -> dict[str, Any]:
    """How many of a GGUF model's layers fit in the free memory of ``gpus``
    (:func:`qvq_local.hardware.parse_nvidia_smi_memory`'s records), at ``ctx`` tokens."""
    plan = gpu_offload_plan(*offload_sizes(model, shape, ctx), sum(g["free_bytes"] for g in gpus))
    return {"gpus": [g["name"] for g in gpus], **plan}


def offload_sizes(model: ResolvedModel, shape: dict[str, Any], ctx: int) -> tuple[list[int], int, int, int]:
    """What :func:`gpu_need_bytes` takes for a resolved GGUF model at ``ctx`` tokens: each block's bytes,
    the output layer's, the KV cache per block, the mmproj's."""
    tensors: dict[str, Any] = {}
    for part in model_files(model):  # every part of a split GGUF, not its mmproj
        if model.mmproj is None or Path(part) != Path(model.mmproj):
            tensors.update(read_gguf_header(part).tensors)
    layers, head = gguf_layer_bytes(tensors)
    kv_per_layer = 2 * ctx * shape["kv_heads"] * shape["head_dim"] * shape["kv_bytes"]
    mmproj = Path(model.mmproj).stat().st_size if model.mmproj else 0
    return layers, head, kv_per_layer, mmproj


def gguf_layer_bytes(tensors: dict[str, Any]) -> tuple[list[int], int]:
    """Bytes of each repeating block (``blk.N.*``) of a GGUF text model, and of its output layer (norm
    and projection).  A head tied to the token embedding is copied to the output layer's device, so a
    model without ``output.weight`` counts ``token_embd.weight`` there."""
    blocks: dict[int, int] = {}
    for name, t in tensors.items():
        m = re.match(r"blk\.(\d+)\.", name)
        if m:
            blocks[int(m.group(1))] = blocks.get(int(m.group(1)), 0) + (t.n_bytes or 0)
    head_names = [
        "output_norm.weight",
        "output.weight" if "output.weight" in tensors else "token_embd.weight",
    ]
    head = sum(tensors[n].n_bytes or 0 for n in head_names if n in tensors)
    return [blocks[i] for i in sorted(blocks)], head


def gpu_need_bytes(
    layer_bytes: list[int], head_bytes: int, kv_per_layer: int, mmproj_bytes: int, gpu_layers: int
) -> int:
    """GPU memory ``--gpu-layers gpu_layers`` takes.  llama.cpp counts the output layer as one layer
    after the blocks: N puts the output layer and the last N - 1 blocks (with their KV cache) on the GPU,
    -1 or more than the blocks all of them; the vision encoder goes with any N but 0.  Plus
    :data:`OVERHEAD_FRACTION` of those weights and :data:`GPU_RESERVE`."""
    n = len(layer_bytes)
    blocks, output = gpu_split(gpu_layers, n)
    if not output:  # 0: nothing on the GPU, the vision encoder included
        return 0
    weights = (sum(layer_bytes[n - blocks :]) if blocks else 0) + head_bytes + mmproj_bytes
    return weights + blocks * kv_per_layer + int(OVERHEAD_FRACTION * weights) + GPU_RESERVE


def gpu_offload_plan(
    layer_bytes: list[int], head_bytes: int, kv_per_layer: int, mmproj_bytes: int, gpu_free: int
) -> dict[str, Any]:
    """How many layers (llama.cpp's count: the blocks and the output layer) fit in ``gpu_free`` bytes of
    GPU memory.  ``gpu_layers`` is ``"all"`` when everything fits, else the N for ``--gpu-layers`` (0:
    not even the output layer fits).  Several GPUs are summed, and llama.cpp splits the layers among them
    (each keeps its own CUDA context, so the estimate is looser there).
    """
    total = len(layer_bytes) + 1
    full = gpu_need_bytes(layer_bytes, head_bytes, kv_per_layer, mmproj_bytes, -1)
    fit = total
    if full > gpu_free:
        needs = (gpu_need_bytes(layer_bytes, head_bytes, kv_per_layer, mmproj_bytes, k) for k in range(total))
        fit = max((k for k, need in enumerate(needs) if need <= gpu_free), default=0)
    return {
        "layers": total,
        "gpu_layers": "all" if full <= gpu_free else fit,
        "needed_bytes": full,
        "free_bytes": gpu_free,
        "fits": full <= gpu_free,
    }
