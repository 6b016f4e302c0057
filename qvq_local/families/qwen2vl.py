"""The Qwen2-VL family: QVQ-72B-Preview and Qwen2-VL-2B/7B/72B-Instruct.

Everything qvq-local knows that is particular to this architecture is a fact of :class:`Qwen2VLFamily`,
declared once, and every other module asks the family for it (``tests/test_families.py`` checks that no
module outside the family's rooms names the architecture or its GGUF identifiers):

* Hugging Face ``config.json``: ``architectures`` / ``model_type``, parsed into :class:`TextDims` and
  :class:`VisionDims` (flat text fields or transformers 5's ``text_config``);
* the checkpoint's tensors: both namings (:meth:`~Qwen2VLFamily.original_tensor_name`) and every
  tensor's shape (:meth:`~Qwen2VLFamily.expected_shapes`), which ``qvq convert`` and ``qvq doctor``
  check;
* the GGUF pair llama.cpp runs: text architecture ``qwen2vl`` and mmproj projector ``qwen2vl_merger``
  (gguf-py's own constants); the converter's tensor maps are in ``convert/gguf_qwen2vl.py``;
* the image grid: 14-pixel patches merged 2x2 into one token, sized by the Qwen resize rule
  (images.py, the llama.cpp backend and the MLX backend all use it);
* prompt defaults (QVQ's system prompt and sampling), Qwen's special tokens, QVQ's answer markers;
* the published sizes (and a unit-test size) synthetic checkpoints are built in
  (``convert/synth_qwen2vl.py`` writes them).

Facts were checked against the published checkpoints and llama.cpp's converter (see DESIGN.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from qvq_local.errors import ModelError
from qvq_local.families.base import Family, check_vision_widths, need_number, qwen_smart_resize

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


# transformers 5 prefix -> original prefix (first match wins; longer prefixes first).
_RENAMES = (
    ("model.language_model.", "model."),
    ("model.visual.", "visual."),
)


# ------------------------------------------------------------------------------------------ the family


class Qwen2VLFamily(Family):
    """Qwen2-VL and QVQ-72B-Preview."""

    name: ClassVar[str] = "Qwen2-VL"
    models: ClassVar[str] = "QVQ / Qwen2-VL"
    aliases: ClassVar[tuple[str, ...]] = ("qwen2-vl", "qwen2vl", "qvq")
    hf_architectures: ClassVar[tuple[str, ...]] = ("Qwen2VLForConditionalGeneration",)
    hf_model_types: ClassVar[tuple[str, ...]] = ("qwen2_vl",)
    hf_processor_class: ClassVar[str] = "Qwen2VLProcessor"
    #: mlx-vlm runs this family's vision tower on its own (``cached_image_features``), so the MLX session
    #: can encode images apart from the prompt.
    mlx_split_vision: ClassVar[bool] = True

    # ---- tokens
    #: Qwen's special tokens in their original order; the first one's id is the size of the base vocabulary.
    special_tokens: ClassVar[tuple[str, ...]] = (
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
    base_vocab: ClassVar[int] = 151643
    #: What one image looks like in a rendered prompt (backends rewrite it for their library).
    image_block: ClassVar[str] = "<|vision_start|><|image_pad|><|vision_end|>"
    image_pad: ClassVar[str] = "<|image_pad|>"

    # ---- prompt conventions
    #: QVQ-72B-Preview's system prompt, sent unless ``--system`` (``system=``) replaces it.
    #:
    #: Two versions are published.  The model card's example passes this sentence.  LLaMA-Factory and
    #: ms-swift register QVQ with one more: "... You are Qwen developed by Alibaba. Answer in the language
    #: of the question. You should think step-by-step."  This project sends the model card's, because it
    #: is the authors' own inference example, the published demo replies the controller is built and
    #: tested on (``tests/test_replay.py``) come from it, and a sentence the base model may never have
    #: been trained with is an untested change to its behaviour; the language of the answer is this
    #: project's job instead (the forced answer in the question's language,
    #: ``splitter.default_forced_text``).  A model fine-tuned with those frameworks saw their sentence:
    #: pass it with ``--system``.
    system_prompt: ClassVar[str] = (
        "You are a helpful and harmless assistant. You are Qwen developed by Alibaba. You should think step-by-step."
    )
    #: QVQ-72B-Preview's published sampling (its generation_config.json): near-greedy.  The fallback for a
    #: model that ships no sampling values of its own (``SamplingParams.resolved``).
    sampling: ClassVar[dict[str, float | int]] = {
        "temperature": 0.01,
        "top_p": 0.001,
        "top_k": 1,
        "repetition_penalty": 1.05,
    }
    #: QVQ's answer markers by question language, the first of each the one forced text ends with.  QVQ
    #: has no think tags: it writes reasoning prose and then a "**Final Answer**" section (English
    #: questions) or a "**答案**" section (Chinese ones), as in its published demo replies.
    answer_markers: ClassVar[dict[str, tuple[str, ...]]] = {
        "en": ("**Final Answer**", "**Final Answer:**", "**Final answer**", "**Final answer:**"),
        "zh": ("**答案**", "**答案：**", "**答案:**", "**最终答案**", "**最终答案：**", "**最终答案:**"),
    }
    #: It reproduces the single-turn output of the published Qwen2-VL template (system turn, user turn
    #: with one vision block per image then the text, and the opening of the assistant turn); when no
    #: system message is given it falls back to Qwen2-VL's default system prompt, like the original.
    fallback_chat_template: ClassVar[str] = (
        "{% set ns = namespace(first=true) %}"
        "{% for message in messages %}"
        "{% if ns.first and message['role'] != 'system' %}"
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "{% endif %}"
        "{% set ns.first = false %}"
        "<|im_start|>{{ message['role'] }}\n"
        "{% if message['content'] is string %}"
        "{{ message['content'] }}"
        "{% else %}"
        "{% for part in message['content'] %}"
        "{% if part['type'] == 'image' %}"
        "<|vision_start|><|image_pad|><|vision_end|>"
        "{% elif part['type'] == 'video' %}"
        "<|vision_start|><|video_pad|><|vision_end|>"
        "{% elif part['type'] == 'text' %}"
        "{{ part['text'] }}"
        "{% endif %}"
        "{% endfor %}"
        "{% endif %}"
        "<|im_end|>\n"
        "{% endfor %}"
        "{% if add_generation_prompt %}"
        "<|im_start|>assistant\n"
        "{% endif %}"
    )

    # ---- image grid: a 14-pixel patch, merged 2x2 into one token
    patch_size: ClassVar[int] = 14
    merge_size: ClassVar[int] = 2
    temporal_patch_size: ClassVar[int] = 2
    #: Qwen2VLImageProcessor's pixel bounds (``min_pixels`` / ``max_pixels`` of its
    #: preprocessor_config.json) and image statistics (OpenAI CLIP's).
    processor_min_pixels: ClassVar[int] = 56 * 56
    processor_max_pixels: ClassVar[int] = 16384 * (patch_size * merge_size) ** 2
    image_mean: ClassVar[tuple[float, float, float]] = (0.48145466, 0.4578275, 0.40821073)
    image_std: ClassVar[tuple[float, float, float]] = (0.26862954, 0.26130258, 0.27577711)
    #: The image-token bounds (after the merge) llama.cpp's mtmd sets for this projector.
    llama_image_tokens: ClassVar[tuple[int, int]] = (8, 4096)

    # ---- video: Qwen2VLVideoProcessor's defaults; two frames a temporal patch, the patch's index its
    # temporal M-RoPE position
    video_block: ClassVar[str] = "<|vision_start|><|video_pad|><|vision_end|>"
    video_pad: ClassVar[str] = "<|video_pad|>"
    video_time: ClassVar[str] = "index"
    video_min_pixels: ClassVar[int] = 128 * (patch_size * merge_size) ** 2
    video_max_pixels: ClassVar[int] = 768 * (patch_size * merge_size) ** 2
    #: QVQ-72B-Preview's model card: "QVQ-72B-Preview does not support video input" (Qwen2-VL-Instruct
    #: does; so does QVQ-Max, a served model of its own): it gets a clip as frames.
    video_refused_by: ClassVar[tuple[str, ...]] = ("qvq-72b",)

    # ---- tensors (original naming: QVQ-72B-Preview's)
    text_prefix: ClassVar[str] = "model."
    vision_prefix: ClassVar[str] = "visual."
    #: Tensor-name endings that carry a width the text model must match (``qvq doctor`` reads their shapes).
    merger_out_suffix: ClassVar[str] = "merger.mlp.2.weight"
    embedding_suffix: ClassVar[str] = "embed_tokens.weight"
    width_tensor_suffixes: ClassVar[tuple[str, ...]] = (
        merger_out_suffix,
        "merger.mlp.2.bias",
        embedding_suffix,
    )
    #: The mmproj tensor whose rows are the projector's output width.
    mmproj_out_tensor: ClassVar[str] = "mm.2"
    #: The published sizes, below :class:`SynthShape` (which takes its defaults from this class).
    synth_shapes: ClassVar[dict[str, Any]]

    # ---- GGUF identities
    #: Qwen2's pre-tokenizer regex.
    gguf_tokenizer_pre: ClassVar[str] = "qwen2"

    @property
    def gguf_text_arch(self) -> str:
        from gguf import MODEL_ARCH, MODEL_ARCH_NAMES

        return MODEL_ARCH_NAMES[MODEL_ARCH.QWEN2VL]

    @property
    def gguf_projector(self) -> str:
        from gguf import VisionProjectorType

        return VisionProjectorType.QWEN2VL

    # ---- config.json
    def merger_width(self, config: dict[str, Any]) -> Any:
        """The width the vision merger projects into (``vision_config.hidden_size``; the text width if
        absent)."""
        vision = config.get("vision_config")
        hidden = text_config(config).get("hidden_size")
        return vision.get("hidden_size", hidden) if isinstance(vision, dict) else None

    def dims_from_config(self, config: dict[str, Any], path: Path) -> tuple[TextDims, VisionDims]:
        """Read the text and vision shapes; a ModelError naming ``path`` for anything missing or
        inconsistent."""
        text = self.text_dims(config, path)
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
            patch_size=int(vc.get("patch_size", self.patch_size)),
            temporal_patch_size=int(vc.get("temporal_patch_size", self.temporal_patch_size)),
            in_channels=int(vc.get("in_chans", vc.get("in_channels", 3))),
            spatial_merge_size=int(vc.get("spatial_merge_size", self.merge_size)),
            out_hidden_size=int(vc.get("hidden_size", text.hidden_size)),
            hidden_act=str(vc.get("hidden_act", "quick_gelu")),
        )
        check_vision_widths(
            merger_key="hidden_size",
            merger_out=vision.out_hidden_size,
            text_hidden=text.hidden_size,
            embed_key="embed_dim",
            embed=embed,
            heads=vision.num_heads,
            path=path,
        )
        return text, vision

    def text_dims(self, config: dict[str, Any], path: Path) -> TextDims:
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
            raise ModelError(
                f"mrope_section {list(section)} must sum to head_dim/2 = {head_dim // 2}", path=path
            )
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

    # ---- tensors
    def original_tensor_name(self, name: str) -> str:
        """Map a stored tensor name (either naming) to the original Qwen2-VL name."""
        for new, old in _RENAMES:
            if name.startswith(new):
                return old + name[len(new) :]
        return name

    def expected_shapes(self, text: TextDims, vision: VisionDims) -> dict[str, tuple[int, ...]]:
        """Every tensor a Qwen2-VL checkpoint with these dims holds (original names), with its shape, in
        writing order (synthetic checkpoints are written in it)."""
        shapes = self.text_shapes(text)
        shapes.update(self.vision_shapes(vision))
        return shapes

    def text_shapes(self, text: TextDims) -> dict[str, tuple[int, ...]]:
        """The text model's tensors and shapes, in writing order (Qwen2 with biased q/k/v; shared with
        Qwen2.5-VL)."""
        h, q, kv, f = (
            text.hidden_size,
            text.num_heads * text.head_dim,
            text.num_kv_heads * text.head_dim,
            text.intermediate_size,
        )
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (text.vocab_size, h)}
        for i in range(text.num_layers):
            p = f"model.layers.{i}."
            shapes.update(
                {
                    p + "input_layernorm.weight": (h,),
                    p + "self_attn.q_proj.weight": (q, h),
                    p + "self_attn.q_proj.bias": (q,),
                    p + "self_attn.k_proj.weight": (kv, h),
                    p + "self_attn.k_proj.bias": (kv,),
                    p + "self_attn.v_proj.weight": (kv, h),
                    p + "self_attn.v_proj.bias": (kv,),
                    p + "self_attn.o_proj.weight": (h, q),
                    p + "post_attention_layernorm.weight": (h,),
                    p + "mlp.gate_proj.weight": (f, h),
                    p + "mlp.up_proj.weight": (f, h),
                    p + "mlp.down_proj.weight": (h, f),
                }
            )
        shapes["model.norm.weight"] = (h,)
        if not text.tie_word_embeddings:
            shapes["lm_head.weight"] = (text.vocab_size, h)
        return shapes

    def vision_shapes(self, vision: VisionDims) -> dict[str, tuple[int, ...]]:
        """Qwen2-VL's ViT: LayerNorms with bias, quick-GELU fc1/fc2, the LayerNorm + 2-layer merger."""
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
                    p + "attn.qkv.weight": (3 * e, e),
                    p + "attn.qkv.bias": (3 * e,),
                    p + "attn.proj.weight": (e, e),
                    p + "attn.proj.bias": (e,),
                    p + "norm2.weight": (e,),
                    p + "norm2.bias": (e,),
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
        """Qwen2-VL's resize rule on its 28-pixel grid (or ``factor``)."""
        return qwen_smart_resize(
            width, height, min_pixels=min_pixels, max_pixels=max_pixels, factor=factor or self.image_factor
        )


# ------------------------------------------------------------------------------------------ published sizes


@dataclass(frozen=True)
class SynthShape:
    """The dimensions of one model of the family (the fields a Qwen2-VL config.json carries), the
    published sizes' and synthetic test models'."""

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
    patch_size: int = Qwen2VLFamily.patch_size
    spatial_merge_size: int = Qwen2VLFamily.merge_size
    temporal_patch_size: int = Qwen2VLFamily.temporal_patch_size
    rope_theta: float = 1000000.0
    rms_norm_eps: float = 1e-6
    tokenizer_base: int = Qwen2VLFamily.base_vocab  # id of <|endoftext|>
    max_shard_bytes: int = 4_000_000_000  # QVQ-72B-Preview ships 38 shards of ~3.7 GiB
    family: str = Qwen2VLFamily.name  # the registered family that writes and reads this shape

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def vision_hidden_size(self) -> int:
        return self.hidden_size  # the merger projects into the text width


Qwen2VLFamily.synth_shapes = {
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

FAMILY = Qwen2VLFamily()
