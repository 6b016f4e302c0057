"""The vision half of a Qwen2-VL GGUF pair: the ``mmproj`` file (arch ``clip``, projector ``qwen2vl_merger``).

llama.cpp's multimodal library (mtmd/clip) runs the Qwen2-VL ViT and its 2x2 patch merger from this file.
Three things differ from the checkpoint's layout:

* the patch embedding is a Conv3d over two video frames ``[E, C, 2, P, P]``; clip runs it as two Conv2d
  kernels ``v.patch_embd.weight`` (frame 0) and ``v.patch_embd.weight.1`` (frame 1) and adds them, which
  is the same sum for a still image duplicated in time;
* each block's fused ``attn.qkv`` is split by rows into ``attn_q``/``attn_k``/``attn_v``;
* the merger becomes ``v.post_ln`` (its LayerNorm) and ``mm.0``/``mm.2`` (its two linear layers).

The conv kernels stay F16/F32 (ggml's im2col needs a float kernel); norms and biases stay F32.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from qvq_local.convert.checkpoint import Checkpoint
from qvq_local.convert.gguf_stream import PlannedTensor, iter_encoded

from qvq_local.errors import ModelError
from qvq_local.families import qwen2vl


def arch() -> str:
    """``general.architecture`` of every llama.cpp vision projector file, whatever the family (gguf's
    ``MODEL_ARCH.MMPROJ`` name, "clip"; gguf is imported on use, as everywhere in the converter)."""
    from gguf import MODEL_ARCH, MODEL_ARCH_NAMES

    return MODEL_ARCH_NAMES[MODEL_ARCH.MMPROJ]


# Qwen2-VL's processor values (OpenAI CLIP's), used when the checkpoint has no preprocessor_config.json.
DEFAULT_MEAN = qwen2vl.IMAGE_MEAN
DEFAULT_STD = qwen2vl.IMAGE_STD


def image_norm(ckpt: Checkpoint) -> tuple[list[float], list[float]]:
    """Image mean and std from preprocessor_config.json (checked: three numbers each)."""
    cfg = ckpt.preprocessor_config
    path = ckpt.files.get("preprocessor_config.json", ckpt.folder)
    mean = cfg.get("image_mean", DEFAULT_MEAN)
    std = cfg.get("image_std", DEFAULT_STD)
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


def mmproj_metadata(ckpt: Checkpoint, file_type: int, name: str) -> Callable[[Any], None]:
    mean, std = image_norm(ckpt)

    def add(w: Any) -> None:
        v = ckpt.vision
        w.add_type("mmproj")
        w.add_name(name)
        w.add_file_type(file_type)
        w.add_clip_has_vision_encoder(True)
        w.add_clip_projector_type(ckpt.family.gguf_projector)
        w.add_vision_projection_dim(ckpt.text.hidden_size)
        w.add_vision_image_size(ckpt.family.mmproj_image_size)
        w.add_vision_patch_size(v.patch_size)
        w.add_vision_embedding_length(v.embed_dim)
        w.add_vision_feed_forward_length(v.mlp_dim)
        w.add_vision_block_count(v.depth)
        w.add_vision_head_count(v.num_heads)
        w.add_vision_attention_layernorm_eps(v.layer_norm_eps)
        w.add_vision_spatial_merge_size(v.spatial_merge_size)
        w.add_vision_image_mean(mean)
        w.add_vision_image_std(std)
        ckpt.family.mmproj_family_keys(w, ckpt)  # the family's own keys (activation, window attention, ...)

    return add


def mmproj_tensor_plan(ckpt: Checkpoint, weight_type: str) -> list[PlannedTensor]:
    """The mmproj tensors, in the family's order (:meth:`Family.mmproj_tensors`).  ``weight_type`` (F32,
    F16 or Q8_0) applies to the linear weights; the conv kernels are F16 when it is F16 and F32
    otherwise; norms and biases are F32."""
    conv_type = "F16" if weight_type == "F16" else "F32"

    def linear_type(shape: tuple[int, ...]) -> str:
        if len(shape) == 1:
            return "F32"
        if weight_type == "Q8_0" and shape[-1] % 32:
            return "F16"  # Q8_0 needs widths divisible by its 32-element blocks
        return weight_type

    plan: list[PlannedTensor] = []
    for gname, src, how in ckpt.family.mmproj_tensors(ckpt):
        shape = ckpt.shape(src)
        if how is None:
            qt = linear_type(shape)
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
            qt = linear_type(part)
            plan.append(
                PlannedTensor(gname, part, qt, _src(ckpt, src, qt, start=k * rows, stop=(k + 1) * rows))
            )
        else:  # pragma: no cover - a family module's mistake
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
