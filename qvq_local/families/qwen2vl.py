"""The Qwen2-VL family: QVQ-72B-Preview and Qwen2-VL-2B/7B/72B-Instruct.

Everything qvq-local knows that is particular to this architecture is written here once, and every other
module asks for it (``tests/test_families.py`` checks that no module outside ``families/`` names the
architecture or its GGUF identifiers):

* Hugging Face ``config.json``: ``architectures`` / ``model_type``, parsed into :class:`TextDims` and
  :class:`VisionDims` (flat text fields or transformers 5's ``text_config``);
* the checkpoint's tensors: both namings (:func:`normalise_name`) and every tensor's shape
  (:func:`expected_shapes`), which ``qvq convert`` and ``qvq doctor`` check;
* the GGUF pair llama.cpp runs: text architecture ``qwen2vl`` and mmproj projector ``qwen2vl_merger``
  (gguf-py's own constants), with the tensor maps the converter writes;
* the image grid: 14-pixel patches merged 2x2 into one token, so sides are multiples of 28, sized by
  :func:`smart_resize` (images.py, the llama.cpp backend and the MLX backend all use it);
* prompt defaults (QVQ's system prompt and sampling), Qwen's special tokens, QVQ's answer markers;
* the synthetic shapes tests and demos build checkpoints from.

Facts were checked against the published checkpoints and llama.cpp's converter (see DESIGN.md).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from qvq_local.errors import InputError, ModelError
from qvq_local.families.base import Family, check_vision_widths, need_number

# ------------------------------------------------------------------------------------------ tokens

#: Qwen's special tokens in their original order; the first one's id is the size of the base vocabulary.
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

#: Id of ``<|endoftext|>`` in every Qwen2 / Qwen2-VL / QVQ tokenizer.
BASE_VOCAB = 151643

#: What one image looks like in a rendered prompt (backends rewrite it for their library).
IMAGE_BLOCK = "<|vision_start|><|image_pad|><|vision_end|>"
IMAGE_PAD = "<|image_pad|>"

# ------------------------------------------------------------------------------------------ prompt defaults

#: QVQ-72B-Preview's system prompt, sent unless ``--system`` (``system=``) replaces it.
#:
#: Two versions are published.  The model card's example passes this sentence.  LLaMA-Factory and ms-swift
#: register QVQ with one more: "... You are Qwen developed by Alibaba. Answer in the language of the
#: question. You should think step-by-step."  This project sends the model card's, because it is the
#: authors' own inference example, the published demo replies the controller is built and tested on
#: (``tests/test_replay.py``) come from it, and a sentence the base model may never have been trained
#: with is an untested change to its behaviour; the language of the answer is this project's job instead
#: (the forced answer in the question's language, ``reasoning.default_forced_text``).  A model fine-tuned
#: with those frameworks saw their sentence: pass it with ``--system``.
SYSTEM_PROMPT = "You are a helpful and harmless assistant. You are Qwen developed by Alibaba. You should think step-by-step."

#: QVQ-72B-Preview's published sampling (its generation_config.json): near-greedy.  The fallback for a model
#: that ships no sampling values of its own (``SamplingParams.resolved``).
SAMPLING: dict[str, float | int] = {
    "temperature": 0.01,
    "top_p": 0.001,
    "top_k": 1,
    "repetition_penalty": 1.05,
}

# ------------------------------------------------------------------------------------------ answers

#: QVQ's answer markers by question language, the first of each the one forced text ends with.  QVQ has no
#: think tags: it writes reasoning prose and then a "**Final Answer**" section (English questions) or a
#: "**答案**" section (Chinese ones), as in its published demo replies.
ANSWER_MARKERS: dict[str, tuple[str, ...]] = {
    "en": ("**Final Answer**", "**Final Answer:**", "**Final answer**", "**Final answer:**"),
    "zh": ("**答案**", "**答案：**", "**答案:**", "**最终答案**", "**最终答案：**", "**最终答案:**"),
}

# ------------------------------------------------------------------------------------------ images

PATCH_SIZE = 14
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
#: Side of one image token in pixels: a 14-pixel patch, merged 2x2.
IMAGE_FACTOR = PATCH_SIZE * MERGE_SIZE
#: Qwen2VLImageProcessor's pixel bounds (``min_pixels`` / ``max_pixels`` of its preprocessor_config.json).
PROCESSOR_MIN_PIXELS = 56 * 56
PROCESSOR_MAX_PIXELS = 16384 * IMAGE_FACTOR * IMAGE_FACTOR
#: Its image statistics (OpenAI CLIP's), used when a checkpoint has no preprocessor_config.json.
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
#: ``clip.vision.image_size`` llama.cpp's converter writes for Qwen2-VL (used for mtmd's warm-up only).
MMPROJ_IMAGE_SIZE = 560


def smart_resize(
    width: int,
    height: int,
    *,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    factor: int = IMAGE_FACTOR,
) -> tuple[int, int]:
    """Qwen2-VL's resize rule (transformers' ``smart_resize``, llama.cpp's ``calc_size_preserved_ratio``).

    Each side rounded to a multiple of ``factor`` (at least one ``factor``); when the area is above
    ``max_pixels`` both sides are scaled down (floored), when below ``min_pixels`` scaled up (ceiled),
    the aspect ratio kept.  ``None`` leaves that bound out.  Returns ``(width, height)`` in pixels.
    """
    if width < 1 or height < 1:
        raise InputError(f"image size {width}x{height} is empty")

    def snap(x: float, how) -> int:
        return max(factor, int(how(x / factor)) * factor)

    w, h = snap(width, round), snap(height, round)
    if max_pixels is not None and w * h > max_pixels:
        beta = math.sqrt(width * height / max_pixels)
        w, h = snap(width / beta, math.floor), snap(height / beta, math.floor)
    elif min_pixels is not None and w * h < min_pixels:
        beta = math.sqrt(min_pixels / (width * height))
        w, h = snap(width * beta, math.ceil), snap(height * beta, math.ceil)
    return w, h


def image_tokens(width: int, height: int, factor: int = IMAGE_FACTOR) -> int:
    """Image tokens (after the merge) for an image already resized to ``width`` x ``height``."""
    return (width // factor) * (height // factor)


# ------------------------------------------------------------------------------------------ dimensions


@dataclass(frozen=True)
class TextDims:
    """The language model's shape, from config.json (checked against the tensors)."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int  # rows of the embedding (may exceed the tokenizer's token count)
    rms_norm_eps: float
    rope_theta: float
    mrope_section: tuple[int, ...]
    max_position_embeddings: int
    tie_word_embeddings: bool


@dataclass(frozen=True)
class VisionDims:
    """The vision tower's shape (a ViT plus the 2x2 patch merger that projects into the text width)."""

    embed_dim: int
    depth: int
    num_heads: int
    mlp_dim: int
    patch_size: int
    temporal_patch_size: int
    in_channels: int
    spatial_merge_size: int
    out_hidden_size: int
    hidden_act: str
    layer_norm_eps: float = 1e-6

    @property
    def merged_dim(self) -> int:
        """Width of the merger's input: embed_dim times the merged patch count."""
        return self.embed_dim * self.spatial_merge_size**2


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The text fields of a config.json: flat (Qwen2-VL) or transformers 5's ``text_config`` over them."""
    return {**config, **(config.get("text_config") or {})}


def merger_width(config: dict[str, Any]) -> Any:
    """The width the vision merger projects into (``vision_config.hidden_size``; the text width if absent)."""
    vision = config.get("vision_config")
    hidden = text_config(config).get("hidden_size")
    return vision.get("hidden_size", hidden) if isinstance(vision, dict) else None


def dims_from_config(config: dict[str, Any], path: Path) -> tuple[TextDims, VisionDims]:
    """Read the text and vision shapes; a ModelError naming ``path`` for anything missing or inconsistent."""
    return _vision_dims(config, path, text_dims_from_config(config, path))


def text_dims_from_config(config: dict[str, Any], path: Path) -> TextDims:
    """The language model's dims (Qwen2 with M-RoPE; Qwen2.5-VL's text model is the same)."""
    tc = text_config(config)
    hidden = need_number(tc, "hidden_size", path)
    heads = need_number(tc, "num_attention_heads", path)
    kv_heads = int(tc.get("num_key_value_heads") or heads)
    if hidden % heads or heads % kv_heads:
        raise ModelError(
            f"hidden_size {hidden} / heads {heads} / kv heads {kv_heads} do not divide", path=path
        )
    head_dim = hidden // heads
    rope = tc.get("rope_scaling") or tc.get("rope_parameters") or {}
    section = tuple(int(x) for x in (rope.get("mrope_section") or ()))
    if not section:
        raise ModelError("no rope_scaling.mrope_section (Qwen2-VL uses multimodal RoPE)", path=path)
    if sum(section) * 2 != head_dim or len(section) > 4:
        raise ModelError(f"mrope_section {list(section)} must sum to head_dim/2 = {head_dim // 2}", path=path)
    rope_theta = float(tc.get("rope_theta") or rope.get("rope_theta") or 1_000_000.0)
    return TextDims(
        hidden_size=hidden,
        num_layers=need_number(tc, "num_hidden_layers", path),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=need_number(tc, "intermediate_size", path),
        vocab_size=need_number(tc, "vocab_size", path),
        rms_norm_eps=float(tc.get("rms_norm_eps") or 1e-6),
        rope_theta=rope_theta,
        mrope_section=section,
        max_position_embeddings=int(tc.get("max_position_embeddings") or 32768),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", tc.get("tie_word_embeddings", False))),
    )


def _vision_dims(config: dict[str, Any], path: Path, text: TextDims) -> tuple[TextDims, VisionDims]:
    hidden = text.hidden_size
    vc = config.get("vision_config")
    if not isinstance(vc, dict):
        raise ModelError("no vision_config", path=path)
    vpath = Path(f"{path} (vision_config)")
    embed = need_number(vc, "embed_dim", vpath)
    ratio = float(vc.get("mlp_ratio", 4))
    vision = VisionDims(
        embed_dim=embed,
        depth=need_number(vc, "depth", vpath),
        num_heads=need_number(vc, "num_heads", vpath),
        mlp_dim=int(embed * ratio),
        patch_size=int(vc.get("patch_size", PATCH_SIZE)),
        temporal_patch_size=int(vc.get("temporal_patch_size", TEMPORAL_PATCH_SIZE)),
        in_channels=int(vc.get("in_chans", vc.get("in_channels", 3))),
        spatial_merge_size=int(vc.get("spatial_merge_size", MERGE_SIZE)),
        out_hidden_size=int(vc.get("hidden_size", hidden)),
        hidden_act=str(vc.get("hidden_act", "quick_gelu")),
    )
    check_vision_widths(
        merger_key="hidden_size",
        merger_out=vision.out_hidden_size,
        text_hidden=hidden,
        embed_key="embed_dim",
        embed=embed,
        heads=vision.num_heads,
        path=path,
    )
    return text, vision


# ------------------------------------------------------------------------------------------ tensors

# transformers 5 prefix -> original prefix (first match wins; longer prefixes first).
_RENAMES = (
    ("model.language_model.", "model."),
    ("model.visual.", "visual."),
)

#: Tensor-name endings that carry a width the text model must match (``qvq doctor`` reads their shapes).
MERGER_OUT_SUFFIX = "merger.mlp.2.weight"
EMBEDDING_SUFFIX = "embed_tokens.weight"
WIDTH_TENSOR_SUFFIXES = (MERGER_OUT_SUFFIX, "merger.mlp.2.bias", EMBEDDING_SUFFIX)


def normalise_name(name: str) -> str:
    """Map a stored tensor name (either naming) to the original Qwen2-VL name."""
    for new, old in _RENAMES:
        if name.startswith(new):
            return old + name[len(new) :]
    return name


def is_vision_tensor(name: str) -> bool:
    """True for a vision-tower tensor (original naming)."""
    return name.startswith("visual.")


def expected_shapes(text: TextDims, vision: VisionDims) -> dict[str, tuple[int, ...]]:
    """Every tensor a Qwen2-VL checkpoint with these dims holds (original names), with its shape."""
    shapes = text_expected_shapes(text)
    shapes.update(_vision_expected_shapes(vision))
    return shapes


def text_expected_shapes(text: TextDims) -> dict[str, tuple[int, ...]]:
    """The text model's tensors and shapes (shared with Qwen2.5-VL)."""
    h, q, kv, f = (
        text.hidden_size,
        text.num_heads * text.head_dim,
        text.num_kv_heads * text.head_dim,
        text.intermediate_size,
    )
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (text.vocab_size, h),
        "model.norm.weight": (h,),
    }
    if not text.tie_word_embeddings:
        shapes["lm_head.weight"] = (text.vocab_size, h)
    for i in range(text.num_layers):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (q, h),
                p + "self_attn.q_proj.bias": (q,),
                p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.k_proj.bias": (kv,),
                p + "self_attn.v_proj.weight": (kv, h),
                p + "self_attn.v_proj.bias": (kv,),
                p + "self_attn.o_proj.weight": (h, q),
                p + "mlp.gate_proj.weight": (f, h),
                p + "mlp.up_proj.weight": (f, h),
                p + "mlp.down_proj.weight": (h, f),
            }
        )
    return shapes


def _vision_expected_shapes(vision: VisionDims) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    e, m, md = vision.embed_dim, vision.mlp_dim, vision.merged_dim
    shapes["visual.patch_embed.proj.weight"] = (
        e,
        vision.in_channels,
        vision.temporal_patch_size,
        vision.patch_size,
        vision.patch_size,
    )
    for i in range(vision.depth):
        p = f"visual.blocks.{i}."
        shapes.update(
            {
                p + "norm1.weight": (e,),
                p + "norm1.bias": (e,),
                p + "norm2.weight": (e,),
                p + "norm2.bias": (e,),
                p + "attn.qkv.weight": (3 * e, e),
                p + "attn.qkv.bias": (3 * e,),
                p + "attn.proj.weight": (e, e),
                p + "attn.proj.bias": (e,),
                p + "mlp.fc1.weight": (m, e),
                p + "mlp.fc1.bias": (m,),
                p + "mlp.fc2.weight": (e, m),
                p + "mlp.fc2.bias": (e,),
            }
        )
    shapes.update(
        {
            "visual.merger.ln_q.weight": (e,),
            "visual.merger.ln_q.bias": (e,),
            "visual.merger.mlp.0.weight": (md, md),
            "visual.merger.mlp.0.bias": (md,),
            "visual.merger.mlp.2.weight": (vision.out_hidden_size, md),
            "visual.merger.mlp.2.bias": (vision.out_hidden_size,),
        }
    )
    return shapes


# ------------------------------------------------------------------------------------------ GGUF maps

#: ``tokenizer.ggml.pre`` of the text GGUF (Qwen2's pre-tokenizer regex).
GGUF_TOKENIZER_PRE = "qwen2"

#: Original layer tensor suffix -> GGUF layer tensor name (llama.cpp's qwen2vl: Qwen2 with M-RoPE; no
#: transpose or permutation, only renaming).
GGUF_TEXT_LAYER_MAP = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
GGUF_TEXT_GLOBAL_MAP = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def gguf_text_name(name: str) -> str | None:
    """GGUF name of an original text tensor name, or None for a tensor that is not part of the text model."""
    if name in GGUF_TEXT_GLOBAL_MAP:
        return GGUF_TEXT_GLOBAL_MAP[name]
    m = _LAYER_RE.match(name)
    if m and m.group(2) in GGUF_TEXT_LAYER_MAP:
        return f"blk.{m.group(1)}.{GGUF_TEXT_LAYER_MAP[m.group(2)]}"
    return None


def gguf_text_order(text: TextDims, has_lm_head: bool) -> list[str]:
    """The text tensors (original names) in the order the GGUF stores them."""
    order = ["model.embed_tokens.weight"]
    for i in range(text.num_layers):
        order += [f"model.layers.{i}.{k}" for k in GGUF_TEXT_LAYER_MAP]
    order.append("model.norm.weight")
    if has_lm_head:
        order.append("lm_head.weight")
    return order


#: The mmproj: the Conv3d patch kernel split in time into these two Conv2d kernels; each block's fused
#: ``attn.qkv`` split by rows into ``attn_q``/``attn_k``/``attn_v``; the rest renamed.
MMPROJ_PATCH_SOURCE = "visual.patch_embed.proj.weight"
MMPROJ_PATCH_NAMES = ("v.patch_embd.weight", "v.patch_embd.weight.1")
MMPROJ_BLOCK_MAP = {
    "norm1.weight": "ln1.weight",
    "norm1.bias": "ln1.bias",
    "norm2.weight": "ln2.weight",
    "norm2.bias": "ln2.bias",
    "attn.proj.weight": "attn_out.weight",
    "attn.proj.bias": "attn_out.bias",
    "mlp.fc1.weight": "ffn_up.weight",
    "mlp.fc1.bias": "ffn_up.bias",
    "mlp.fc2.weight": "ffn_down.weight",
    "mlp.fc2.bias": "ffn_down.bias",
}
MMPROJ_MERGER_MAP = {
    "visual.merger.ln_q.weight": "v.post_ln.weight",
    "visual.merger.ln_q.bias": "v.post_ln.bias",
    "visual.merger.mlp.0.weight": "mm.0.weight",
    "visual.merger.mlp.0.bias": "mm.0.bias",
    "visual.merger.mlp.2.weight": "mm.2.weight",
    "visual.merger.mlp.2.bias": "mm.2.bias",
}
#: The mmproj tensor whose rows are the projector's output width.
MMPROJ_OUT_TENSOR = "mm.2"


# ------------------------------------------------------------------------------------------ synthetic shapes


@dataclass(frozen=True)
class SynthShape:
    """The dimensions of one synthetic model (the fields a Qwen2-VL config.json carries)."""

    name: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int  # embedding rows
    tie_word_embeddings: bool
    mrope_section: tuple[int, int, int]
    max_position_embeddings: int
    vision_depth: int = 32
    vision_embed_dim: int = 1280
    vision_num_heads: int = 16
    vision_mlp_ratio: int = 4
    patch_size: int = PATCH_SIZE
    spatial_merge_size: int = MERGE_SIZE
    temporal_patch_size: int = TEMPORAL_PATCH_SIZE
    rope_theta: float = 1000000.0
    rms_norm_eps: float = 1e-6
    tokenizer_base: int = BASE_VOCAB  # id of <|endoftext|>
    max_shard_bytes: int = 4_000_000_000  # QVQ-72B-Preview ships 38 shards of ~3.7 GiB
    family: str = "Qwen2-VL"  # the registered family that writes and reads this shape

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def vision_hidden_size(self) -> int:
        return self.hidden_size  # the merger projects into the text width


SYNTH_SHAPES: dict[str, SynthShape] = {
    # Unit-test size; every width a multiple of 256 so K-quants apply; 2 shards even at bf16.  The
    # tokenizer (1264 + 14 specials) leaves 2 embedding rows unused, as real Qwen checkpoints leave some.
    "tiny": SynthShape(
        name="tiny",
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1280,
        tie_word_embeddings=False,
        mrope_section=(8, 12, 12),
        max_position_embeddings=32768,
        vision_depth=2,
        vision_embed_dim=256,
        vision_num_heads=4,
        tokenizer_base=1264,
        max_shard_bytes=6 * 1024**2,
    ),
    # Qwen/Qwen2-VL-2B-Instruct
    "2b": SynthShape(
        name="2b",
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
        mrope_section=(16, 24, 24),
        max_position_embeddings=32768,
    ),
    # Qwen/Qwen2-VL-7B-Instruct
    "7b": SynthShape(
        name="7b",
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
        tie_word_embeddings=False,
        mrope_section=(16, 24, 24),
        max_position_embeddings=32768,
    ),
    # Qwen/QVQ-72B-Preview
    "72b": SynthShape(
        name="72b",
        hidden_size=8192,
        intermediate_size=29568,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        vocab_size=152064,
        tie_word_embeddings=False,
        mrope_section=(16, 24, 24),
        max_position_embeddings=128000,
    ),
}


# ------------------------------------------------------------------------------------------ synthetic files


def synth_text_config(s: SynthShape, ids: dict[str, int], torch_dtype: str) -> dict[str, Any]:
    """The flat text fields of a Qwen2-VL-style config.json (Qwen2.5-VL shares them)."""
    if sum(s.mrope_section) * 2 != s.head_dim:
        raise ValueError(f"mrope_section {s.mrope_section} does not cover head_dim {s.head_dim}")
    return {
        "attention_dropout": 0.0,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "vision_token_id": ids["<|vision_pad|>"],
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "hidden_act": "silu",
        "hidden_size": s.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": s.intermediate_size,
        "max_position_embeddings": s.max_position_embeddings,
        "max_window_layers": s.num_hidden_layers,
        "num_attention_heads": s.num_attention_heads,
        "num_hidden_layers": s.num_hidden_layers,
        "num_key_value_heads": s.num_key_value_heads,
        "rms_norm_eps": s.rms_norm_eps,
        "rope_theta": s.rope_theta,
        "sliding_window": 32768,
        "tie_word_embeddings": s.tie_word_embeddings,
        "torch_dtype": torch_dtype,
        "transformers_version": "4.47.0",
        "use_cache": True,
        "use_sliding_window": False,
        "rope_scaling": {"type": "mrope", "mrope_section": list(s.mrope_section)},
        "vocab_size": s.vocab_size,
    }


def synth_text_tensors(s: SynthShape) -> list[tuple[str, tuple[int, ...], str]]:
    """The text model's tensors (Qwen2 with biased q/k/v), then the vision tower's come after."""
    h, hd = s.hidden_size, s.head_dim
    q_out, kv_out, f = s.num_attention_heads * hd, s.num_key_value_heads * hd, s.intermediate_size
    out: list[tuple[str, tuple[int, ...], str]] = [("model.embed_tokens.weight", (s.vocab_size, h), "normal")]
    for i in range(s.num_hidden_layers):
        p = f"model.layers.{i}."
        out += [
            (p + "input_layernorm.weight", (h,), "norm_weight"),
            (p + "self_attn.q_proj.weight", (q_out, h), "normal"),
            (p + "self_attn.q_proj.bias", (q_out,), "normal"),
            (p + "self_attn.k_proj.weight", (kv_out, h), "normal"),
            (p + "self_attn.k_proj.bias", (kv_out,), "normal"),
            (p + "self_attn.v_proj.weight", (kv_out, h), "normal"),
            (p + "self_attn.v_proj.bias", (kv_out,), "normal"),
            (p + "self_attn.o_proj.weight", (h, q_out), "normal"),
            (p + "post_attention_layernorm.weight", (h,), "norm_weight"),
            (p + "mlp.gate_proj.weight", (f, h), "normal"),
            (p + "mlp.up_proj.weight", (f, h), "normal"),
            (p + "mlp.down_proj.weight", (h, f), "normal"),
        ]
    out.append(("model.norm.weight", (h,), "norm_weight"))
    if not s.tie_word_embeddings:
        out.append(("lm_head.weight", (s.vocab_size, h), "normal"))
    return out


def synth_vision_tensors(s: SynthShape) -> list[tuple[str, tuple[int, ...], str]]:
    """Qwen2-VL's ViT: LayerNorms with bias, quick-GELU fc1/fc2, the LayerNorm + 2-layer merger."""
    e, mlp = s.vision_embed_dim, s.vision_embed_dim * s.vision_mlp_ratio
    merged = e * s.spatial_merge_size**2
    out: list[tuple[str, tuple[int, ...], str]] = [
        (
            "visual.patch_embed.proj.weight",
            (e, 3, s.temporal_patch_size, s.patch_size, s.patch_size),
            "normal",
        )
    ]
    for j in range(s.vision_depth):
        p = f"visual.blocks.{j}."
        out += [
            (p + "norm1.weight", (e,), "norm_weight"),
            (p + "norm1.bias", (e,), "normal"),
            (p + "attn.qkv.weight", (3 * e, e), "normal"),
            (p + "attn.qkv.bias", (3 * e,), "normal"),
            (p + "attn.proj.weight", (e, e), "normal"),
            (p + "attn.proj.bias", (e,), "normal"),
            (p + "norm2.weight", (e,), "norm_weight"),
            (p + "norm2.bias", (e,), "normal"),
            (p + "mlp.fc1.weight", (mlp, e), "normal"),
            (p + "mlp.fc1.bias", (mlp,), "normal"),
            (p + "mlp.fc2.weight", (e, mlp), "normal"),
            (p + "mlp.fc2.bias", (e,), "normal"),
        ]
    out += [
        ("visual.merger.ln_q.weight", (e,), "norm_weight"),
        ("visual.merger.ln_q.bias", (e,), "normal"),
        ("visual.merger.mlp.0.weight", (merged, merged), "normal"),
        ("visual.merger.mlp.0.bias", (merged,), "normal"),
        ("visual.merger.mlp.2.weight", (s.vision_hidden_size, merged), "normal"),
        ("visual.merger.mlp.2.bias", (s.vision_hidden_size,), "normal"),
    ]
    return out


def synth_preprocessor_config(s: SynthShape, processor_class: str = "Qwen2VLProcessor") -> dict[str, Any]:
    """preprocessor_config.json: the slow Qwen2VLImageProcessor with CLIP statistics."""
    return {
        "min_pixels": PROCESSOR_MIN_PIXELS,
        "max_pixels": PROCESSOR_MAX_PIXELS,
        "patch_size": s.patch_size,
        "temporal_patch_size": s.temporal_patch_size,
        "merge_size": s.spatial_merge_size,
        "image_mean": list(IMAGE_MEAN),
        "image_std": list(IMAGE_STD),
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": processor_class,
    }


def mmproj_tensors(
    ckpt: Any, block_map: dict[str, str], merger_map: dict[str, str]
) -> list[tuple[str, str, Any]]:
    """The mmproj tensor list (see :meth:`Family.mmproj_tensors`) for a Qwen-VL tower with these maps."""
    out: list[tuple[str, str, Any]] = [
        (gname, MMPROJ_PATCH_SOURCE, ("frame", t)) for t, gname in enumerate(MMPROJ_PATCH_NAMES)
    ]
    for i in range(ckpt.vision.depth):
        pre, gpre = f"visual.blocks.{i}.", f"v.blk.{i}."
        for part in ("weight", "bias"):
            for k, letter in enumerate("qkv"):
                out.append((f"{gpre}attn_{letter}.{part}", f"{pre}attn.qkv.{part}", ("rows", k, 3)))
        out += [(gpre + g, pre + src, None) for src, g in block_map.items()]
    out += [(g, src, None) for src, g in merger_map.items()]
    return out


def check_mmproj_common(ckpt: Any, projector: str) -> None:
    """What llama.cpp's Qwen-VL projectors all need: two time frames, RGB."""
    v = ckpt.vision
    if v.temporal_patch_size != TEMPORAL_PATCH_SIZE:
        raise ModelError(
            f"vision temporal_patch_size is {v.temporal_patch_size}; llama.cpp's "
            f"{projector} supports only {TEMPORAL_PATCH_SIZE}",
            path=ckpt.folder / "config.json",
        )
    if v.in_channels != 3:
        raise ModelError(
            f"vision in_chans is {v.in_channels}; only RGB (3) is supported", path=ckpt.folder / "config.json"
        )


# ------------------------------------------------------------------------------------------ the family


class Qwen2VLFamily(Family):
    """Qwen2-VL and QVQ-72B-Preview: the module's facts behind the :class:`Family` interface."""

    name: ClassVar[str] = "Qwen2-VL"
    models: ClassVar[str] = "QVQ / Qwen2-VL"
    hf_architectures: ClassVar[tuple[str, ...]] = ("Qwen2VLForConditionalGeneration",)
    hf_model_types: ClassVar[tuple[str, ...]] = ("qwen2_vl",)
    #: mlx-vlm runs this family's vision tower on its own (``cached_image_features``), so the MLX session
    #: can encode images apart from the prompt.
    mlx_split_vision: ClassVar[bool] = True

    special_tokens = SPECIAL_TOKENS
    base_vocab = BASE_VOCAB
    image_block = IMAGE_BLOCK
    image_pad = IMAGE_PAD
    system_prompt = SYSTEM_PROMPT
    sampling = SAMPLING
    answer_markers = ANSWER_MARKERS
    patch_size = PATCH_SIZE
    merge_size = MERGE_SIZE
    image_factor = IMAGE_FACTOR
    processor_min_pixels = PROCESSOR_MIN_PIXELS
    processor_max_pixels = PROCESSOR_MAX_PIXELS
    #: The image-token bounds (after the merge) llama.cpp's mtmd sets for this projector.
    llama_image_tokens = (8, 4096)
    synth_shapes = SYNTH_SHAPES
    width_tensor_suffixes = WIDTH_TENSOR_SUFFIXES
    merger_out_suffix = MERGER_OUT_SUFFIX
    embedding_suffix = EMBEDDING_SUFFIX
    mmproj_out_tensor = MMPROJ_OUT_TENSOR

    aliases = ("qwen2-vl", "qwen2vl", "qvq")
    hf_processor_class = "Qwen2VLProcessor"
    #: ``clip.vision.image_size`` llama.cpp's converter writes (mtmd's warm-up only).
    mmproj_image_size = MMPROJ_IMAGE_SIZE
    gguf_text_name = staticmethod(gguf_text_name)
    gguf_text_order = staticmethod(gguf_text_order)

    def synth_config(self, shape: SynthShape, ids: dict[str, int], torch_dtype: str) -> dict[str, Any]:
        """Flat text fields, nested vision_config (no model_type there: mlx-vlm rejects it)."""
        cfg = {"architectures": [self.hf_architectures[0]], **synth_text_config(shape, ids, torch_dtype)}
        cfg["model_type"] = self.hf_model_types[0]
        cfg["vision_config"] = {
            "depth": shape.vision_depth,
            "embed_dim": shape.vision_embed_dim,
            "mlp_ratio": shape.vision_mlp_ratio,
            "num_heads": shape.vision_num_heads,
            "in_chans": 3,
            "hidden_size": shape.vision_hidden_size,
            "patch_size": shape.patch_size,
            "spatial_merge_size": shape.spatial_merge_size,
            "spatial_patch_size": shape.patch_size,
            "temporal_patch_size": shape.temporal_patch_size,
        }
        return cfg

    def synth_tensors(self, shape: SynthShape) -> list[tuple[str, tuple[int, ...], str]]:
        return synth_text_tensors(shape) + synth_vision_tensors(shape)

    def synth_preprocessor_config(self, shape: SynthShape) -> dict[str, Any]:
        return synth_preprocessor_config(shape, self.hf_processor_class)

    def check_mmproj_supported(self, ckpt: Any) -> None:
        check_mmproj_common(ckpt, self.gguf_projector)
        if ckpt.vision.hidden_act not in ("quick_gelu",):
            raise ModelError(
                f"vision hidden_act {ckpt.vision.hidden_act!r} is not supported (Qwen2-VL uses quick_gelu)",
                path=ckpt.folder / "config.json",
            )

    def mmproj_tensors(self, ckpt: Any) -> list[tuple[str, str, Any]]:
        return mmproj_tensors(ckpt, MMPROJ_BLOCK_MAP, MMPROJ_MERGER_MAP)

    def mmproj_family_keys(self, writer: Any, ckpt: Any) -> None:
        """Nothing more: clip's default activation is quick-GELU, which Qwen2-VL's ViT uses."""

    TextDims = TextDims
    VisionDims = VisionDims
    dims_from_config = staticmethod(dims_from_config)
    merger_width = staticmethod(merger_width)
    expected_shapes = staticmethod(expected_shapes)
    normalise_name = staticmethod(normalise_name)
    is_vision_tensor = staticmethod(is_vision_tensor)
    smart_resize = staticmethod(smart_resize)
    image_tokens = staticmethod(image_tokens)

    @property
    def gguf_text_arch(self) -> str:
        from gguf import MODEL_ARCH, MODEL_ARCH_NAMES

        return MODEL_ARCH_NAMES[MODEL_ARCH.QWEN2VL]

    @property
    def gguf_projector(self) -> str:
        from gguf import VisionProjectorType

        return VisionProjectorType.QWEN2VL


FAMILY = Qwen2VLFamily()
