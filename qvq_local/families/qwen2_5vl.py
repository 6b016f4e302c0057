"""The Qwen2.5-VL family: Qwen2.5-VL-3B/7B/32B/72B-Instruct.

Qwen2.5-VL keeps Qwen2-VL's language model (Qwen2 with M-RoPE: llama.cpp's text architecture ``qwen2vl``),
its tokens, its 14-pixel patches merged 2x2 and its resize rule, so this module reuses those facts from
:mod:`qvq_local.families.qwen2vl` and states only what differs, all in the vision tower:

* ``vision_config`` names the ViT width ``hidden_size`` (Qwen2-VL: ``embed_dim``), its MLP width
  ``intermediate_size``, and the merger's output ``out_hidden_size`` (the text width);
* each block uses RMSNorm (weight only) and a gated SiLU MLP (``gate_proj``/``up_proj``/``down_proj``,
  with biases); the merger's ``ln_q`` is an RMSNorm too;
* attention is windowed (``window_size`` pixels a side) except in the blocks ``fullatt_block_indexes``
  lists, which llama.cpp stores as one period ``clip.vision.n_wa_pattern`` (block ``i`` is full when
  ``(i + 1) % n == 0``), and its mtmd always uses 112-pixel windows;
* the GGUF projector is ``qwen2.5vl_merger`` (gguf-py's ``VisionProjectorType.QWEN25VL``), with
  ``clip.use_silu``; the tensor names follow llama.cpp's converter (``conversion/qwenvl.py``).

Published sizes (``SYNTH_SHAPES``) were checked against the published configs: see
``tests/test_family_qwen2_5vl.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from qvq_local.errors import ModelError
from qvq_local.families import qwen2vl
from qvq_local.families.base import check_vision_widths, need_number
from qvq_local.families.qwen2vl import Qwen2VLFamily, SynthShape, TextDims

#: The window (pixels a side) llama.cpp's mtmd uses for this projector; it does not read the config's.
LLAMA_WINDOW_SIZE = 112
#: Qwen2.5-VL's ViT, identical at every published size.
VISION_DEPTH = 32
VISION_HIDDEN = 1280
VISION_INTERMEDIATE = 3420
VISION_HEADS = 16
FULLATT_BLOCKS = (7, 15, 23, 31)

#: The published Instruct models' default system prompt (their chat template's).
SYSTEM_PROMPT = "You are a helpful assistant."


@dataclass(frozen=True)
class VisionDims(qwen2vl.VisionDims):
    """Qwen2-VL's vision dims plus the window attention facts."""

    window_size: int = LLAMA_WINDOW_SIZE
    fullatt_block_indexes: tuple[int, ...] = ()


@dataclass(frozen=True)
class Qwen25SynthShape(SynthShape):
    """A synthetic Qwen2.5-VL model: Qwen2-VL's text fields plus the ViT's own widths and windows."""

    vision_intermediate_size: int = VISION_INTERMEDIATE
    window_size: int = 112
    fullatt_block_indexes: tuple[int, ...] = FULLATT_BLOCKS
    vision_depth: int = VISION_DEPTH
    vision_embed_dim: int = VISION_HIDDEN
    vision_num_heads: int = VISION_HEADS
    max_position_embeddings: int = 128000
    family: str = "Qwen2.5-VL"


def _shape(name: str, **kw: Any) -> Qwen25SynthShape:
    return Qwen25SynthShape(name=name, mrope_section=(16, 24, 24), **kw)


SYNTH_SHAPES: dict[str, SynthShape] = {
    # Unit-test size: 4 ViT blocks, the 2nd and 4th full attention (n_wa_pattern 2) so both kinds run; the
    # vision MLP width is not a multiple of 32 (as the real 3420 is not), so Q8_0 falls back per tensor.
    "tiny": Qwen25SynthShape(
        name="tiny",
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1280,
        tie_word_embeddings=False,
        mrope_section=(8, 12, 12),
        vision_depth=4,
        vision_embed_dim=256,
        vision_num_heads=4,
        vision_intermediate_size=344,
        fullatt_block_indexes=(1, 3),
        tokenizer_base=1264,
        max_shard_bytes=6 * 1024**2,
    ),
    # Qwen/Qwen2.5-VL-3B-Instruct
    "3b": _shape(
        "3b",
        hidden_size=2048,
        intermediate_size=11008,
        num_hidden_layers=36,
        num_attention_heads=16,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
    ),
    # Qwen/Qwen2.5-VL-7B-Instruct
    "7b": _shape(
        "7b",
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
        tie_word_embeddings=False,
    ),
    # Qwen/Qwen2.5-VL-32B-Instruct
    "32b": _shape(
        "32b",
        hidden_size=5120,
        intermediate_size=27648,
        num_hidden_layers=64,
        num_attention_heads=40,
        num_key_value_heads=8,
        vocab_size=152064,
        tie_word_embeddings=False,
    ),
    # Qwen/Qwen2.5-VL-72B-Instruct
    "72b": _shape(
        "72b",
        hidden_size=8192,
        intermediate_size=29568,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        vocab_size=152064,
        tie_word_embeddings=False,
    ),
}


# ------------------------------------------------------------------------------------------ config


def merger_width(config: dict[str, Any]) -> Any:
    """The merger projects into ``vision_config.out_hidden_size`` (``hidden_size`` there is the ViT's)."""
    vision = config.get("vision_config")
    return vision.get("out_hidden_size") if isinstance(vision, dict) else None


def dims_from_config(config: dict[str, Any], path: Path) -> tuple[TextDims, VisionDims]:
    """Text dims as Qwen2-VL's; the ViT from ``hidden_size``/``intermediate_size``/``out_hidden_size``."""
    text = qwen2vl.text_dims_from_config(config, path)
    vc = config.get("vision_config")
    if not isinstance(vc, dict):
        raise ModelError("no vision_config", path=path)
    vpath = Path(f"{path} (vision_config)")
    embed = need_number(vc, "hidden_size", vpath)
    depth = need_number(vc, "depth", vpath)
    full = vc.get("fullatt_block_indexes", [])
    if not isinstance(full, list) or not all(isinstance(i, int) and 0 <= i < depth for i in full):
        raise ModelError(f"fullatt_block_indexes must list blocks 0..{depth - 1}, got {full!r}", path=vpath)
    vision = VisionDims(
        embed_dim=embed,
        depth=depth,
        num_heads=need_number(vc, "num_heads", vpath),
        mlp_dim=need_number(vc, "intermediate_size", vpath),
        patch_size=int(vc.get("patch_size", qwen2vl.PATCH_SIZE)),
        temporal_patch_size=int(vc.get("temporal_patch_size", qwen2vl.TEMPORAL_PATCH_SIZE)),
        in_channels=int(vc.get("in_chans", vc.get("in_channels", 3))),
        spatial_merge_size=int(vc.get("spatial_merge_size", qwen2vl.MERGE_SIZE)),
        out_hidden_size=need_number(vc, "out_hidden_size", vpath),
        hidden_act=str(vc.get("hidden_act", "silu")),
        layer_norm_eps=text.rms_norm_eps,
        window_size=int(vc.get("window_size", LLAMA_WINDOW_SIZE)),
        fullatt_block_indexes=tuple(full),
    )
    check_vision_widths(
        merger_key="out_hidden_size",
        merger_out=vision.out_hidden_size,
        text_hidden=text.hidden_size,
        embed_key="hidden_size",
        embed=embed,
        heads=vision.num_heads,
        path=path,
    )
    return text, vision


# ------------------------------------------------------------------------------------------ tensors


#: Block tensor suffix -> shape rule: the RMSNorms have weights only; the MLP is gated, with biases.
def _vision_block(e: int, m: int) -> list[tuple[str, tuple[int, ...], str]]:
    return [
        ("norm1.weight", (e,), "norm_weight"),
        ("attn.qkv.weight", (3 * e, e), "normal"),
        ("attn.qkv.bias", (3 * e,), "normal"),
        ("attn.proj.weight", (e, e), "normal"),
        ("attn.proj.bias", (e,), "normal"),
        ("norm2.weight", (e,), "norm_weight"),
        ("mlp.gate_proj.weight", (m, e), "normal"),
        ("mlp.gate_proj.bias", (m,), "normal"),
        ("mlp.up_proj.weight", (m, e), "normal"),
        ("mlp.up_proj.bias", (m,), "normal"),
        ("mlp.down_proj.weight", (e, m), "normal"),
        ("mlp.down_proj.bias", (e,), "normal"),
    ]


def _vision_tensors(
    e: int, m: int, depth: int, out: int, merge: int, patch: int, temporal: int, channels: int = 3
) -> list[tuple[str, tuple[int, ...], str]]:
    md = e * merge**2
    tensors = [("visual.patch_embed.proj.weight", (e, channels, temporal, patch, patch), "normal")]
    for i in range(depth):
        tensors += [(f"visual.blocks.{i}.{k}", s, init) for k, s, init in _vision_block(e, m)]
    tensors += [
        ("visual.merger.ln_q.weight", (e,), "norm_weight"),
        ("visual.merger.mlp.0.weight", (md, md), "normal"),
        ("visual.merger.mlp.0.bias", (md,), "normal"),
        ("visual.merger.mlp.2.weight", (out, md), "normal"),
        ("visual.merger.mlp.2.bias", (out,), "normal"),
    ]
    return tensors


def expected_shapes(text: TextDims, vision: VisionDims) -> dict[str, tuple[int, ...]]:
    """Every tensor a Qwen2.5-VL checkpoint with these dims holds (original names), with its shape."""
    shapes = qwen2vl.text_expected_shapes(text)
    v = vision
    for name, shape, _ in _vision_tensors(
        v.embed_dim,
        v.mlp_dim,
        v.depth,
        v.out_hidden_size,
        v.spatial_merge_size,
        v.patch_size,
        v.temporal_patch_size,
        v.in_channels,
    ):
        shapes[name] = shape
    return shapes


# ------------------------------------------------------------------------------------------ GGUF maps

#: Block tensors -> mmproj names (llama.cpp's tensor_mapping: ``mlp.gate_proj`` is ``ffn_gate``, ...).
MMPROJ_BLOCK_MAP = {
    "norm1.weight": "ln1.weight",
    "norm2.weight": "ln2.weight",
    "attn.proj.weight": "attn_out.weight",
    "attn.proj.bias": "attn_out.bias",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.gate_proj.bias": "ffn_gate.bias",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.up_proj.bias": "ffn_up.bias",
    "mlp.down_proj.weight": "ffn_down.weight",
    "mlp.down_proj.bias": "ffn_down.bias",
}
MMPROJ_MERGER_MAP = {
    "visual.merger.ln_q.weight": "v.post_ln.weight",
    "visual.merger.mlp.0.weight": "mm.0.weight",
    "visual.merger.mlp.0.bias": "mm.0.bias",
    "visual.merger.mlp.2.weight": "mm.2.weight",
    "visual.merger.mlp.2.bias": "mm.2.bias",
}


def window_pattern(full: tuple[int, ...], depth: int) -> int | None:
    """llama.cpp's ``n_wa_pattern`` for these full-attention blocks, or None when it cannot express them
    (it makes block ``i`` full exactly when ``(i + 1) % n == 0``)."""
    if not full:
        return None
    n = full[0] + 1
    return n if set(full) == {i for i in range(depth) if (i + 1) % n == 0} else None


# ------------------------------------------------------------------------------------------ the family


class Qwen25VLFamily(Qwen2VLFamily):
    """Qwen2.5-VL: Qwen2-VL's text model, tokens and image grid; its own ViT, merger width and projector."""

    name: ClassVar[str] = "Qwen2.5-VL"
    models: ClassVar[str] = "Qwen2.5-VL"
    hf_architectures: ClassVar[tuple[str, ...]] = ("Qwen2_5_VLForConditionalGeneration",)
    hf_model_types: ClassVar[tuple[str, ...]] = ("qwen2_5_vl",)
    #: mlx-vlm's qwen2_5_vl runs its vision tower on its own (``cached_image_features``) like Qwen2-VL's.
    mlx_split_vision: ClassVar[bool] = True
    aliases = ("qwen2.5-vl", "qwen2_5_vl", "qwen2.5vl")
    hf_processor_class = "Qwen2_5_VLProcessor"
    system_prompt = SYSTEM_PROMPT
    synth_shapes = SYNTH_SHAPES

    VisionDims = VisionDims
    dims_from_config = staticmethod(dims_from_config)
    merger_width = staticmethod(merger_width)
    expected_shapes = staticmethod(expected_shapes)

    @property
    def gguf_projector(self) -> str:
        from gguf import VisionProjectorType

        return VisionProjectorType.QWEN25VL

    # ---- synthetic checkpoints
    def synth_config(self, shape: SynthShape, ids: dict[str, int], torch_dtype: str) -> dict[str, Any]:
        """The published layout: Qwen2-VL's flat text fields, the ViT's own vision_config keys."""
        s = shape
        cfg = {"architectures": [self.hf_architectures[0]], **qwen2vl.synth_text_config(s, ids, torch_dtype)}
        cfg["model_type"] = self.hf_model_types[0]
        cfg["vision_config"] = {
            "depth": s.vision_depth,
            "hidden_act": "silu",
            "hidden_size": s.vision_embed_dim,
            "intermediate_size": s.vision_intermediate_size,
            "num_heads": s.vision_num_heads,
            "in_chans": 3,
            "out_hidden_size": s.hidden_size,
            "patch_size": s.patch_size,
            "spatial_merge_size": s.spatial_merge_size,
            "spatial_patch_size": s.patch_size,
            "window_size": s.window_size,
            "fullatt_block_indexes": list(s.fullatt_block_indexes),
            "tokens_per_second": 2,
            "temporal_patch_size": s.temporal_patch_size,
        }
        return cfg

    def synth_tensors(self, shape: SynthShape) -> list[tuple[str, tuple[int, ...], str]]:
        s = shape
        return qwen2vl.synth_text_tensors(s) + _vision_tensors(
            s.vision_embed_dim,
            s.vision_intermediate_size,
            s.vision_depth,
            s.hidden_size,
            s.spatial_merge_size,
            s.patch_size,
            s.temporal_patch_size,
        )

    # ---- GGUF
    def check_mmproj_supported(self, ckpt: Any) -> None:
        qwen2vl.check_mmproj_common(ckpt, self.gguf_projector)
        v, path = ckpt.vision, ckpt.folder / "config.json"
        if v.hidden_act != "silu":
            raise ModelError(
                f"vision hidden_act {v.hidden_act!r} is not supported (Qwen2.5-VL uses silu)", path=path
            )
        if v.window_size != LLAMA_WINDOW_SIZE:
            raise ModelError(
                f"vision window_size is {v.window_size}; llama.cpp's {self.gguf_projector} runs only "
                f"{LLAMA_WINDOW_SIZE}-pixel windows",
                path=path,
            )
        if window_pattern(v.fullatt_block_indexes, v.depth) is None:
            raise ModelError(
                f"fullatt_block_indexes {list(v.fullatt_block_indexes)} are not every n-th block, which is "
                f"all llama.cpp's {self.gguf_projector} can express",
                path=path,
            )

    def mmproj_tensors(self, ckpt: Any) -> list[tuple[str, str, Any]]:
        return qwen2vl.mmproj_tensors(ckpt, MMPROJ_BLOCK_MAP, MMPROJ_MERGER_MAP)

    def mmproj_family_keys(self, writer: Any, ckpt: Any) -> None:
        """SiLU in the ViT's MLP, and the window-attention period."""
        writer.add_vision_use_silu(True)
        writer.add_vision_n_wa_pattern(window_pattern(ckpt.vision.fullatt_block_indexes, ckpt.vision.depth))


FAMILY = Qwen25VLFamily()
