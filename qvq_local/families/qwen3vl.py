"""The Qwen3-VL family: Qwen3-VL-2B/4B/8B/32B, Instruct and Thinking (the dense models).

Everything qvq-local knows that is particular to Qwen3-VL is written here once:

* Hugging Face ``config.json`` (``Qwen3VLForConditionalGeneration`` / ``qwen3_vl``): nested ``text_config``
  and ``vision_config`` (transformers 4.57's layout, which the published checkpoints use), parsed into
  :class:`TextDims` and :class:`VisionDims`;
* the checkpoint's tensors, by their published names (``model.language_model.*``, ``model.visual.*``,
  ``lm_head``): q/k RMSNorm in text attention, no attention biases, an explicit ``head_dim`` (4B: 32 heads
  of 128 in a 2560-wide model), tied embeddings on 2B/4B; a ViT with 16-pixel patches (the Conv3d has a
  bias), a learned position table (``pos_embed``, interpolated to the image grid), LayerNorm blocks with a
  fused ``attn.qkv`` and a two-layer GELU MLP, the merger (``merger.norm/linear_fc1/linear_fc2``) and one
  DeepStack merger per ``deepstack_visual_indexes`` entry (``deepstack_merger_list.N``, LayerNorm after
  the 2x2 shuffle), whose outputs are added to the first text layers' hidden states at image positions;
* the GGUF pair llama.cpp runs: text architecture ``qwen3vl`` (interleaved M-RoPE, ``n_deepstack_layers``)
  and projector ``qwen3vl_merger`` (the mmproj emits the merger output and the DeepStack features
  concatenated, ``clip.vision.is_deepstack_layers`` marks their ViT layers); llama.cpp's own converter
  (``conversion/qwen3vl.py`` in the llama-cpp-python 0.3.36 sdist) is the reference for keys and names;
* the image grid: 16-pixel patches merged 2x2, so sides are multiples of 32;
* the chat templates (the Thinking one opens ``<think>`` in the assistant turn, so only ``</think>`` ends
  the thought and budget forcing closes it), Qwen3's special tokens (``<think>`` = 151667,
  ``</think>`` = 151668) and the synthetic shapes, with the published sizes' numbers.

Heavy libraries (numpy, gguf, tokenizers) are imported inside the functions that need them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from qvq_local.errors import InputError, ModelError
from qvq_local.families import qwen2vl
from qvq_local.families.base import Family, check_vision_widths, need_number

# ------------------------------------------------------------------------------------------ tokens

#: Qwen3's added tokens after Qwen2-VL's 14, in id order (151657..151668).  The tool, FIM and think
#: tokens are not "special" in the published tokenizer_config.json (they are decoded as text).
EXTRA_TOKENS: tuple[str, ...] = (
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
)
SPECIAL_TOKENS: tuple[str, ...] = qwen2vl.SPECIAL_TOKENS + EXTRA_TOKENS
#: Tokens marked ``"special": true`` in the published tokenizer_config.json (Qwen2-VL's 14).
_MARKED_SPECIAL = frozenset(qwen2vl.SPECIAL_TOKENS)
BASE_VOCAB = qwen2vl.BASE_VOCAB
IMAGE_BLOCK = qwen2vl.IMAGE_BLOCK
IMAGE_PAD = qwen2vl.IMAGE_PAD

# ------------------------------------------------------------------------------------------ prompt defaults

#: Qwen3-VL's templates add no system turn of their own: no default system prompt.
SYSTEM_PROMPT = ""
#: The fallback for a model that ships no sampling values: the Thinking models' published
#: generation_config.json (the Instruct ones publish temperature 0.7, top_p 0.8, top_k 20).
SAMPLING: dict[str, float | int] = {"temperature": 1.0, "top_p": 0.95, "top_k": 20, "repetition_penalty": 1.0}
#: The thought ends at ``</think>`` (the Thinking template opens ``<think>``).
ANSWER_MARKERS: dict[str, tuple[str, ...]] = {"en": ("</think>",), "zh": ("</think>",)}

_USER_CONTENT = (
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
)


def chat_template(thinking: bool) -> str:
    """The chat template of Qwen3-VL-*-Instruct (``thinking=False``) or -Thinking, without tool calls.

    Both render system/user turns as ChatML with one vision block per image; neither adds a default
    system turn.  The Thinking one opens ``<think>\\n`` after ``<|im_start|>assistant\\n`` and keeps only
    the text after ``</think>`` of earlier assistant turns, as the published template does.
    """
    assistant = (
        "{% set content = message['content'] if message['content'] is string else '' %}"
        "{% if '</think>' in content %}{% set content = content.split('</think>')[-1].lstrip('\\n') %}"
        "{% endif %}{{ content }}"
        if thinking
        else _USER_CONTENT
    )
    opening = "<|im_start|>assistant\n<think>\n" if thinking else "<|im_start|>assistant\n"
    return (
        "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
        "{% if message['role'] == 'assistant' %}" + assistant + "{% else %}" + _USER_CONTENT + "{% endif %}"
        "<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}" + opening + "{% endif %}"
    )


# ------------------------------------------------------------------------------------------ images

PATCH_SIZE = 16
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
IMAGE_FACTOR = PATCH_SIZE * MERGE_SIZE
#: The published preprocessor_config.json: ``size.shortest_edge`` / ``size.longest_edge`` are pixel counts.
PROCESSOR_MIN_PIXELS = 65536
PROCESSOR_MAX_PIXELS = 16777216
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)


def smart_resize(width: int, height: int, *, min_pixels=None, max_pixels=None, factor: int = IMAGE_FACTOR):
    """Qwen2-VL's resize rule with Qwen3-VL's 32-pixel factor (one rule: :func:`qwen2vl.smart_resize`)."""
    return qwen2vl.smart_resize(width, height, min_pixels=min_pixels, max_pixels=max_pixels, factor=factor)


def image_tokens(width: int, height: int, factor: int = IMAGE_FACTOR) -> int:
    return (width // factor) * (height // factor)


# ------------------------------------------------------------------------------------------ dimensions


@dataclass(frozen=True)
class TextDims:
    """The language model's shape (``text_config``), with the field names the converter reads."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    mrope_section: tuple[int, ...]
    max_position_embeddings: int
    tie_word_embeddings: bool
    mrope_interleaved: bool = True


@dataclass(frozen=True)
class VisionDims:
    """The ViT, its merger and the DeepStack mergers (``vision_config``)."""

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
    num_position_embeddings: int
    deepstack_visual_indexes: tuple[int, ...]
    layer_norm_eps: float = 1e-6

    @property
    def merged_dim(self) -> int:
        return self.embed_dim * self.spatial_merge_size**2


def merger_width(config: dict[str, Any]) -> Any:
    """The merger's output width: ``vision_config.out_hidden_size``."""
    vision = config.get("vision_config")
    return vision.get("out_hidden_size") if isinstance(vision, dict) else None


def dims_from_config(config: dict[str, Any], path: Path) -> tuple[TextDims, VisionDims]:
    """Read the text and vision shapes; a ModelError naming ``path`` for anything missing or inconsistent."""
    tc = {**config, **(config.get("text_config") or {})}
    hidden = need_number(tc, "hidden_size", path)
    heads = need_number(tc, "num_attention_heads", path)
    kv_heads = int(tc.get("num_key_value_heads") or heads)
    if heads % kv_heads:
        raise ModelError(f"num_attention_heads {heads} is not a multiple of kv heads {kv_heads}", path=path)
    head_dim = int(tc.get("head_dim") or hidden // heads)
    rope = tc.get("rope_scaling") or tc.get("rope_parameters") or {}
    section = tuple(int(x) for x in (rope.get("mrope_section") or ()))
    if not section:
        raise ModelError("no rope_scaling.mrope_section (Qwen3-VL uses interleaved M-RoPE)", path=path)
    if sum(section) * 2 != head_dim or len(section) > 4:
        raise ModelError(f"mrope_section {list(section)} must sum to head_dim/2 = {head_dim // 2}", path=path)
    text = TextDims(
        hidden_size=hidden,
        num_layers=need_number(tc, "num_hidden_layers", path),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=need_number(tc, "intermediate_size", path),
        vocab_size=need_number(tc, "vocab_size", path),
        rms_norm_eps=float(tc.get("rms_norm_eps") or 1e-6),
        rope_theta=float(tc.get("rope_theta") or rope.get("rope_theta") or 5_000_000.0),
        mrope_section=section,
        max_position_embeddings=int(tc.get("max_position_embeddings") or 262144),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", tc.get("tie_word_embeddings", False))),
        mrope_interleaved=bool(rope.get("mrope_interleaved", True)),
    )
    vc = config.get("vision_config")
    if not isinstance(vc, dict):
        raise ModelError("no vision_config", path=path)
    vpath = Path(f"{path} (vision_config)")
    embed = need_number(vc, "hidden_size", vpath)
    depth = need_number(vc, "depth", vpath)
    indexes = vc.get("deepstack_visual_indexes", [])
    if not isinstance(indexes, list) or not all(isinstance(i, int) and 0 <= i < depth for i in indexes):
        raise ModelError(
            f"deepstack_visual_indexes {indexes!r} must be ViT layer numbers below depth {depth}", path=vpath
        )
    if len(indexes) > text.num_layers:
        raise ModelError(
            f"{len(indexes)} DeepStack layers but only {text.num_layers} text layers to add them to",
            path=path,
        )
    num_pos = need_number(vc, "num_position_embeddings", vpath)
    if math.isqrt(num_pos) ** 2 != num_pos:
        raise ModelError(f"num_position_embeddings {num_pos} is not a square grid", path=vpath)
    vision = VisionDims(
        embed_dim=embed,
        depth=depth,
        num_heads=need_number(vc, "num_heads", vpath),
        mlp_dim=need_number(vc, "intermediate_size", vpath),
        patch_size=int(vc.get("patch_size", PATCH_SIZE)),
        temporal_patch_size=int(vc.get("temporal_patch_size", TEMPORAL_PATCH_SIZE)),
        in_channels=int(vc.get("in_channels", 3)),
        spatial_merge_size=int(vc.get("spatial_merge_size", MERGE_SIZE)),
        out_hidden_size=need_number(vc, "out_hidden_size", vpath),
        hidden_act=str(vc.get("hidden_act", "gelu_pytorch_tanh")),
        num_position_embeddings=num_pos,
        deepstack_visual_indexes=tuple(indexes),
    )
    check_vision_widths(
        merger_key="out_hidden_size",
        merger_out=vision.out_hidden_size,
        text_hidden=hidden,
        embed_key="hidden_size",
        embed=embed,
        heads=vision.num_heads,
        path=path,
        heads_path=vpath,
    )
    return text, vision


# ------------------------------------------------------------------------------------------ tensors

TEXT_PREFIX = "model.language_model."
VISION_PREFIX = "model.visual."
MERGER_OUT_SUFFIX = "merger.linear_fc2.weight"
EMBEDDING_SUFFIX = "embed_tokens.weight"
WIDTH_TENSOR_SUFFIXES = (MERGER_OUT_SUFFIX, "merger.linear_fc2.bias", EMBEDDING_SUFFIX)


def normalise_name(name: str) -> str:
    """Qwen3-VL was published in transformers 4.57's naming, which transformers 5 keeps: no renaming."""
    return name


def is_vision_tensor(name: str) -> bool:
    return name.startswith(VISION_PREFIX)


def _text_layer(h: int, q: int, kv: int, f: int, hd: int) -> dict[str, tuple[int, ...]]:
    return {
        "input_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (q, h),
        "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h),
        "self_attn.o_proj.weight": (h, q),
        "self_attn.q_norm.weight": (hd,),
        "self_attn.k_norm.weight": (hd,),
        "post_attention_layernorm.weight": (h,),
        "mlp.gate_proj.weight": (f, h),
        "mlp.up_proj.weight": (f, h),
        "mlp.down_proj.weight": (h, f),
    }


def _merger(prefix: str, norm_dim: int, md: int, out: int) -> dict[str, tuple[int, ...]]:
    return {
        prefix + "norm.weight": (norm_dim,),
        prefix + "norm.bias": (norm_dim,),
        prefix + "linear_fc1.weight": (md, md),
        prefix + "linear_fc1.bias": (md,),
        prefix + "linear_fc2.weight": (out, md),
        prefix + "linear_fc2.bias": (out,),
    }


def expected_shapes(text: TextDims, vision: VisionDims) -> dict[str, tuple[int, ...]]:
    """Every tensor a Qwen3-VL checkpoint with these dims holds (published names), with its shape, in the
    order the synthetic writer writes them."""
    h, hd = text.hidden_size, text.head_dim
    q, kv = text.num_heads * hd, text.num_kv_heads * hd
    shapes: dict[str, tuple[int, ...]] = {TEXT_PREFIX + "embed_tokens.weight": (text.vocab_size, h)}
    layer = _text_layer(h, q, kv, text.intermediate_size, hd)
    for i in range(text.num_layers):
        shapes.update({f"{TEXT_PREFIX}layers.{i}.{k}": v for k, v in layer.items()})
    shapes[TEXT_PREFIX + "norm.weight"] = (h,)
    if not text.tie_word_embeddings:
        shapes["lm_head.weight"] = (text.vocab_size, h)
    e, m, md, out = vision.embed_dim, vision.mlp_dim, vision.merged_dim, vision.out_hidden_size
    p, v = vision.patch_size, VISION_PREFIX
    shapes[v + "patch_embed.proj.weight"] = (e, vision.in_channels, vision.temporal_patch_size, p, p)
    shapes[v + "patch_embed.proj.bias"] = (e,)
    shapes[v + "pos_embed.weight"] = (vision.num_position_embeddings, e)
    for i in range(vision.depth):
        b = f"{v}blocks.{i}."
        shapes.update(
            {
                b + "norm1.weight": (e,),
                b + "norm1.bias": (e,),
                b + "attn.qkv.weight": (3 * e, e),
                b + "attn.qkv.bias": (3 * e,),
                b + "attn.proj.weight": (e, e),
                b + "attn.proj.bias": (e,),
                b + "norm2.weight": (e,),
                b + "norm2.bias": (e,),
                b + "mlp.linear_fc1.weight": (m, e),
                b + "mlp.linear_fc1.bias": (m,),
                b + "mlp.linear_fc2.weight": (e, m),
                b + "mlp.linear_fc2.bias": (e,),
            }
        )
    shapes.update(_merger(v + "merger.", e, md, out))
    for k in range(len(vision.deepstack_visual_indexes)):
        shapes.update(_merger(f"{v}deepstack_merger_list.{k}.", md, md, out))
    return shapes


# ------------------------------------------------------------------------------------------ GGUF maps

#: Text layer tensor suffix -> GGUF name (llama.cpp's qwen3vl: Qwen3 with interleaved M-RoPE).
GGUF_TEXT_LAYER_MAP = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
GGUF_TEXT_GLOBAL_MAP = {
    TEXT_PREFIX + "embed_tokens.weight": "token_embd.weight",
    TEXT_PREFIX + "norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
#: ViT block suffix -> mmproj name; ``attn.qkv`` stays fused (clip's qwen3vl graph reads ``attn_qkv``).
MMPROJ_BLOCK_MAP = {
    "norm1.weight": "ln1.weight",
    "norm1.bias": "ln1.bias",
    "attn.qkv.weight": "attn_qkv.weight",
    "attn.qkv.bias": "attn_qkv.bias",
    "attn.proj.weight": "attn_out.weight",
    "attn.proj.bias": "attn_out.bias",
    "norm2.weight": "ln2.weight",
    "norm2.bias": "ln2.bias",
    "mlp.linear_fc1.weight": "ffn_up.weight",
    "mlp.linear_fc1.bias": "ffn_up.bias",
    "mlp.linear_fc2.weight": "ffn_down.weight",
    "mlp.linear_fc2.bias": "ffn_down.bias",
}
MMPROJ_MERGER_MAP = {
    "norm.weight": "v.post_ln.weight",
    "norm.bias": "v.post_ln.bias",
    "linear_fc1.weight": "mm.0.weight",
    "linear_fc1.bias": "mm.0.bias",
    "linear_fc2.weight": "mm.2.weight",
    "linear_fc2.bias": "mm.2.bias",
}
#: DeepStack merger suffix -> mmproj name; ``{}`` is the ViT layer the merger reads (not its list index).
MMPROJ_DEEPSTACK_MAP = {
    "norm.weight": "v.deepstack.{}.norm.weight",
    "norm.bias": "v.deepstack.{}.norm.bias",
    "linear_fc1.weight": "v.deepstack.{}.fc1.weight",
    "linear_fc1.bias": "v.deepstack.{}.fc1.bias",
    "linear_fc2.weight": "v.deepstack.{}.fc2.weight",
    "linear_fc2.bias": "v.deepstack.{}.fc2.bias",
}
MMPROJ_OUT_TENSOR = "mm.2"


def gguf_text_names(text: TextDims, has_lm_head: bool) -> list[tuple[str, str]]:
    """``(checkpoint name, GGUF name)`` of every text tensor, in the order the GGUF stores them."""
    pairs = [(TEXT_PREFIX + "embed_tokens.weight", "token_embd.weight")]
    for i in range(text.num_layers):
        pairs += [(f"{TEXT_PREFIX}layers.{i}.{k}", f"blk.{i}.{g}") for k, g in GGUF_TEXT_LAYER_MAP.items()]
    pairs.append((TEXT_PREFIX + "norm.weight", "output_norm.weight"))
    if has_lm_head:
        pairs.append(("lm_head.weight", "output.weight"))
    return pairs


def mmproj_names(vision: VisionDims) -> list[tuple[str, str]]:
    """``(checkpoint name, mmproj name)`` of every vision tensor but the Conv3d kernel (split in time)."""
    v = VISION_PREFIX
    pairs = [
        (v + "patch_embed.proj.bias", "v.patch_embd.bias"),
        (v + "pos_embed.weight", "v.position_embd.weight"),
    ]
    for i in range(vision.depth):
        pairs += [(f"{v}blocks.{i}.{k}", f"v.blk.{i}.{g}") for k, g in MMPROJ_BLOCK_MAP.items()]
    pairs += [(f"{v}merger.{k}", g) for k, g in MMPROJ_MERGER_MAP.items()]
    for k, layer in enumerate(vision.deepstack_visual_indexes):
        pairs += [
            (f"{v}deepstack_merger_list.{k}.{s}", g.format(layer)) for s, g in MMPROJ_DEEPSTACK_MAP.items()
        ]
    return pairs


def check_mmproj_supported(ckpt: Any) -> None:
    """Raise ModelError for vision shapes the bundled llama.cpp's ``qwen3vl_merger`` cannot run."""
    v, path = ckpt.vision, ckpt.folder / "config.json"
    if v.temporal_patch_size != TEMPORAL_PATCH_SIZE:
        raise ModelError(
            f"vision temporal_patch_size is {v.temporal_patch_size}; llama.cpp's qwen3vl_merger supports "
            f"only {TEMPORAL_PATCH_SIZE}",
            path=path,
        )
    if v.spatial_merge_size != MERGE_SIZE:
        raise ModelError(
            f"vision spatial_merge_size is {v.spatial_merge_size}; llama.cpp's qwen3vl_merger merges 2x2 only",
            path=path,
        )
    if v.in_channels != 3:
        raise ModelError(f"vision in_channels is {v.in_channels}; only RGB (3) is supported", path=path)
    if v.hidden_act not in ("gelu_pytorch_tanh", "gelu"):
        raise ModelError(
            f"vision hidden_act {v.hidden_act!r} is not supported (Qwen3-VL uses gelu)", path=path
        )


def gguf_text_plan(ckpt: Any, weight_type: str) -> list[Any]:
    """The text tensors in GGUF order (``weight_type`` as in ``gguf_text.text_tensor_plan``)."""
    from qvq_local.convert.gguf_stream import PlannedTensor, iter_encoded

    plan = []
    for src, gname in gguf_text_names(ckpt.text, has_lm_head="lm_head.weight" in ckpt):
        shape = ckpt.shape(src)
        if len(shape) == 1:
            qtype = "F32"
        elif weight_type == "source":
            qtype = {"BF16": "BF16", "F16": "F16", "F32": "F32"}[ckpt.dtype(src)]
        else:
            qtype = weight_type
        plan.append(PlannedTensor(gname, shape, qtype, lambda s=src, q=qtype: iter_encoded(ckpt, s, q)))
    return plan


def gguf_text_metadata(ckpt: Any, vocab: Any, file_type: int, name: str) -> Callable[[Any], None]:
    """The generic text key/values plus Qwen3-VL's: head size (not hidden/heads on 4B) and DeepStack count."""
    from qvq_local.convert.gguf_text import text_metadata

    common = text_metadata(ckpt, vocab, file_type, name)

    def add(w: Any) -> None:
        from gguf import Keys

        common(w)
        w.add_key_length(ckpt.text.head_dim)
        w.add_value_length(ckpt.text.head_dim)
        w.add_uint32(
            Keys.LLM.NUM_DEEPSTACK_LAYERS.format(arch=FAMILY.gguf_text_arch),
            len(ckpt.vision.deepstack_visual_indexes),
        )

    return add


def mmproj_plan(ckpt: Any, weight_type: str) -> list[Any]:
    """The mmproj tensors: the Conv3d kernel split in time, the rest renamed (fused qkv kept)."""
    from qvq_local.convert.gguf_stream import PlannedTensor, iter_encoded

    conv_type = "F16" if weight_type == "F16" else "F32"
    src = VISION_PREFIX + "patch_embed.proj.weight"
    e, c, _, p, _ = ckpt.shape(src)
    plan = [
        PlannedTensor(
            gname,
            (e, c, p, p),
            conv_type,
            lambda t=t: iter_encoded(ckpt, src, conv_type, 0, None, lambda block, t=t: block[:, :, t]),
        )
        for t, gname in enumerate(qwen2vl.MMPROJ_PATCH_NAMES)
    ]
    for name, gname in mmproj_names(ckpt.vision):
        shape = ckpt.shape(name)
        if len(shape) == 1 or name.endswith("pos_embed.weight"):
            qtype = "F32"  # clip interpolates the position table with ggml_interpolate: F32 only
        elif weight_type == "Q8_0" and shape[-1] % 32:
            qtype = "F16"
        else:
            qtype = weight_type
        plan.append(PlannedTensor(gname, shape, qtype, lambda s=name, q=qtype: iter_encoded(ckpt, s, q)))
    return plan


def mmproj_metadata(ckpt: Any, file_type: int, name: str) -> Callable[[Any], None]:
    """The mmproj key/values, as llama.cpp's converter writes them for Qwen3-VL."""
    from qvq_local.convert.gguf_mmproj import image_norm

    mean, std = image_norm(ckpt)

    def add(w: Any) -> None:
        v = ckpt.vision
        w.add_type("mmproj")
        w.add_name(name)
        w.add_file_type(file_type)
        w.add_clip_has_vision_encoder(True)
        w.add_clip_projector_type(FAMILY.gguf_projector)
        w.add_vision_projection_dim(ckpt.text.hidden_size)
        w.add_vision_image_size(math.isqrt(v.num_position_embeddings) * v.patch_size)
        w.add_vision_patch_size(v.patch_size)
        w.add_vision_embedding_length(v.embed_dim)
        w.add_vision_feed_forward_length(v.mlp_dim)
        w.add_vision_block_count(v.depth)
        w.add_vision_head_count(v.num_heads)
        w.add_vision_image_mean(mean)
        w.add_vision_image_std(std)
        w.add_vision_use_gelu(True)
        w.add_vision_spatial_merge_size(v.spatial_merge_size)
        # llama.cpp's converter uses the text model's RMS epsilon for the ViT's LayerNorms (both 1e-6)
        w.add_vision_attention_layernorm_eps(ckpt.text.rms_norm_eps)
        w.add_vision_is_deepstack_layers([i in v.deepstack_visual_indexes for i in range(v.depth)])

    return add


# ------------------------------------------------------------------------------------------ synthetic shapes


@dataclass(frozen=True)
class SynthShape:
    """One synthetic Qwen3-VL model: the fields its config.json carries."""

    name: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    vision_depth: int
    vision_hidden_size: int
    vision_intermediate_size: int
    deepstack_visual_indexes: tuple[int, ...]
    vision_num_heads: int = 16
    num_position_embeddings: int = 2304
    mrope_section: tuple[int, int, int] = (24, 20, 20)
    max_position_embeddings: int = 262144
    rope_theta: float = 5_000_000.0
    rms_norm_eps: float = 1e-6
    tokenizer_base: int = BASE_VOCAB
    max_shard_bytes: int = 4_000_000_000
    family: str = "Qwen3-VL"  # the registered family that writes and reads this shape


SYNTH_SHAPES: dict[str, SynthShape] = {
    # Unit-test size.  8 heads of 64 in a 256-wide model (like 4B: the head size is not hidden/heads),
    # tied embeddings (like 2B/4B), 4 ViT layers of which 2 feed DeepStack into the first 2 of 3 text
    # layers, and a 12x12 position table, so a 20x14-patch image exercises its interpolation.
    "tiny": SynthShape(
        name="tiny",
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=3,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=64,
        vocab_size=1296,
        tie_word_embeddings=True,
        vision_depth=4,
        vision_hidden_size=256,
        vision_intermediate_size=512,
        deepstack_visual_indexes=(1, 2),
        vision_num_heads=4,
        num_position_embeddings=144,
        mrope_section=(12, 10, 10),
        tokenizer_base=1264,
        max_shard_bytes=6 * 1024**2,
    ),
    # The published config.json of Qwen/Qwen3-VL-2B-{Instruct,Thinking}
    "2b": SynthShape(
        name="2b",
        hidden_size=2048,
        intermediate_size=6144,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=151936,
        tie_word_embeddings=True,
        vision_depth=24,
        vision_hidden_size=1024,
        vision_intermediate_size=4096,
        deepstack_visual_indexes=(5, 11, 17),
    ),
    # Qwen/Qwen3-VL-4B-{Instruct,Thinking}
    "4b": SynthShape(
        name="4b",
        hidden_size=2560,
        intermediate_size=9728,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=151936,
        tie_word_embeddings=True,
        vision_depth=24,
        vision_hidden_size=1024,
        vision_intermediate_size=4096,
        deepstack_visual_indexes=(5, 11, 17),
    ),
    # Qwen/Qwen3-VL-8B-{Instruct,Thinking}
    "8b": SynthShape(
        name="8b",
        hidden_size=4096,
        intermediate_size=12288,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=151936,
        tie_word_embeddings=False,
        vision_depth=27,
        vision_hidden_size=1152,
        vision_intermediate_size=4304,
        deepstack_visual_indexes=(8, 16, 24),
    ),
    # Qwen/Qwen3-VL-32B-{Instruct,Thinking}
    "32b": SynthShape(
        name="32b",
        hidden_size=5120,
        intermediate_size=25600,
        num_hidden_layers=64,
        num_attention_heads=64,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=151936,
        tie_word_embeddings=False,
        vision_depth=27,
        vision_hidden_size=1152,
        vision_intermediate_size=4304,
        deepstack_visual_indexes=(8, 16, 24),
    ),
}

VARIANTS = ("thinking", "instruct")


def get_shape(shape: str | SynthShape) -> SynthShape:
    if isinstance(shape, SynthShape):
        return shape
    try:
        return SYNTH_SHAPES[shape]
    except KeyError:
        raise InputError(
            f"unknown Qwen3-VL shape {shape!r}; choose one of {', '.join(SYNTH_SHAPES)}"
        ) from None


def special_ids(base: int) -> dict[str, int]:
    return {t: base + k for k, t in enumerate(SPECIAL_TOKENS)}


def build_config(shape: str | SynthShape, dtype: str = "bfloat16") -> dict:
    """config.json in the published layout (transformers 4.57: nested text_config and vision_config)."""
    s = get_shape(shape)
    ids = special_ids(s.tokenizer_base)
    if sum(s.mrope_section) * 2 != s.head_dim:
        raise ValueError(f"mrope_section {s.mrope_section} does not cover head_dim {s.head_dim}")
    return {
        "architectures": [FAMILY.hf_architectures[0]],
        "image_token_id": ids[IMAGE_PAD],
        "model_type": FAMILY.hf_model_types[0],
        "text_config": {
            "attention_bias": False,
            "attention_dropout": 0.0,
            "bos_token_id": ids["<|endoftext|>"],
            "dtype": dtype,
            "eos_token_id": ids["<|im_end|>"],
            "head_dim": s.head_dim,
            "hidden_act": "silu",
            "hidden_size": s.hidden_size,
            "initializer_range": 0.02,
            "intermediate_size": s.intermediate_size,
            "max_position_embeddings": s.max_position_embeddings,
            "model_type": "qwen3_vl_text",
            "num_attention_heads": s.num_attention_heads,
            "num_hidden_layers": s.num_hidden_layers,
            "num_key_value_heads": s.num_key_value_heads,
            "rms_norm_eps": s.rms_norm_eps,
            "rope_scaling": {
                "mrope_interleaved": True,
                "mrope_section": list(s.mrope_section),
                "rope_type": "default",
            },
            "rope_theta": s.rope_theta,
            "tie_word_embeddings": s.tie_word_embeddings,
            "use_cache": True,
            "vocab_size": s.vocab_size,
        },
        "tie_word_embeddings": s.tie_word_embeddings,
        "transformers_version": "4.57.0.dev0",
        "video_token_id": ids["<|video_pad|>"],
        "vision_config": {
            "deepstack_visual_indexes": list(s.deepstack_visual_indexes),
            "depth": s.vision_depth,
            "hidden_act": "gelu_pytorch_tanh",
            "hidden_size": s.vision_hidden_size,
            "in_channels": 3,
            "initializer_range": 0.02,
            "intermediate_size": s.vision_intermediate_size,
            "model_type": "qwen3_vl",
            "num_heads": s.vision_num_heads,
            "num_position_embeddings": s.num_position_embeddings,
            "out_hidden_size": s.hidden_size,
            "patch_size": PATCH_SIZE,
            "spatial_merge_size": MERGE_SIZE,
            "temporal_patch_size": TEMPORAL_PATCH_SIZE,
        },
        "vision_end_token_id": ids["<|vision_end|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
    }


def build_preprocessor_config() -> dict:
    """preprocessor_config.json as published (pixel bounds under ``size``, mean/std 0.5)."""
    return {
        "size": {"longest_edge": PROCESSOR_MAX_PIXELS, "shortest_edge": PROCESSOR_MIN_PIXELS},
        "patch_size": PATCH_SIZE,
        "temporal_patch_size": TEMPORAL_PATCH_SIZE,
        "merge_size": MERGE_SIZE,
        "image_mean": list(IMAGE_MEAN),
        "image_std": list(IMAGE_STD),
        "processor_class": "Qwen3VLProcessor",
        "image_processor_type": "Qwen2VLImageProcessorFast",
    }


def build_tokenizer_json(base: int, kind: str = "trained") -> str:
    """tokenizer.json: the Qwen2 byte-level BPE of ``tokenizer_synth`` with Qwen3's 26 added tokens."""
    from tokenizers import AddedToken, Tokenizer

    from qvq_local.convert import tokenizer_synth

    data = json.loads(tokenizer_synth.build_tokenizer_json(base, kind))
    data["added_tokens"] = []
    tok = Tokenizer.from_str(json.dumps(data))
    tok.add_special_tokens(
        [AddedToken(t, special=t in _MARKED_SPECIAL, normalized=False) for t in SPECIAL_TOKENS]
    )
    for t, i in special_ids(base).items():
        if tok.token_to_id(t) != i:  # would break every id in config.json: fail loudly
            raise RuntimeError(f"added token {t} got id {tok.token_to_id(t)}, expected {i}")
    return tok.to_str(pretty=False)


def tokenizer_config(base: int, variant: str) -> dict:
    added = {
        str(i): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": t in _MARKED_SPECIAL,
        }
        for t, i in special_ids(base).items()
    }
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": list(qwen2vl.SPECIAL_TOKENS[1:]),
        "bos_token": None,
        "chat_template": chat_template(variant == "thinking"),
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 262144,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def tensor_specs(shape: str | SynthShape) -> list[Any]:
    """Every tensor of the synthetic checkpoint (published names), norms drawn around 1."""
    from qvq_local.convert.synthetic import TensorSpec

    s = get_shape(shape)
    text, vision = dims_from_config(build_config(s), Path("config.json"))
    return [
        TensorSpec(
            n, shp, "norm_weight" if n.endswith(("norm.weight", "norm1.weight", "norm2.weight")) else "normal"
        )
        for n, shp in expected_shapes(text, vision).items()
    ]


def synth_tokenizer_files(shape: str | SynthShape, kind: str, variant: str) -> dict[str, str]:
    """The tokenizer and template files of a synthetic Qwen3-VL-``variant`` checkpoint, name -> text."""
    from qvq_local.convert import tokenizer_synth

    s = get_shape(shape)

    def js(data: dict) -> str:
        return json.dumps(data, indent=2, ensure_ascii=False) + "\n"

    return {
        "tokenizer_config.json": js(tokenizer_config(s.tokenizer_base, variant)),
        "chat_template.json": js({"chat_template": chat_template(variant == "thinking")}),
        "tokenizer.json": build_tokenizer_json(s.tokenizer_base, kind),
        **tokenizer_synth.vocab_files(kind, s.tokenizer_base),
    }


def write_checkpoint(
    out: str | Path,
    shape: str | SynthShape = "tiny",
    variant: str = "thinking",
    dtype: str = "bf16",
    seed: int = 0,
    force: bool = False,
    tokenizer: str = "trained",
) -> Path:
    """Write a random-weight Qwen3-VL-``shape``-``variant`` checkpoint into ``out``; return its path
    (:func:`qvq_local.convert.synthetic.write_checkpoint`, with its guarantees, in this family's layout)."""
    from qvq_local.convert import synthetic

    return synthetic.write_checkpoint(
        out, get_shape(shape), dtype, seed, force=force, tokenizer=tokenizer, variant=variant
    )


# ------------------------------------------------------------------------------------------ the family


class Qwen3VLFamily(Family):
    """Qwen3-VL (dense), Instruct and Thinking."""

    name: ClassVar[str] = "Qwen3-VL"
    models: ClassVar[str] = "Qwen3-VL Instruct / Thinking"
    hf_architectures: ClassVar[tuple[str, ...]] = ("Qwen3VLForConditionalGeneration",)
    hf_model_types: ClassVar[tuple[str, ...]] = ("qwen3_vl",)
    #: The MLX session's split vision path drops DeepStack features: encode with the prompt instead.
    mlx_split_vision: ClassVar[bool] = False
    hf_processor_class: ClassVar[str] = "Qwen3VLProcessor"
    aliases: ClassVar[tuple[str, ...]] = ("qwen3-vl", "qwen3_vl", "qwen3vl")

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
    #: mtmd's bounds for qwen3vl_merger (clip.cpp: set_limit_image_tokens(8, 4096), as for Qwen2-VL).
    llama_image_tokens = (8, 4096)
    synth_shapes = SYNTH_SHAPES
    width_tensor_suffixes = WIDTH_TENSOR_SUFFIXES
    merger_out_suffix = MERGER_OUT_SUFFIX
    embedding_suffix = EMBEDDING_SUFFIX
    mmproj_out_tensor = MMPROJ_OUT_TENSOR

    TextDims = TextDims
    VisionDims = VisionDims
    dims_from_config = staticmethod(dims_from_config)
    merger_width = staticmethod(merger_width)
    expected_shapes = staticmethod(expected_shapes)
    normalise_name = staticmethod(normalise_name)
    is_vision_tensor = staticmethod(is_vision_tensor)
    smart_resize = staticmethod(smart_resize)
    image_tokens = staticmethod(image_tokens)
    # the GGUF converter's per-family parts
    check_mmproj_supported = staticmethod(check_mmproj_supported)
    gguf_text_plan = staticmethod(gguf_text_plan)
    gguf_text_metadata = staticmethod(gguf_text_metadata)
    mmproj_plan = staticmethod(mmproj_plan)
    mmproj_metadata = staticmethod(mmproj_metadata)

    # synthetic checkpoints (convert/synthetic.py writes them): ``qvq synth --family qwen3-vl`` gives the
    # Thinking variant, whose template opens ``<think>``
    synth_variants: ClassVar[tuple[str, ...]] = VARIANTS
    synth_transformers_version: ClassVar[str] = "4.57.0.dev0"
    synth_tokenizer_files = staticmethod(synth_tokenizer_files)

    def synth_config(self, shape: SynthShape, ids: dict[str, int], torch_dtype: str) -> dict[str, Any]:
        return build_config(shape, torch_dtype)

    def synth_preprocessor_config(self, shape: SynthShape) -> dict[str, Any]:
        return build_preprocessor_config()

    def synth_tensors(self, shape: SynthShape) -> list[tuple[str, tuple[int, ...], str]]:
        return [(t.name, tuple(t.shape), t.init) for t in tensor_specs(shape)]

    @property
    def gguf_text_arch(self) -> str:
        from gguf import MODEL_ARCH, MODEL_ARCH_NAMES

        return MODEL_ARCH_NAMES[MODEL_ARCH.QWEN3VL]

    @property
    def gguf_projector(self) -> str:
        from gguf import VisionProjectorType

        return VisionProjectorType.QWEN3VL


FAMILY = Qwen3VLFamily()
