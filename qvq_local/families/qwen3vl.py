"""The Qwen3-VL family: Qwen3-VL-2B/4B/8B/32B, Instruct and Thinking (the dense models).

Everything qvq-local knows that is particular to Qwen3-VL is a fact of :class:`Qwen3VLFamily`, declared
once:

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
  concatenated); how the pair is written is ``convert/gguf_qwen3vl.py``'s, after llama.cpp's own
  converter (``conversion/qwen3vl.py`` in the llama-cpp-python 0.3.36 sdist);
* the image grid: 16-pixel patches merged 2x2, so sides are multiples of 32;
* the chat templates (the Thinking one opens ``<think>`` in the assistant turn, so only ``</think>`` ends
  the thought and budget forcing closes it), Qwen3's special tokens (``<think>`` = 151667,
  ``</think>`` = 151668) and the published sizes, with their numbers (``convert/synth_qwen3vl.py``
  writes synthetic checkpoints in them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from qvq_local.errors import ModelError
from qvq_local.families.base import Family, check_vision_widths, need_number, qwen_smart_resize
from qvq_local.families.qwen2vl import Qwen2VLFamily

# ------------------------------------------------------------------------------------------ chat templates

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


# ------------------------------------------------------------------------------------------ the family


class Qwen3VLFamily(Family):
    """Qwen3-VL (dense), Instruct and Thinking."""

    name: ClassVar[str] = "Qwen3-VL"
    models: ClassVar[str] = "Qwen3-VL Instruct / Thinking"
    aliases: ClassVar[tuple[str, ...]] = ("qwen3-vl", "qwen3_vl", "qwen3vl")
    hf_architectures: ClassVar[tuple[str, ...]] = ("Qwen3VLForConditionalGeneration",)
    hf_model_types: ClassVar[tuple[str, ...]] = ("qwen3_vl",)
    hf_processor_class: ClassVar[str] = "Qwen3VLProcessor"
    #: The MLX session's split vision path drops DeepStack features: encode with the prompt instead.
    mlx_split_vision: ClassVar[bool] = False

    # ---- tokens: Qwen2-VL's 14 specials, then Qwen3's added tokens in id order (151657..151668).  The
    # tool, FIM and think tokens are not "special" in the published tokenizer_config.json (they are
    # decoded as text).
    special_tokens: ClassVar[tuple[str, ...]] = Qwen2VLFamily.special_tokens + (
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
    base_vocab: ClassVar[int] = Qwen2VLFamily.base_vocab
    image_block: ClassVar[str] = Qwen2VLFamily.image_block
    image_pad: ClassVar[str] = Qwen2VLFamily.image_pad

    # ---- prompt conventions
    #: Qwen3-VL's templates add no system turn of their own: no default system prompt.
    system_prompt: ClassVar[str] = ""
    #: The fallback for a model that ships no sampling values: the Thinking models' published
    #: generation_config.json (the Instruct ones publish temperature 0.7, top_p 0.8, top_k 20).
    sampling: ClassVar[dict[str, float | int]] = {
        "temperature": 1.0,
        "top_p": 0.95,
        "top_k": 20,
        "repetition_penalty": 1.0,
    }
    #: The thought ends at ``</think>`` (the Thinking template opens ``<think>``).
    answer_markers: ClassVar[dict[str, tuple[str, ...]]] = {"en": ("</think>",), "zh": ("</think>",)}
    #: A folder without a template is prompted like an Instruct model (no ``<think>`` opened for it).
    fallback_chat_template: ClassVar[str] = chat_template(thinking=False)

    # ---- image grid: a 16-pixel patch, merged 2x2 into one token
    patch_size: ClassVar[int] = 16
    merge_size: ClassVar[int] = 2
    temporal_patch_size: ClassVar[int] = 2
    #: The published preprocessor_config.json: ``size.shortest_edge`` / ``size.longest_edge`` are pixel
    #: counts; mean and std 0.5.
    processor_min_pixels: ClassVar[int] = 65536
    processor_max_pixels: ClassVar[int] = 16777216
    image_mean: ClassVar[tuple[float, float, float]] = (0.5, 0.5, 0.5)
    image_std: ClassVar[tuple[float, float, float]] = (0.5, 0.5, 0.5)
    #: mtmd's bounds for qwen3vl_merger (clip.cpp: set_limit_image_tokens(8, 4096), as for Qwen2-VL).
    llama_image_tokens: ClassVar[tuple[int, int]] = (8, 4096)

    # ---- video: Qwen3VLVideoProcessor's defaults (pixel bounds on the 32-pixel grid); each temporal patch
    # its own vision block with its time written before it (``<1.5 seconds>``, the mean of its two frames)
    video_block: ClassVar[str] = Qwen2VLFamily.video_block
    video_pad: ClassVar[str] = Qwen2VLFamily.video_pad
    video_time: ClassVar[str] = "text"
    video_min_pixels: ClassVar[int] = 128 * 32 * 32
    video_max_pixels: ClassVar[int] = 768 * 32 * 32

    # ---- tensors (the published naming, transformers 4.57's)
    text_prefix: ClassVar[str] = "model.language_model."
    vision_prefix: ClassVar[str] = "model.visual."
    merger_out_suffix: ClassVar[str] = "merger.linear_fc2.weight"
    embedding_suffix: ClassVar[str] = "embed_tokens.weight"
    width_tensor_suffixes: ClassVar[tuple[str, ...]] = (
        merger_out_suffix,
        "merger.linear_fc2.bias",
        embedding_suffix,
    )
    mmproj_out_tensor: ClassVar[str] = "mm.2"
    #: Below :class:`SynthShape`.
    synth_shapes: ClassVar[dict[str, Any]]

    # ---- GGUF identities
    gguf_tokenizer_pre: ClassVar[str] = Qwen2VLFamily.gguf_tokenizer_pre

    @property
    def gguf_text_arch(self) -> str:
        from gguf import MODEL_ARCH, MODEL_ARCH_NAMES

        return MODEL_ARCH_NAMES[MODEL_ARCH.QWEN3VL]

    @property
    def gguf_projector(self) -> str:
        from gguf import VisionProjectorType

        return VisionProjectorType.QWEN3VL

    # ---- config.json
    def merger_width(self, config: dict[str, Any]) -> Any:
        """The merger's output width: ``vision_config.out_hidden_size``."""
        vision = config.get("vision_config")
        return vision.get("out_hidden_size") if isinstance(vision, dict) else None

    def dims_from_config(self, config: dict[str, Any], path: Path) -> tuple[Any, VisionDims]:
        """Read the text and vision shapes; a ModelError naming ``path`` for anything missing or inconsistent."""
        text = self.text_dims(config, path)
        return text, self.vision_dims(config, path, text)

    def text_dims(self, config: dict[str, Any], path: Path) -> TextDims:
        """The language model's shape from ``text_config`` (a ModelError naming ``path`` if wrong)."""
        tc = {**config, **(config.get("text_config") or {})}
        hidden = need_number(tc, "hidden_size", path)
        heads = need_number(tc, "num_attention_heads", path)
        kv_heads = int(tc.get("num_key_value_heads") or heads)
        if heads % kv_heads:
            raise ModelError(
                f"num_attention_heads {heads} is not a multiple of kv heads {kv_heads}", path=path
            )
        head_dim = int(tc.get("head_dim") or hidden // heads)
        rope = tc.get("rope_scaling") or tc.get("rope_parameters") or {}
        section = tuple(int(x) for x in (rope.get("mrope_section") or ()))
        if not section:
            raise ModelError("no rope_scaling.mrope_section (Qwen3-VL uses interleaved M-RoPE)", path=path)
        if sum(section) * 2 != head_dim or len(section) > 4:
            raise ModelError(
                f"mrope_section {list(section)} must sum to head_dim/2 = {head_dim // 2}", path=path
            )
        return TextDims(
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

    def vision_dims(self, config: dict[str, Any], path: Path, text: Any) -> VisionDims:
        """The ViT, its merger and the DeepStack mergers from ``vision_config``, checked against the text
        model's dims ``text`` (the merger projects into its width; DeepStack adds to its first layers)."""
        vc = config.get("vision_config")
        if not isinstance(vc, dict):
            raise ModelError("no vision_config", path=path)
        vpath = Path(f"{path} (vision_config)")
        embed = need_number(vc, "hidden_size", vpath)
        depth = need_number(vc, "depth", vpath)
        indexes = vc.get("deepstack_visual_indexes", [])
        if not isinstance(indexes, list) or not all(isinstance(i, int) and 0 <= i < depth for i in indexes):
            raise ModelError(
                f"deepstack_visual_indexes {indexes!r} must be ViT layer numbers below depth {depth}",
                path=vpath,
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
            patch_size=int(vc.get("patch_size", self.patch_size)),
            temporal_patch_size=int(vc.get("temporal_patch_size", self.temporal_patch_size)),
            in_channels=int(vc.get("in_channels", 3)),
            spatial_merge_size=int(vc.get("spatial_merge_size", self.merge_size)),
            out_hidden_size=need_number(vc, "out_hidden_size", vpath),
            hidden_act=str(vc.get("hidden_act", "gelu_pytorch_tanh")),
            num_position_embeddings=num_pos,
            deepstack_visual_indexes=tuple(indexes),
        )
        check_vision_widths(
            merger_key="out_hidden_size",
            merger_out=vision.out_hidden_size,
            text_hidden=text.hidden_size,
            embed_key="hidden_size",
            embed=embed,
            heads=vision.num_heads,
            path=path,
            heads_path=vpath,
        )
        return vision

    def published_config(self, config: dict[str, Any]) -> dict[str, Any]:
        """transformers 5 writes ``text_config.rope_parameters`` (``rope_theta`` inside it) where the published
        configs have ``rope_theta`` and ``rope_scaling``, and ``vision_config.model_type`` ``<type>_vision``
        where they have the model's ``<type>``: the published spellings are put back."""
        vc, tc = config.get("vision_config"), config.get("text_config")
        if isinstance(vc, dict) and vc.get("model_type") == f"{config.get('model_type')}_vision":
            config = {**config, "vision_config": {**vc, "model_type": config["model_type"]}}
        if isinstance(tc, dict) and "rope_theta" not in tc and isinstance(tc.get("rope_parameters"), dict):
            rope = tc["rope_parameters"]
            scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
            tc = {**tc, "rope_theta": rope.get("rope_theta", 5_000_000.0), "rope_scaling": scaling}
            config = {**config, "text_config": tc}
        return config

    # ---- tensors
    def original_tensor_name(self, name: str) -> str:
        """Qwen3-VL was published in transformers 4.57's naming, which transformers 5 keeps: no renaming."""
        return name

    def expected_shapes(self, text: TextDims, vision: VisionDims) -> dict[str, tuple[int, ...]]:
        """Every tensor a Qwen3-VL checkpoint with these dims holds (published names), with its shape, in the
        order the synthetic writer writes them: the text model's, then the vision tower's."""
        return {**self.text_shapes(text), **self.vision_shapes(vision)}

    def text_shapes(self, text: Any) -> dict[str, tuple[int, ...]]:
        """The language model's tensors: the embedding, each layer's (:meth:`text_layer_shapes`), the final
        norm and, untied, the output head."""
        h, t = text.hidden_size, self.text_prefix
        shapes: dict[str, tuple[int, ...]] = {t + "embed_tokens.weight": (text.vocab_size, h)}
        for i in range(text.num_layers):
            shapes.update({f"{t}layers.{i}.{k}": v for k, v in self.text_layer_shapes(text, i).items()})
        shapes[t + "norm.weight"] = (h,)
        if not text.tie_word_embeddings:
            shapes["lm_head.weight"] = (text.vocab_size, h)
        return shapes

    def text_layer_shapes(self, text: Any, layer: int) -> dict[str, tuple[int, ...]]:
        """Text layer ``layer``'s tensors by their suffix: Qwen3 attention (q/k RMSNorm) and a gated MLP."""
        hd = text.head_dim
        return _text_layer(
            text.hidden_size, text.num_heads * hd, text.num_kv_heads * hd, text.intermediate_size, hd
        )

    def vision_shapes(self, vision: VisionDims) -> dict[str, tuple[int, ...]]:
        """The ViT (patch kernel with bias, position table, blocks), the merger and the DeepStack mergers."""
        shapes: dict[str, tuple[int, ...]] = {}
        e, m, md, out = vision.embed_dim, vision.mlp_dim, vision.merged_dim, vision.out_hidden_size
        p, v = vision.patch_size, self.vision_prefix
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

    # ---- image grid
    def smart_resize(
        self,
        width: int,
        height: int,
        *,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        factor: int | None = None,
    ) -> tuple[int, int]:
        """Qwen2-VL's resize rule on Qwen3-VL's 32-pixel grid (or ``factor``)."""
        return qwen_smart_resize(
            width, height, min_pixels=min_pixels, max_pixels=max_pixels, factor=factor or self.image_factor
        )


# ------------------------------------------------------------------------------------------ published sizes


@dataclass(frozen=True)
class SynthShape:
    """One Qwen3-VL model, published or synthetic: the fields its config.json carries."""

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
    tokenizer_base: int = Qwen3VLFamily.base_vocab
    max_shard_bytes: int = 4_000_000_000
    family: str = Qwen3VLFamily.name  # the registered family that writes and reads this shape


Qwen3VLFamily.synth_shapes = {
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

FAMILY = Qwen3VLFamily()
