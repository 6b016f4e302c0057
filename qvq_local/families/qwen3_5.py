"""The Qwen3.5 families (Qwen3.6 has the same architecture and ``model_type``): dense and MoE.

Qwen3.5 is natively multimodal with a hybrid language model: three Gated DeltaNet (linear attention) layers
for every full-attention layer.  Its vision tower is Qwen3-VL's without DeepStack, its image grid and
prompt blocks are Qwen3-VL's, so :class:`Qwen35Family` extends :class:`~qvq_local.families.qwen3vl.Qwen3VLFamily`
and states what differs; :class:`Qwen35MoeFamily` adds the experts.  Checked against transformers 5.25
(``qwen3_5``, ``qwen3_5_moe``), mlx-vlm 0.7.10 and llama.cpp's converter and loaders (``qwen35``,
``qwen35moe``) in the llama-cpp-python 0.3.36 sdist:

* ``config.json``: ``Qwen3_5ForConditionalGeneration`` / ``qwen3_5`` (``Qwen3_5MoeForConditionalGeneration`` /
  ``qwen3_5_moe``); ``text_config`` has ``layer_types`` (``linear_attention`` / ``full_attention``, every
  ``full_attention_interval``-th layer full), the DeltaNet dims ``linear_num_key_heads``,
  ``linear_num_value_heads``, ``linear_key_head_dim``, ``linear_value_head_dim``,
  ``linear_conv_kernel_dim``, a 256-wide attention head of which a quarter rotates
  (``rope_parameters.partial_rotary_factor``, interleaved M-RoPE over ``mrope_section`` [11, 11, 10]),
  ``mtp_num_hidden_layers`` (a multi-token-prediction block published beside the model); the MoE adds
  ``num_experts``, ``num_experts_per_tok``, ``moe_intermediate_size`` and ``shared_expert_intermediate_size``;
* the tensors (:meth:`Qwen35Family.text_layer_shapes`): a full-attention layer's ``self_attn.q_proj`` is
  twice as tall as its heads (the second half gates the output), with q/k RMSNorm; a linear layer's
  ``linear_attn`` has ``in_proj_qkv``, ``in_proj_z`` (the output gate), ``in_proj_b``/``in_proj_a`` (one
  row per value head), ``conv1d`` ``[q+k+v channels, 1, kernel]``, ``dt_bias``, ``A_log``, a gated RMSNorm
  over one value head and ``out_proj``; the text RMSNorms are zero-centred (they scale by ``1 + weight``)
  except the gated one; the MoE's experts are packed in transformers 5's layout
  (``mlp.experts.gate_up_proj`` ``[experts, 2 x width, hidden]``, ``mlp.experts.down_proj``
  ``[experts, hidden, width]``) beside a router, a shared expert and its sigmoid gate; the MTP block's
  tensors (``mtp.*``) are part of the published files, and neither qvq-local's converters nor transformers
  use them;
* tokens: a 248,320-row vocabulary whose added tokens begin at 248,044 in Qwen3's order (``<|im_end|>``
  248046, ``<|image_pad|>`` 248056, ``<think>`` 248068, ``</think>`` 248069); the pre-tokeniser splits
  letters with their combining marks (``\\p{M}``; llama.cpp's ``qwen35``);
* the chat template switches thinking with ``enable_thinking``: thinking on, the assistant turn opens
  ``<think>\\n``; off, it opens and closes an empty one (``<think>\\n\\n</think>\\n\\n``).  The 4B and larger
  models think unless told not to; 0.8B and 2B do not unless told to (:func:`chat_template`);
* the GGUF pair: text architecture ``qwen35`` / ``qwen35moe`` and Qwen3-VL's ``qwen3vl_merger`` projector
  with no DeepStack layer (``convert/gguf_qwen3_5.py``);
* :attr:`~qvq_local.families.base.Family.recurrent_state`: a DeltaNet layer keeps a state that cannot be cut
  back to a shorter prefix, so a prefix is reused, and a chain forked, only by a snapshot of it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

from qvq_local.errors import ModelError
from qvq_local.families import qwen3vl
from qvq_local.families.base import need_number
from qvq_local.families.qwen3vl import Qwen3VLFamily
from qvq_local.families.qwen3vl_moe import moe_dims

# ------------------------------------------------------------------------------------------ chat templates

#: The published templates' generation prompt: what follows ``<|im_start|>assistant\n``, by default
#: (``enable_thinking`` not given) thinking or not.
_THINKING_BY_DEFAULT = (
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n"
    "{% else %}<think>\n{% endif %}"
)
_QUIET_BY_DEFAULT = (
    "{% if enable_thinking is defined and enable_thinking is true %}<think>\n"
    "{% else %}<think>\n\n</think>\n\n{% endif %}"
)


def chat_template(thinks_by_default: bool = True) -> str:
    """Qwen3.5's chat template without tool calls: ChatML turns, one vision block per image, earlier
    assistant turns kept after their ``</think>``, and the generation prompt switched by
    ``enable_thinking`` (Qwen3.5-4B and larger think by default; 0.8B and 2B do not)."""
    opening = _THINKING_BY_DEFAULT if thinks_by_default else _QUIET_BY_DEFAULT
    return qwen3vl.chat_template(thinking=True).replace(
        "<|im_start|>assistant\n<think>\n", "<|im_start|>assistant\n" + opening
    )


# ------------------------------------------------------------------------------------------ dimensions


@dataclass(frozen=True)
class HybridTextDims(qwen3vl.TextDims):
    """Qwen3.5's language model: Qwen3-VL's text fields (``intermediate_size`` 0 without a dense MLP) plus the
    layer types, the DeltaNet dims, the partial rotation, the MTP block and, for the MoE, the experts."""

    linear_layers: tuple[bool, ...] = ()
    full_attention_interval: int = 4
    partial_rotary_factor: float = 0.25
    linear_conv_kernel: int = 4
    linear_num_key_heads: int = 16
    linear_num_value_heads: int = 32
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    mtp_layers: int = 0
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0

    def is_linear(self, layer: int) -> bool:
        """True for a Gated DeltaNet layer (a recurrent state), False for full attention (a KV cache)."""
        return self.linear_layers[layer]

    @property
    def rotary_dim(self) -> int:
        """The rotated part of an attention head."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def linear_key_dim(self) -> int:
        return self.linear_num_key_heads * self.linear_key_head_dim

    @property
    def linear_value_dim(self) -> int:
        return self.linear_num_value_heads * self.linear_value_head_dim

    @property
    def conv_channels(self) -> int:
        """The DeltaNet convolution's channels: q, k and v."""
        return 2 * self.linear_key_dim + self.linear_value_dim


def _full_attention(h: int, heads: int, kv: int, hd: int) -> dict[str, tuple[int, ...]]:
    return {
        "self_attn.q_proj.weight": (2 * heads * hd, h),
        "self_attn.k_proj.weight": (kv * hd, h),
        "self_attn.v_proj.weight": (kv * hd, h),
        "self_attn.o_proj.weight": (h, heads * hd),
        "self_attn.q_norm.weight": (hd,),
        "self_attn.k_norm.weight": (hd,),
    }


def _linear_attention(t: HybridTextDims) -> dict[str, tuple[int, ...]]:
    h, vh = t.hidden_size, t.linear_num_value_heads
    return {
        "linear_attn.in_proj_qkv.weight": (t.conv_channels, h),
        "linear_attn.in_proj_z.weight": (t.linear_value_dim, h),
        "linear_attn.in_proj_b.weight": (vh, h),
        "linear_attn.in_proj_a.weight": (vh, h),
        "linear_attn.conv1d.weight": (t.conv_channels, 1, t.linear_conv_kernel),
        "linear_attn.dt_bias": (vh,),
        "linear_attn.A_log": (vh,),
        "linear_attn.norm.weight": (t.linear_value_head_dim,),
        "linear_attn.out_proj.weight": (h, t.linear_value_dim),
    }


def _dense_mlp(h: int, f: int) -> dict[str, tuple[int, ...]]:
    return {"mlp.gate_proj.weight": (f, h), "mlp.up_proj.weight": (f, h), "mlp.down_proj.weight": (h, f)}


# ------------------------------------------------------------------------------------------ the family


class Qwen35Family(Qwen3VLFamily):
    """Qwen3.5 / Qwen3.6, dense (0.8B ... 27B)."""

    name: ClassVar[str] = "Qwen3.5"
    models: ClassVar[str] = "Qwen3.5 / Qwen3.6"
    aliases: ClassVar[tuple[str, ...]] = ("qwen3.5", "qwen3_5", "qwen35", "qwen3.6")
    hf_architectures: ClassVar[tuple[str, ...]] = ("Qwen3_5ForConditionalGeneration",)
    hf_model_types: ClassVar[tuple[str, ...]] = ("qwen3_5",)
    #: Full attention every 4th layer, the rest Gated DeltaNet: a state that cannot be cut back.
    recurrent_state: ClassVar[bool] = True

    # ---- tokens: Qwen3's added tokens, in Qwen3's order, from 248044
    base_vocab: ClassVar[int] = 248044
    #: The pre-tokeniser's split pattern (tokenizer.json's; llama.cpp's ``qwen35`` pre-tokeniser): Qwen2's
    #: with combining marks kept in words.
    pretokenizer_pattern: ClassVar[str] = (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
        r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    )

    # ---- prompt conventions: the 4B-and-larger template (thinks unless told not to)
    fallback_chat_template: ClassVar[str] = chat_template(thinks_by_default=True)

    #: Below :class:`Qwen35SynthShape`.
    synth_shapes: ClassVar[dict[str, Any]]

    # ---- GGUF identities
    gguf_tokenizer_pre: ClassVar[str] = "qwen35"

    @property
    def gguf_text_arch(self) -> str:
        from gguf import MODEL_ARCH, MODEL_ARCH_NAMES

        return MODEL_ARCH_NAMES[MODEL_ARCH.QWEN35]

    # ---- config.json
    def text_dims(self, config: dict[str, Any], path: Path) -> HybridTextDims:
        """The hybrid language model's dims; a ModelError naming ``path`` for anything missing or
        inconsistent (a layer pattern the runtimes cannot run included)."""
        tc = {**config, **(config.get("text_config") or {})}
        hidden = need_number(tc, "hidden_size", path)
        heads = need_number(tc, "num_attention_heads", path)
        kv_heads = int(tc.get("num_key_value_heads") or heads)
        if heads % kv_heads:
            raise ModelError(
                f"num_attention_heads {heads} is not a multiple of kv heads {kv_heads}", path=path
            )
        head_dim = int(tc.get("head_dim") or hidden // heads)
        layers = need_number(tc, "num_hidden_layers", path)
        rope = tc.get("rope_parameters") or tc.get("rope_scaling") or {}
        partial = float(rope.get("partial_rotary_factor", tc.get("partial_rotary_factor", 0.25)))
        section = tuple(int(x) for x in (rope.get("mrope_section") or (11, 11, 10)))
        rotary = int(head_dim * partial)
        if sum(section) * 2 != rotary or len(section) > 4:
            raise ModelError(
                f"mrope_section {list(section)} must sum to half the rotated head, {rotary // 2}", path=path
            )
        interval = int(tc.get("full_attention_interval") or 4)
        pattern = tuple((i + 1) % interval != 0 for i in range(layers))
        types = tc.get("layer_types")
        if types is not None:
            if not isinstance(types, list) or len(types) != layers:
                raise ModelError(f"layer_types must list {layers} layer types", path=path)
            unknown = sorted({t for t in types if t not in ("linear_attention", "full_attention")}, key=str)
            if unknown:
                raise ModelError(f"unknown layer type {unknown[0]!r} in layer_types", path=path)
            linear = tuple(t == "linear_attention" for t in types)
            if linear != pattern:
                raise ModelError(
                    f"layer_types do not follow full_attention_interval {interval} (full attention every "
                    f"{interval}th layer), the only pattern mlx-vlm runs",
                    path=path,
                )
        k_heads = need_number(tc, "linear_num_key_heads", path)
        v_heads = need_number(tc, "linear_num_value_heads", path)
        if v_heads % k_heads:
            raise ModelError(
                f"linear_num_value_heads {v_heads} is not a multiple of linear_num_key_heads {k_heads}",
                path=path,
            )
        dense = tc.get("intermediate_size")
        return HybridTextDims(
            hidden_size=hidden,
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            intermediate_size=int(dense) if isinstance(dense, int) and not isinstance(dense, bool) else 0,
            vocab_size=need_number(tc, "vocab_size", path),
            rms_norm_eps=float(tc.get("rms_norm_eps") or 1e-6),
            rope_theta=float(rope.get("rope_theta") or tc.get("rope_theta") or 10_000_000.0),
            mrope_section=section,
            max_position_embeddings=int(tc.get("max_position_embeddings") or 262144),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", tc.get("tie_word_embeddings", False))),
            mrope_interleaved=bool(rope.get("mrope_interleaved", True)),
            linear_layers=pattern,
            full_attention_interval=interval,
            partial_rotary_factor=partial,
            linear_conv_kernel=need_number(tc, "linear_conv_kernel_dim", path),
            linear_num_key_heads=k_heads,
            linear_num_value_heads=v_heads,
            linear_key_head_dim=need_number(tc, "linear_key_head_dim", path),
            linear_value_head_dim=need_number(tc, "linear_value_head_dim", path),
            mtp_layers=int(tc.get("mtp_num_hidden_layers") or 0),
            **self.mlp_dims(tc, path, layers),
        )

    def mlp_dims(self, tc: dict[str, Any], path: Path, layers: int) -> dict[str, Any]:
        """The MLP's dims: a dense one needs ``intermediate_size``."""
        need_number(tc, "intermediate_size", path)
        return {}

    # ---- tensors
    def is_unit_norm_weight(self, name: str) -> bool:
        """The vision tower's LayerNorms and the DeltaNet's gated RMSNorm scale as they are; the text
        RMSNorms are zero-centred (``1 + weight``)."""
        if self.is_vision_tensor(name):
            return super().is_unit_norm_weight(name)
        return name.endswith("linear_attn.norm.weight")

    def text_shapes(self, text: HybridTextDims) -> dict[str, tuple[int, ...]]:
        """Qwen3-VL's text tensors with this family's layers, then the MTP block."""
        shapes = super().text_shapes(text)
        h = text.hidden_size
        if text.mtp_layers:
            shapes.update(
                {
                    "mtp.fc.weight": (h, 2 * h),
                    "mtp.pre_fc_norm_embedding.weight": (h,),
                    "mtp.pre_fc_norm_hidden.weight": (h,),
                    "mtp.norm.weight": (h,),
                }
            )
            for i in range(text.mtp_layers):
                shapes.update({f"mtp.layers.{i}.{k}": v for k, v in self.mtp_layer_shapes(text).items()})
        return shapes

    def text_layer_shapes(self, text: HybridTextDims, layer: int) -> dict[str, tuple[int, ...]]:
        """Text layer ``layer``: its norms, its token mixer (Gated DeltaNet or gated full attention), its MLP."""
        h = text.hidden_size
        shapes: dict[str, tuple[int, ...]] = {"input_layernorm.weight": (h,)}
        if text.is_linear(layer):
            shapes.update(_linear_attention(text))
        else:
            shapes.update(_full_attention(h, text.num_heads, text.num_kv_heads, text.head_dim))
        shapes["post_attention_layernorm.weight"] = (h,)
        shapes.update(self.mlp_shapes(text))
        return shapes

    def mtp_layer_shapes(self, text: HybridTextDims) -> dict[str, tuple[int, ...]]:
        """An MTP layer: a full-attention layer with the model's MLP."""
        h = text.hidden_size
        return {
            "input_layernorm.weight": (h,),
            **_full_attention(h, text.num_heads, text.num_kv_heads, text.head_dim),
            "post_attention_layernorm.weight": (h,),
            **self.mlp_shapes(text),
        }

    def mlp_shapes(self, text: HybridTextDims) -> dict[str, tuple[int, ...]]:
        """A dense gated MLP."""
        return _dense_mlp(text.hidden_size, text.intermediate_size)

    def is_mtp_tensor(self, name: str) -> bool:
        """True for a tensor of the multi-token-prediction block (published with the model, unused here)."""
        return name.startswith("mtp.")

    def layout_shapes(
        self, text: HybridTextDims, vision: Any, stored: dict[str, tuple[int, ...]]
    ) -> dict[str, tuple[int, ...]]:
        """The published layout; without its MTP block when the files have none (transformers'
        ``save_pretrained`` does not write it, and nothing here reads it)."""
        shapes = self.expected_shapes(text, vision)
        if not any(self.is_mtp_tensor(n) for n in stored):
            shapes = {n: s for n, s in shapes.items() if not self.is_mtp_tensor(n)}
        return shapes


class Qwen35MoeFamily(Qwen35Family):
    """Qwen3.5 / Qwen3.6 MoE (35B-A3B, 122B-A10B, 397B-A17B): a router, packed experts and a gated shared
    expert in every layer."""

    name: ClassVar[str] = "Qwen3.5-MoE"
    models: ClassVar[str] = "Qwen3.5 / Qwen3.6 MoE"
    aliases: ClassVar[tuple[str, ...]] = ("qwen3.5-moe", "qwen3_5_moe", "qwen35moe", "qwen3.6-moe")
    hf_architectures: ClassVar[tuple[str, ...]] = ("Qwen3_5MoeForConditionalGeneration",)
    hf_model_types: ClassVar[tuple[str, ...]] = ("qwen3_5_moe",)

    @property
    def gguf_text_arch(self) -> str:
        from gguf import MODEL_ARCH, MODEL_ARCH_NAMES

        return MODEL_ARCH_NAMES[MODEL_ARCH.QWEN35MOE]

    def mlp_dims(self, tc: dict[str, Any], path: Path, layers: int) -> dict[str, Any]:
        """The experts (every layer has them) and the shared expert."""
        moe = moe_dims({**tc, "mlp_only_layers": []}, path, layers)
        return {
            "num_experts": moe["num_experts"],
            "num_experts_per_tok": moe["num_experts_per_tok"],
            "moe_intermediate_size": moe["moe_intermediate_size"],
            "shared_expert_intermediate_size": need_number(tc, "shared_expert_intermediate_size", path),
        }

    def experts_apart(self, stored: Any, layer_prefix: str) -> bool:
        """True when the layer's experts are stored one by one (``mlp.experts.<e>.gate_proj.weight`` ...), as
        transformers 5's ``save_pretrained`` writes them, rather than packed (``mlp.experts.gate_up_proj``)."""
        return layer_prefix + "mlp.experts.0.gate_proj.weight" in stored

    def layout_shapes(
        self, text: HybridTextDims, vision: Any, stored: dict[str, tuple[int, ...]]
    ) -> dict[str, tuple[int, ...]]:
        """The published layout, with every expert stored apart where the files store them so."""
        shapes = super().layout_shapes(text, vision, stored)
        e, h, f = text.num_experts, text.hidden_size, text.moe_intermediate_size
        prefixes = [f"{self.text_prefix}layers.{i}." for i in range(text.num_layers)]
        prefixes += [f"mtp.layers.{i}." for i in range(text.mtp_layers)]
        out: dict[str, tuple[int, ...]] = {}
        for name, shape in shapes.items():
            layer = next((p for p in prefixes if name.startswith(p + "mlp.experts.")), None)
            if layer is None or not self.experts_apart(stored, layer):
                out[name] = shape
            elif name.endswith("gate_up_proj"):
                for k in range(e):
                    out[f"{layer}mlp.experts.{k}.gate_proj.weight"] = (f, h)
                    out[f"{layer}mlp.experts.{k}.up_proj.weight"] = (f, h)
                    out[f"{layer}mlp.experts.{k}.down_proj.weight"] = (h, f)
        return out

    def mlp_shapes(self, text: HybridTextDims) -> dict[str, tuple[int, ...]]:
        """The router, the packed experts (transformers 5's layout) and the gated shared expert."""
        h, e, f = text.hidden_size, text.num_experts, text.moe_intermediate_size
        shared = {
            k.replace("mlp.", "mlp.shared_expert.", 1): v
            for k, v in _dense_mlp(h, text.shared_expert_intermediate_size).items()
        }
        return {
            "mlp.gate.weight": (e, h),
            "mlp.experts.gate_up_proj": (e, 2 * f, h),
            "mlp.experts.down_proj": (e, h, f),
            **shared,
            "mlp.shared_expert_gate.weight": (1, h),
        }


# ------------------------------------------------------------------------------------------ published sizes


@dataclass(frozen=True)
class Qwen35SynthShape(qwen3vl.SynthShape):
    """One Qwen3.5 model: the fields its config.json carries (``intermediate_size`` 0 for the MoE, whose
    config has none; ``thinks_by_default``: which chat template it ships)."""

    linear_num_key_heads: int = 16
    linear_num_value_heads: int = 32
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    linear_conv_kernel_dim: int = 4
    full_attention_interval: int = 4
    partial_rotary_factor: float = 0.25
    mtp_num_hidden_layers: int = 1
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    thinks_by_default: bool = True
    mrope_section: tuple[int, int, int] = (11, 11, 10)
    rope_theta: float = 10_000_000.0
    tokenizer_base: int = Qwen35Family.base_vocab
    family: str = Qwen35Family.name


def _published(name: str, family: str, **kw: Any) -> Qwen35SynthShape:
    """A published Qwen3.5 size: 248,320 rows, no DeepStack, the 27-layer 1152-wide ViT unless given."""
    vision = {"vision_depth": 27, "vision_hidden_size": 1152, "vision_intermediate_size": 4304}
    return Qwen35SynthShape(
        name=name,
        family=family,
        vocab_size=248320,
        head_dim=256,
        deepstack_visual_indexes=(),
        **{**vision, **kw},
    )


_MOE = "Qwen3.5-MoE"

Qwen35Family.synth_shapes = {
    # Unit-test size: 8 layers (6 DeltaNet, full attention at 3 and 7), 4 key heads of 32 and 8 value heads
    # of 32 (two value heads per key head, so llama.cpp's head reordering is exercised), attention heads
    # of 64 of which 16 rotate (mrope_section 3+3+2), an MTP layer, tied embeddings like 0.8B-4B.
    "tiny": Qwen35SynthShape(
        name="tiny",
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        vocab_size=1296,
        tie_word_embeddings=True,
        vision_depth=4,
        vision_hidden_size=256,
        vision_intermediate_size=512,
        deepstack_visual_indexes=(),
        vision_num_heads=4,
        num_position_embeddings=144,
        mrope_section=(3, 3, 2),
        linear_num_key_heads=4,
        linear_num_value_heads=8,
        linear_key_head_dim=32,
        linear_value_head_dim=32,
        tokenizer_base=1264,
        max_shard_bytes=6 * 1024**2,
    ),
    # The published Qwen/Qwen3.5-* configs, as far as they are known here (see the module's tests): text
    # widths from the model cards, vision towers from the configs (0.8B: 12 layers 768 wide; 2B/4B: 24 x
    # 1024; 9B and up: 27 x 1152).  0.8B and 2B ship the template that does not think by default.
    "0.8b": _published(
        "0.8b", Qwen35Family.name, hidden_size=1024, intermediate_size=3584, num_hidden_layers=24,
        num_attention_heads=8, num_key_value_heads=2, linear_num_value_heads=16, tie_word_embeddings=True,
        vision_depth=12, vision_hidden_size=768, vision_intermediate_size=3072, vision_num_heads=12,
        thinks_by_default=False,
    ),
    "2b": _published(
        "2b", Qwen35Family.name, hidden_size=2048, intermediate_size=6144, num_hidden_layers=24,
        num_attention_heads=8, num_key_value_heads=2, linear_num_value_heads=16, tie_word_embeddings=True,
        vision_depth=24, vision_hidden_size=1024, vision_intermediate_size=4096, thinks_by_default=False,
    ),
    "4b": _published(
        "4b", Qwen35Family.name, hidden_size=2560, intermediate_size=9216, num_hidden_layers=32,
        num_attention_heads=16, num_key_value_heads=4, linear_num_value_heads=32, tie_word_embeddings=True,
        vision_depth=24, vision_hidden_size=1024, vision_intermediate_size=4096,
    ),
    "9b": _published(
        "9b", Qwen35Family.name, hidden_size=4096, intermediate_size=12288, num_hidden_layers=32,
        num_attention_heads=16, num_key_value_heads=4, linear_num_value_heads=32, tie_word_embeddings=False,
    ),
    "27b": _published(
        "27b", Qwen35Family.name, hidden_size=5120, intermediate_size=17408, num_hidden_layers=64,
        num_attention_heads=24, num_key_value_heads=4, linear_num_value_heads=48, tie_word_embeddings=False,
    ),
}  # fmt: skip

Qwen35MoeFamily.synth_shapes = {
    # Unit-test size: Qwen3.5 tiny's first 4 layers (full attention at 3) with 8 experts (2 per token) 256
    # wide and a 256-wide shared expert in each, and no dense MLP.
    "tiny": Qwen35SynthShape(
        **{
            **asdict(Qwen35Family.synth_shapes["tiny"]),
            "num_hidden_layers": 4,
            "intermediate_size": 0,
            "num_experts": 8,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 256,
            "shared_expert_intermediate_size": 256,
            "tie_word_embeddings": False,
            "family": _MOE,
        }
    ),
    "35b-a3b": _published(
        "35b-a3b", _MOE, hidden_size=2048, intermediate_size=0, num_hidden_layers=40, num_attention_heads=16,
        num_key_value_heads=2, linear_num_value_heads=32, num_experts=256, num_experts_per_tok=8,
        moe_intermediate_size=512, shared_expert_intermediate_size=512, tie_word_embeddings=False,
    ),
    "122b-a10b": _published(
        "122b-a10b", _MOE, hidden_size=3072, intermediate_size=0, num_hidden_layers=48, num_attention_heads=32,
        num_key_value_heads=2, linear_num_value_heads=64, num_experts=256, num_experts_per_tok=8,
        moe_intermediate_size=1024, shared_expert_intermediate_size=1024, tie_word_embeddings=False,
    ),
    "397b-a17b": _published(
        "397b-a17b", _MOE, hidden_size=4096, intermediate_size=0, num_hidden_layers=60, num_attention_heads=32,
        num_key_value_heads=2, linear_num_value_heads=64, num_experts=512, num_experts_per_tok=10,
        moe_intermediate_size=1024, shared_expert_intermediate_size=1024, tie_word_embeddings=False,
    ),
}  # fmt: skip

FAMILY = Qwen35Family()
MOE_FAMILY = Qwen35MoeFamily()
