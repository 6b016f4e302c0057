"""The physical limit of decoding: this machine's memory bandwidth and the bytes one token must read.

Decoding one token of a dense transformer at short context reads every weight of the text model once:
all decoder layers, the final norm, the output projection (``lm_head``), and one row of the token
embedding.  The vision tower is not touched after the image is encoded.  So::

    bytes_per_token  = sum(text tensors except the embedding) + one embedding row
                       (when lm_head is tied to the embedding, the whole embedding is read as lm_head)
    tokens/s bound   = read bandwidth (bytes/s) / bytes_per_token

A mixture of experts reads only the experts its router picks: each expert tensor (all experts packed in
one, or one tensor per expert) counts ``experts_per_token / experts`` of its bytes; the router, a shared
expert and everything else count in full.  So "of bound" stays the fraction of the memory system used,
while the memory the model needs (``qvq doctor``) still counts every expert.

The KV cache read per token (2 x layers x kv_width x bytes x context) is left out: at the benchmark's
few hundred positions it is about 1% of the weights of a 2B-shaped model.  The figure is therefore an
upper bound that no implementation can beat; measured decode tokens/s divided by it is the fraction of
the machine's memory system the backend uses.

Bandwidth is measured with numpy over an array far larger than any cache (1 GiB by default): a
reduction (read only) and a copy (read + write, counted as both, as STREAM does).  Each is repeated and
both the best and the median are reported; the bound uses the median read figure (sustained, not peak).
"""

from __future__ import annotations

import json
import os
import statistics
import threading
import time
from pathlib import Path
from typing import Any

from qvq_local.cpu import usable_cores


def _timed_reps(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def _read_times(n: int, reps: int, threads: int) -> tuple[list[float], list[float]]:
    """Seconds per pass over ``n`` uint64 values: one thread, then ``threads`` threads on slices."""
    import numpy as np

    data = np.ones(n, dtype=np.uint64)  # ones, not empty: the pages must really exist
    chunks = np.array_split(data, threads)

    def read_one() -> None:
        np.bitwise_or.reduce(data)

    def read_par() -> None:
        workers = [threading.Thread(target=np.bitwise_or.reduce, args=(c,)) for c in chunks]
        for w in workers:
            w.start()
        for w in workers:
            w.join()

    read_one()  # warm-up: page faults and caches out of the way
    t_one = _timed_reps(read_one, reps)
    t_par = _timed_reps(read_par, reps) if threads > 1 else t_one
    return t_one, t_par


def _copy_times(n: int, reps: int) -> list[float]:
    """Seconds per ``np.copyto`` of ``n`` uint64 values (after one warm-up copy)."""
    import numpy as np

    src = np.ones(n, dtype=np.uint64)
    dst = np.zeros_like(src)
    np.copyto(dst, src)
    return _timed_reps(lambda: np.copyto(dst, src), reps)


def measure_bandwidth(size_bytes: int = 1 << 30, reps: int = 5, threads: int | None = None) -> dict:
    """Sustained memory bandwidth in GB/s (10^9 bytes/s).

    ``read``: ``np.bitwise_or.reduce`` over a uint64 array of ``size_bytes`` (one pass, read only, cheap
    enough per element that memory, not arithmetic, limits it), split across ``threads`` threads (numpy
    releases the GIL inside reductions; the best of one thread and all threads is kept per repetition).
    ``copy``: ``np.copyto`` between two arrays of ``size_bytes / 2`` each, counting read + write bytes.
    """
    threads = max(1, threads or usable_cores())
    n = max(1, size_bytes // 8)
    t_one, t_par = _read_times(n, reps, threads)
    read_s = [min(a, b) for a, b in zip(t_one, t_par)]
    half = max(1, n // 2)
    copy_s = _copy_times(half, reps)

    read_bytes = n * 8
    copy_bytes = 2 * half * 8
    return {
        "method": "numpy bitwise_or.reduce (read) and copyto (read+write), uint64",
        "size_bytes": read_bytes,
        "reps": reps,
        "threads": threads,
        "read_gbs_median": read_bytes / statistics.median(read_s) / 1e9,
        "read_gbs_best": read_bytes / min(read_s) / 1e9,
        "read_gbs_single_thread_median": read_bytes / statistics.median(t_one) / 1e9,
        "copy_gbs_median": copy_bytes / statistics.median(copy_s) / 1e9,
        "copy_gbs_best": copy_bytes / min(copy_s) / 1e9,
    }


# ---------------------------------------------------------------- bytes read per decoded token


def _safetensors_sizes(path: Path) -> dict[str, tuple[int, list[int]]]:
    """``{name: (nbytes, shape)}`` from a safetensors header alone (no data is read)."""
    from qvq_local.formats.safetensors import SafetensorsFile

    st = SafetensorsFile(path)
    try:
        return {name: (st.nbytes(name), list(st.shape(name))) for name in st}
    finally:
        st.close()


def _per_token(
    sizes: dict[str, tuple[int, list[int]]],
    is_vision,
    is_embed,
    is_lm_head,
    is_expert=lambda k: False,
    experts: tuple[int, int] | None = None,
) -> dict:
    """Apply the formula in the module docstring to a ``{name: (nbytes, shape)}`` table; ``experts``:
    ``(experts, experts per token)`` of a mixture of experts, whose ``is_expert`` tensors are read in part."""
    vision = sum(b for k, (b, _) in sizes.items() if is_vision(k))
    text = {k: v for k, v in sizes.items() if not is_vision(k)}
    expert_bytes = sum(b for k, (b, _) in text.items() if is_expert(k)) if experts else 0
    unread = expert_bytes - expert_bytes * experts[1] // experts[0] if experts else 0
    embed = {k: v for k, v in text.items() if is_embed(k)}
    embed_bytes = sum(b for b, _ in embed.values())
    rows = max((s[0] for b, s in embed.values() if s), default=1) or 1
    tied = not any(is_lm_head(k) for k in text)
    text_bytes = sum(b for b, _ in text.values())
    row = embed_bytes // rows  # the one embedding row a token looks up
    # tied: the whole embedding is read again as the output head; untied: only the looked-up row is read
    per_token = (text_bytes + row if tied else text_bytes - embed_bytes + row) - unread
    out = {
        "bytes_per_token": int(per_token),
        "text_weights_bytes": int(text_bytes),
        "embedding_bytes": int(embed_bytes),
        "vision_bytes": int(vision),
        "tied_lm_head": tied,
    }
    if experts:
        out.update(experts=experts[0], experts_per_token=experts[1], expert_bytes=int(expert_bytes))
    return out


def _experts(total: Any, per_token: Any, where: Any) -> tuple[int, int] | None:
    """``(experts, experts per token)`` from a model's own numbers (None: not a mixture of experts); a
    ModelError naming ``where`` when they make no sense."""
    from qvq_local.errors import ModelError

    if not total:
        return None
    if not (isinstance(total, int) and isinstance(per_token, int) and 0 < per_token <= total):
        raise ModelError(f"{per_token!r} experts per token of {total!r} makes no sense", path=where)
    return int(total), int(per_token)


def gguf_bytes_per_token(model_gguf: str | os.PathLike) -> dict:
    """Bytes one decoded token reads from a text-model GGUF (the mmproj is the vision tower)."""
    from gguf import Keys

    from qvq_local.errors import ModelError
    from qvq_local.formats.gguf import read_gguf_header

    # The header alone (tensor types and shapes) gives every size; GGUFReader would map every tensor.
    header = read_gguf_header(model_gguf)
    tensors = header.tensors
    unsized = [name for name, t in tensors.items() if t.n_bytes is None]
    if unsized:
        raise ModelError(f"unknown ggml tensor type for {unsized[0]!r}", path=model_gguf)
    # GGUF shapes are innermost-first: ne[1] of token_embd is the vocabulary (rows).
    arch = header.fields.get(Keys.General.ARCHITECTURE)
    experts = _experts(
        header.fields.get(Keys.LLM.EXPERT_COUNT.format(arch=arch)),
        header.fields.get(Keys.LLM.EXPERT_USED_COUNT.format(arch=arch)),
        model_gguf,
    )
    sizes = {name: (int(t.n_bytes), [int(x) for x in reversed(t.shape)]) for name, t in tensors.items()}
    out = _per_token(
        sizes,
        is_vision=lambda k: k.startswith(("v.", "mm.")),
        is_embed=lambda k: k.startswith("token_embd"),
        is_lm_head=lambda k: k.startswith("output."),
        is_expert=lambda k: "_exps." in k,  # llama.cpp's packed experts; the shared expert is ``_shexp``
        experts=experts,
    )
    out["file_bytes"] = Path(model_gguf).stat().st_size
    return out


def mlx_bytes_per_token(model_dir: str | os.PathLike) -> dict:
    """Bytes one decoded token reads from an mlx-vlm model folder (vision tower excluded).

    A quantised tensor comes as ``weight`` (packed), ``scales`` and ``biases``; all three belong to the
    same group, and the embedding's row count is taken from ``scales`` / ``weight``'s first dimension.
    """
    sizes: dict[str, tuple[int, list[int]]] = {}
    for shard in sorted(Path(model_dir).glob("*.safetensors")):
        sizes.update(_safetensors_sizes(shard))
    config_path = Path(model_dir) / "config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    text_config = {**config, **(config.get("text_config") or {})}
    # transformers 5 writes num_local_experts where the published configs say num_experts
    total = text_config.get("num_experts") or text_config.get("num_local_experts")
    experts = _experts(total, text_config.get("num_experts_per_tok"), config_path)
    out = _per_token(
        sizes,
        is_vision=lambda k: "vision_tower" in k or k.startswith("visual."),
        is_embed=lambda k: "embed_tokens" in k,
        is_lm_head=lambda k: "lm_head" in k,
        # mlx-vlm's packed experts (SwitchGLU) or transformers' names; the shared expert is read in full
        is_expert=lambda k: ".switch_mlp." in k or (".experts." in k and "shared_expert" not in k),
        experts=experts,
    )
    out["file_bytes"] = sum(p.stat().st_size for p in Path(model_dir).glob("*.safetensors"))
    return out


def decode_bound(bandwidth_gbs: float, bytes_per_token: int) -> float:
    """Tokens per second the memory system allows at most (0.0 when either figure is unknown)."""
    if bandwidth_gbs <= 0 or bytes_per_token <= 0:
        return 0.0
    return bandwidth_gbs * 1e9 / bytes_per_token


def _bytes_on_disk(path: str | os.PathLike) -> int:
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def weights_per_token(fmt: str, model: str | os.PathLike, mmproj: str | os.PathLike | None = None) -> dict:
    """What a model in format ``fmt`` reads per decoded token, and its size on disk (``model_bytes``,
    vision projector included).  A format whose weights bench cannot read (none but ``gguf`` and ``mlx``)
    gets its size alone: ``bytes_per_token`` is None, and no bound is drawn."""
    if fmt == "gguf":
        out = gguf_bytes_per_token(model)
        vision = Path(mmproj).stat().st_size if mmproj else 0
        out["model_bytes"] = out["file_bytes"] + vision
        out["vision_bytes"] = vision
    elif fmt == "mlx":
        out = mlx_bytes_per_token(model)
        out["model_bytes"] = _bytes_on_disk(model)
    else:
        out = {
            "bytes_per_token": None,
            "model_bytes": _bytes_on_disk(model) + (_bytes_on_disk(mmproj) if mmproj else 0),
        }
    return out
