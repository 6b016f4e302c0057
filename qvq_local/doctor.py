"""``qvq doctor``: what this machine has, which backends import, and whether a model fits in memory
(and, for a GGUF on a machine with an NVIDIA GPU, how many of its layers fit in the GPU's).

Why an estimate and not a trial load: a 72B model takes minutes to load and may push the machine into
swap; the numbers that decide whether it fits are on disk already.  The need is the weight files, plus the
KV cache for the context ``qvq ask`` would open (2 x layers x context x KV heads x head size x bytes per
value), plus a margin for compute buffers and the vision encoder.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Any

from qvq_local.errors import ModelError

#: Compute buffers, the vision encoder's scratch and the runtime, on top of weights and KV cache.
OVERHEAD_FRACTION = 0.10
OVERHEAD_FIXED = 512 * 1024**2
#: GPU memory llama.cpp takes beside the offloaded weights and their KV cache: the CUDA context and
#: compute buffers (and OVERHEAD_FRACTION of the offloaded weights, as for main memory).
GPU_RESERVE = 1024**3
#: What ``qvq ask`` asks for by default: prompt text, one image at the default pixel bound, budgets.
DEFAULT_PROMPT_TOKENS = 128


def _version(dist: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:  # noqa: BLE001 - not installed under that distribution name
        return None


def backend_report() -> list[dict[str, Any]]:
    """For each backend: whether its modules are importable (without importing them) and versions."""
    from qvq_local.backends import registry

    rows = []
    for spec in registry.BACKENDS.values():
        if spec.has(registry.REMOTE):
            continue  # nothing of it runs on this machine
        missing = []
        for mod in spec.modules:
            try:
                found = importlib.util.find_spec(mod) is not None
            except (ImportError, ValueError):
                found = False
            if not found:
                missing.append(mod)
        versions = {d: _version(d) for d in spec.distributions}
        rows.append(
            {
                "backend": spec.name,
                "installed": not missing,
                "missing": missing,
                "versions": versions,
                "install_hint": spec.install_hint,
            }
        )
    return rows


def _folder_config(folder: Path) -> dict[str, Any]:
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


def _gguf_config(model_file: Path) -> dict[str, Any]:
    from gguf import Keys

    from qvq_local.families import DEFAULT_FAMILY
    from qvq_local.formats.gguf import read_gguf_metadata

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


def default_context(context_length: int) -> int:
    """The context ``qvq ask`` opens with default settings (no think budget: up to 8192 thought tokens)."""
    from qvq_local.api import DEFAULT_ANSWER_BUDGET, DEFAULT_MAX_THOUGHT, FORCE_MARGIN

    image_tokens = 1024
    try:
        from qvq_local import images

        bound = getattr(images, "DEFAULT_MAX_PIXELS", None)
        if bound:
            image_tokens = int(bound) // images.FACTOR**2
    except ImportError:
        pass
    want = DEFAULT_PROMPT_TOKENS + image_tokens + DEFAULT_MAX_THOUGHT + DEFAULT_ANSWER_BUDGET + FORCE_MARGIN
    return min(context_length, want) if context_length else want


def model_fit(
    ref: str,
    n_ctx: int | None = None,
    available: int | None = None,
    total: int | None = None,
    gpus: list[dict] | None = None,
    working_set: int | None = None,
) -> dict[str, Any]:
    """Whether ``ref`` fits in memory with a context of ``n_ctx`` tokens (default: what ask would open);
    for a GGUF, with ``gpus`` (:func:`hardware.parse_nvidia_smi_memory`'s records), how many of its layers
    fit in their free memory; on a Mac, with Metal's ``working_set``, whether it fits there
    (:func:`metal_fit`)."""
    from qvq_local import hub, models

    resolved = hub.resolve(ref, download=False, progress=False)
    files = models.model_files(resolved)
    weights = sum(p.stat().st_size for p in files)
    shape = _gguf_config(resolved.path) if resolved.format == "gguf" else _folder_config(Path(resolved.path))
    ctx = int(n_ctx) if n_ctx else default_context(shape["context_length"])
    kv, overhead, need = memory_need(weights, shape, ctx)
    verdict = fit_verdict(need, available, total)
    return {
        "name": resolved.name,
        "family": models.model_family(resolved),
        "format": resolved.format,
        "cpu_buffers": _llama_buffers_for(resolved.path) if resolved.format == "gguf" else None,
        "path": str(resolved.path),
        "mmproj": str(resolved.mmproj) if resolved.mmproj else None,
        "quantization": resolved.quantization,
        "weights_bytes": weights,
        "context_tokens": ctx,
        "trained_context": shape["context_length"],
        "kv_cache_bytes": kv,
        "overhead_bytes": overhead,
        "needed_bytes": need,
        "available_bytes": available,
        "verdict": verdict,
        "fits": need <= available if available is not None else None,
        "gpu": _gpu_fit(resolved, shape, ctx, gpus) if gpus and resolved.format == "gguf" else None,
        "metal": metal_fit(need, working_set, total) if working_set else None,
    }


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


def _gpu_fit(resolved: Any, shape: dict[str, Any], ctx: int, gpus: list[dict]) -> dict[str, Any]:
    plan = gpu_offload_plan(*offload_sizes(resolved, shape, ctx), sum(g["free_bytes"] for g in gpus))
    return {"gpus": [g["name"] for g in gpus], **plan}


def offload_sizes(resolved: Any, shape: dict[str, Any], ctx: int) -> tuple[list[int], int, int, int]:
    """What :func:`gpu_need_bytes` takes for a resolved GGUF model at ``ctx`` tokens: each block's bytes,
    the output layer's, the KV cache per block, the mmproj's."""
    from qvq_local.formats.gguf import read_gguf_header
    from qvq_local.models import model_files

    tensors: dict[str, Any] = {}
    for part in model_files(resolved):  # every part of a split GGUF, not its mmproj
        if resolved.mmproj is None or Path(part) != Path(resolved.mmproj):
            tensors.update(read_gguf_header(part).tensors)
    layers, head = gguf_layer_bytes(tensors)
    kv_per_layer = 2 * ctx * shape["kv_heads"] * shape["head_dim"] * shape["kv_bytes"]
    mmproj = Path(resolved.mmproj).stat().st_size if resolved.mmproj else 0
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
    from qvq_local.backends.llama_buffers import gpu_split

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


def _llama_buffers_for(model_file: Path) -> str | None:
    """Which llama.cpp CPU buffer types this GGUF's weights will be loaded into here (None: no llama)."""
    try:
        import llama_cpp
    except (ImportError, OSError):  # not installed, or its shared library does not load
        return None

    from qvq_local.backends import llama_buffers as lb
    from qvq_local.cpu import detect
    from qvq_local.errors import InputError
    from qvq_local.formats.gguf import GgufHeaderError, read_gguf_header

    try:
        tensors = read_gguf_header(model_file).tensors
        plan = lb.plan_for_model(lb.requested_mode(None), detect(), lb.current_build(llama_cpp), tensors)
    except (OSError, GgufHeaderError, InputError) as exc:
        return f"unknown ({exc})"
    return plan.describe()


def report(
    model_ref: str | None = None, n_ctx: int | None = None, probe_gpu: bool = True, selftest: bool = False
) -> dict[str, Any]:
    """Everything ``qvq doctor`` shows, as a dict (``--json`` prints it as is)."""
    from qvq_local import config, hardware

    facts = hardware.describe(probe_gpu=probe_gpu)
    out: dict[str, Any] = {"machine": facts, "backends": backend_report()}
    if selftest:
        from qvq_local import selftest as st

        out["selftest"] = [r.as_dict() for r in st.run()]
    try:
        out["settings"] = config.effective()
    except Exception as exc:  # noqa: BLE001 - a broken config file is reported, not fatal here
        out["settings_error"] = str(exc)
    ref = model_ref or (out.get("settings") or {}).get("model")
    if ref:
        findings = model_integrity(str(ref))
        out["integrity"] = [{"level": f.level, "path": f.path, "message": f.message} for f in findings]
        out["integrity_errors"] = sum(f.level == "error" for f in findings)
        try:
            out["model"] = model_fit(
                str(ref),
                n_ctx,
                facts.get("memory_available_bytes"),
                facts.get("memory_total_bytes"),
                (facts.get("nvidia") or {}).get("memory"),
                facts.get("metal_working_set_bytes"),
            )
        except ModelError as exc:
            out["model_error"] = str(exc)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            if not out["integrity_errors"]:
                raise
            # a broken model (what the integrity findings describe) cannot be sized either
            out["model_error"] = f"{ref}: cannot estimate its memory needs ({type(exc).__name__}: {exc})"
    return out


def model_integrity(ref: str) -> list[Any]:
    """Header-only completeness checks of ``ref`` (:func:`qvq_local.integrity.check_model`): a download
    that stopped half-way, a missing shard or a projector from another model is named here, in plain
    words, instead of failing deep inside a backend at load time."""
    from qvq_local.integrity import check_model

    return check_model(ref)
