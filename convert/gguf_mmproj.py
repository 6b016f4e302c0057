"""The vision half of a GGUF pair, every family's part of it: the ``mmproj`` file (arch ``clip``).

llama.cpp's multimodal library (mtmd/clip) runs a family's ViT and its patch merger from this file.  A
family's converter class (``convert/gguf_converter.py``) lists the tensors (:func:`plan_mmproj_tensors`
reads them in the ways a Qwen-VL tower needs) and writes the key/values; this module holds what they all
share:

* the patch embedding is a Conv3d over two video frames ``[E, C, 2, P, P]``; clip runs it as two Conv2d
  kernels ``v.patch_embd.weight`` (frame 0) and ``v.patch_embd.weight.1`` (frame 1) and adds them, which
  is the same sum for a still image duplicated in time;
* a fused ``attn.qkv`` may be split by rows into ``attn_q``/``attn_k``/``attn_v``;
* the conv kernels stay F16/F32 (ggml's im2col needs a float kernel); norms and biases stay F32;
* the image statistics come from preprocessor_config.json (the family's published ones without it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from qvq_local.convert.checkpoint import Checkpoint
from qvq_local.convert.gguf_stream import PlannedTensor, iter_encoded

from qvq_local.errors import ModelError

#: The two Conv2d kernels clip reads for the two time frames of the Conv3d patch kernel.
PATCH_FRAME_NAMES = ("v.patch_embd.weight", "v.patch_embd.weight.1")


def arch() -> str:
    """``general.architecture`` of every llama.cpp vision projector file, whatever the family (gguf's
    ``MODEL_ARCH.MMPROJ`` name, "clip"; gguf is imported on use, as everywhere in the converter)."""
    from gguf import MODEL_ARCH, MODEL_ARCH_NAMES

    return MODEL_ARCH_NAMES[MODEL_ARCH.MMPROJ]


def image_norm(ckpt: Checkpoint) -> tuple[list[float], list[float]]:
    """Image mean and std from preprocessor_config.json (checked: three numbers each); the family's
    published statistics when the checkpoint has no such file or leaves them out."""
    cfg = ckpt.preprocessor_config
    path = ckpt.files.get("preprocessor_config.json", ckpt.folder)
    mean = cfg.get("image_mean", ckpt.family.image_mean)
    std = cfg.get("image_std", ckpt.family.image_std)
    for key, val in (("image_mean", mean), ("image_std", std)):
        if (
            not isinstance(val, (list, tuple))
            or len(val) != 3
            or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in val)
        ):
            raise ModelError(f"{key} must be three numbers, got {val!r}", path=path)
    if any(s <= 0 for s in std):
        raise ModelError(f"image_std must be positive, got {std!r}", path=path)
    return [float(x) for x in mean], [float(x) for x in std]


def plan_mmproj_tensors(
    ckpt: Checkpoint,
    entries: list[tuple[str, str, Any]],
    weight_type: str,
    tensor_type: Callable[[str, tuple[int, ...], str], str],
) -> list[PlannedTensor]:
    """The mmproj tensors ``entries`` lists, in order: ``(gguf_name, source_name, how)`` where ``how`` is
    None (a copy), ``("frame", t)`` (time slice ``t`` of the Conv3d kernel) or ``("rows", k, n)`` (the
    k-th of n equal row blocks, for a fused qkv).  ``weight_type`` (F32, F16 or Q8_0) is for the linear
    weights, whose type ``tensor_type(source, shape, weight_type)`` decides; the conv kernels are F16
    when it is F16 and F32 otherwise."""
    conv_type = "F16" if weight_type == "F16" else "F32"
    plan: list[PlannedTensor] = []
    for gname, src, how in entries:
        shape = ckpt.shape(src)
        if how is None:
            qt = tensor_type(src, shape, weight_type)
            plan.append(PlannedTensor(gname, shape, qt, _src(ckpt, src, qt)))
        elif how[0] == "frame":
            e, c, _, p, q = shape
            plan.append(
                PlannedTensor(
                    gname, (e, c, p, q), conv_type, _src(ckpt, src, conv_type, select=_frame(how[1]))
                )
            )
        elif how[0] == "rows":
            _, k, n = how
            rows = shape[0] // n
            part = (rows,) + shape[1:]
            qt = tensor_type(src, part, weight_type)
            plan.append(
                PlannedTensor(gname, part, qt, _src(ckpt, src, qt, start=k * rows, stop=(k + 1) * rows))
            )
        else:  # pragma: no cover - a converter class's mistake
            raise ValueError(f"unknown mmproj source {how!r} for {gname}")
    return plan


def _frame(t: int) -> Callable[[Any], Any]:
    return lambda block: block[:, :, t]


def _src(
    ckpt: Checkpoint,
    name: str,
    qtype: str,
    start: int = 0,
    stop: int | None = None,
    select: Callable[[Any], Any] | None = None,
) -> Callable[[], Any]:
    return lambda: iter_encoded(ckpt, name, qtype, start, stop, select)
