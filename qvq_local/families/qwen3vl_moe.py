"""The Qwen3-VL MoE family: Qwen3-VL-30B-A3B and Qwen3-VL-235B-A22B, Instruct and Thinking.

Qwen3-VL MoE is Qwen3-VL (:mod:`qvq_local.families.qwen3vl`) with a mixture of experts in place of each text
layer's MLP; the vision tower (16-pixel patches, position table, DeepStack mergers), the tokens, the chat
templates and the image grid are Qwen3-VL's, so :class:`Qwen3VLMoeFamily` inherits them and states only
what differs:

* ``config.json``: ``Qwen3VLMoeForConditionalGeneration`` / ``qwen3_vl_moe``; ``text_config`` adds
  ``num_experts``, ``num_experts_per_tok`` (top-k), ``moe_intermediate_size`` (one expert's width),
  ``decoder_sparse_step`` and ``mlp_only_layers`` (which layers keep a dense MLP: none in the published
  models), parsed into :class:`MoeTextDims`;
* the tensors, published in transformers 4.57's layout (which transformers 5 reads by transposing): each
  MoE layer has a router ``mlp.gate.weight`` ``[experts, hidden]`` and every expert packed in two 3-D
  tensors, ``mlp.experts.gate_up_proj`` ``[experts, hidden, 2 x expert width]`` (gate then up along the
  last axis) and ``mlp.experts.down_proj`` ``[experts, expert width, hidden]``; the router's top-k
  weights are renormalised to sum to 1 (transformers' ``Qwen3VLMoeTextTopKRouter``);
* the GGUF pair: text architecture ``qwen3vlmoe`` (gguf-py's ``MODEL_ARCH.QWEN3VLMOE``), the experts
  packed as llama.cpp's ``ffn_{gate,up,down}_exps`` (``convert/gguf_qwen3vl_moe.py``), and Qwen3-VL's
  ``qwen3vl_merger`` projector: a pair is told apart from Qwen3-VL's by its text architecture;
* the published sizes (``synth_shapes``; ``convert/synth_qwen3vl_moe.py`` writes them) and their parameter
  counts: all of them (every expert must be in memory) and those one token reads (:meth:`active_parameters`:
  the top-k experts, the router and everything outside the experts).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

from qvq_local.errors import ModelError
from qvq_local.families import qwen3vl
from qvq_local.families.base import need_number
from qvq_local.families.qwen3vl import Qwen3VLFamily


@dataclass(frozen=True)
class MoeTextDims(qwen3vl.TextDims):
    """Qwen3-VL's text dims plus the mixture of experts."""

    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()

    def is_moe_layer(self, layer: int) -> bool:
        """True when text layer ``layer`` has experts (transformers' rule: not in ``mlp_only_layers`` and
        every ``decoder_sparse_step``-th layer)."""
        return (
            layer not in self.mlp_only_layers
            and self.num_experts > 0
            and (layer + 1) % self.decoder_sparse_step == 0
        )


def moe_dims(tc: dict[str, Any], path: Path, num_layers: int) -> dict[str, Any]:
    """The mixture-of-experts fields of a ``text_config`` (checked; a ModelError naming ``path``): experts,
    top-k, an expert's width, and which layers keep a dense MLP."""
    # transformers 5 writes num_local_experts (its attribute) where the published configs say num_experts
    experts = need_number(tc, "num_experts" if "num_experts" in tc else "num_local_experts", path)
    top_k = need_number(tc, "num_experts_per_tok", path)
    if top_k > experts:
        raise ModelError(f"num_experts_per_tok {top_k} is more than num_experts {experts}", path=path)
    dense = tc.get("mlp_only_layers") or []
    if not isinstance(dense, list) or not all(isinstance(i, int) and 0 <= i < num_layers for i in dense):
        raise ModelError(f"mlp_only_layers {dense!r} must list text layers 0..{num_layers - 1}", path=path)
    return {
        "num_experts": experts,
        "num_experts_per_tok": top_k,
        "moe_intermediate_size": need_number(tc, "moe_intermediate_size", path),
        "decoder_sparse_step": int(tc.get("decoder_sparse_step") or 1),
        "mlp_only_layers": tuple(dense),
    }


def experts_shapes(e: int, h: int, f: int) -> dict[str, tuple[int, ...]]:
    """A Qwen3-VL MoE layer's router and packed experts (``e`` experts of width ``f`` in an ``h``-wide model),
    in the published (transformers 4.57) layout."""
    return {
        "mlp.gate.weight": (e, h),
        "mlp.experts.gate_up_proj": (e, h, 2 * f),
        "mlp.experts.down_proj": (e, f, h),
    }


class Qwen3VLMoeFamily(Qwen3VLFamily):
    """Qwen3-VL MoE (30B-A3B, 235B-A22B): Qwen3-VL with experts in its text layers."""

    name: ClassVar[str] = "Qwen3-VL-MoE"
    models: ClassVar[str] = "Qwen3-VL MoE Instruct / Thinking"
    aliases: ClassVar[tuple[str, ...]] = ("qwen3-vl-moe", "qwen3_vl_moe", "qwen3vlmoe")
    hf_architectures: ClassVar[tuple[str, ...]] = ("Qwen3VLMoeForConditionalGeneration",)
    hf_model_types: ClassVar[tuple[str, ...]] = ("qwen3_vl_moe",)
    #: Below :class:`MoeSynthShape`.
    synth_shapes: ClassVar[dict[str, Any]]

    @property
    def gguf_text_arch(self) -> str:
        from gguf import MODEL_ARCH, MODEL_ARCH_NAMES

        return MODEL_ARCH_NAMES[MODEL_ARCH.QWEN3VLMOE]

    # ---- config.json
    def text_dims(self, config: dict[str, Any], path: Path) -> MoeTextDims:
        """Qwen3-VL's text dims plus the experts."""
        dense = super().text_dims(config, path)
        tc = {**config, **(config.get("text_config") or {})}
        return MoeTextDims(**asdict(dense), **moe_dims(tc, path, dense.num_layers))

    # ---- tensors
    def text_layer_shapes(self, text: MoeTextDims, layer: int) -> dict[str, tuple[int, ...]]:
        """Qwen3-VL's attention; the router and packed experts where the layer has them, else its dense MLP."""
        shapes = super().text_layer_shapes(text, layer)
        if text.is_moe_layer(layer):
            for k in ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"):
                del shapes[k]
            shapes.update(experts_shapes(text.num_experts, text.hidden_size, text.moe_intermediate_size))
        return shapes

    def experts_transposed(self, text: MoeTextDims, gate_up_shape: tuple[int, ...]) -> bool:
        """True when a layer's ``mlp.experts.gate_up_proj`` is stored as transformers 5 holds it,
        ``[experts, 2 x width, hidden]`` (its ``save_pretrained`` writes that), rather than in the published
        ``[experts, hidden, 2 x width]`` (``down_proj`` is then ``[experts, hidden, width]``)."""
        e, h, f = text.num_experts, text.hidden_size, text.moe_intermediate_size
        return tuple(gate_up_shape) == (e, 2 * f, h) != (e, h, 2 * f)

    def layout_shapes(
        self, text: MoeTextDims, vision: Any, stored: dict[str, tuple[int, ...]]
    ) -> dict[str, tuple[int, ...]]:
        """The published layout, or transformers 5's where its experts are stored transposed."""
        shapes = self.expected_shapes(text, vision)
        e, h, f = text.num_experts, text.hidden_size, text.moe_intermediate_size
        for i in range(text.num_layers):
            p = f"{self.text_prefix}layers.{i}.mlp.experts."
            if p + "gate_up_proj" in stored and self.experts_transposed(text, stored[p + "gate_up_proj"]):
                shapes[p + "gate_up_proj"], shapes[p + "down_proj"] = (e, 2 * f, h), (e, h, f)
        return shapes

    def published_layout(
        self, text: MoeTextDims, stored: dict[str, tuple[int, ...]]
    ) -> dict[str, tuple[int, ...]]:
        """Experts stored as transformers 5 holds them go back to the published layout by swapping their last
        two axes."""
        out: dict[str, tuple[int, ...]] = {}
        for i in range(text.num_layers):
            p = f"{self.text_prefix}layers.{i}.mlp.experts."
            if p + "gate_up_proj" in stored and self.experts_transposed(text, stored[p + "gate_up_proj"]):
                out[p + "gate_up_proj"] = out[p + "down_proj"] = (0, 2, 1)
        return out

    def published_config(self, config: dict[str, Any]) -> dict[str, Any]:
        """Qwen3-VL's, and ``num_experts`` where transformers 5 writes ``num_local_experts``."""
        config = super().published_config(config)
        tc = config.get("text_config")
        if isinstance(tc, dict) and "num_experts" not in tc and "num_local_experts" in tc:
            config = {**config, "text_config": {**tc, "num_experts": tc["num_local_experts"]}}
        return config

    def active_parameters(self, text: MoeTextDims, vision: Any) -> int:
        """Parameters one text token reads: everything but the experts, plus ``num_experts_per_tok`` of them
        in each MoE layer (the vision tower's are counted, as every image reads them)."""
        total = 0
        per_expert = 3 * text.hidden_size * text.moe_intermediate_size
        for name, shape in self.expected_shapes(text, vision).items():
            if ".mlp.experts." not in name:
                n = 1
                for d in shape:
                    n *= d
                total += n
        moe_layers = sum(text.is_moe_layer(i) for i in range(text.num_layers))
        return total + moe_layers * text.num_experts_per_tok * per_expert


# ------------------------------------------------------------------------------------------ published sizes


@dataclass(frozen=True)
class MoeSynthShape(qwen3vl.SynthShape):
    """One Qwen3-VL MoE model: Qwen3-VL's fields plus the experts (``intermediate_size`` is in the published
    config.json although every layer is MoE)."""

    num_experts: int = 128
    num_experts_per_tok: int = 8
    moe_intermediate_size: int = 768
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    family: str = Qwen3VLMoeFamily.name


Qwen3VLMoeFamily.synth_shapes = {
    # Unit-test size: 3 text layers of 8 experts (2 per token) 512 wide: a multiple of 256, so K-quants
    # apply to the experts, and not the model's width, so a [experts, width, hidden] tensor cannot pass
    # for its transpose (transformers transposes the published layout only when the shape says so).
    # Qwen3-VL tiny's attention and vision tower (DeepStack into the first 2 layers).
    "tiny": MoeSynthShape(
        name="tiny",
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=3,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=64,
        vocab_size=1296,
        tie_word_embeddings=False,
        vision_depth=4,
        vision_hidden_size=256,
        vision_intermediate_size=512,
        deepstack_visual_indexes=(1, 2),
        vision_num_heads=4,
        num_position_embeddings=144,
        mrope_section=(12, 10, 10),
        tokenizer_base=1264,
        max_shard_bytes=6 * 1024**2,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=512,
    ),
    # The published config.json of Qwen/Qwen3-VL-30B-A3B-{Instruct,Thinking}
    "30b-a3b": MoeSynthShape(
        name="30b-a3b",
        hidden_size=2048,
        intermediate_size=6144,
        num_hidden_layers=48,
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=128,
        vocab_size=151936,
        tie_word_embeddings=False,
        vision_depth=27,
        vision_hidden_size=1152,
        vision_intermediate_size=4304,
        deepstack_visual_indexes=(8, 16, 24),
        num_experts=128,
        num_experts_per_tok=8,
        moe_intermediate_size=768,
    ),
    # Qwen/Qwen3-VL-235B-A22B-{Instruct,Thinking}
    "235b-a22b": MoeSynthShape(
        name="235b-a22b",
        hidden_size=4096,
        intermediate_size=12288,
        num_hidden_layers=94,
        num_attention_heads=64,
        num_key_value_heads=4,
        head_dim=128,
        vocab_size=151936,
        tie_word_embeddings=False,
        vision_depth=27,
        vision_hidden_size=1152,
        vision_intermediate_size=4304,
        deepstack_visual_indexes=(8, 16, 24),
        num_experts=128,
        num_experts_per_tok=8,
        moe_intermediate_size=1536,
    ),
}

FAMILY = Qwen3VLMoeFamily()
