"""The Qwen2.5-VL family: Qwen2.5-VL-3B/7B/32B/72B-Instruct.

Qwen2.5-VL keeps Qwen2-VL's language model (Qwen2 with M-RoPE: llama.cpp's text architecture ``qwen2vl``),
its tokens, its 14-pixel patches merged 2x2 and its resize rule, so :class:`Qwen25VLFamily` inherits those
facts from :class:`~qvq_local.families.qwen2vl.Qwen2VLFamily` and states only what differs, all in the
vision tower:

* ``vision_config`` names the ViT width ``hidden_size`` (Qwen2-VL: ``embed_dim``), its MLP width
  ``intermediate_size``, and the merger's output ``out_hidden_size`` (the text width);
* each block uses RMSNorm (weight only) and a gated SiLU MLP (``gate_proj``/``up_proj``/``down_proj``,
  with biases); the merger's ``ln_q`` is an RMSNorm too;
* attention is windowed (``window_size`` pixels a side) except in the blocks ``fullatt_block_indexes``
  lists, which llama.cpp stores as one period ``clip.vision.n_wa_pattern`` (block ``i`` is full when
  ``(i + 1) % n == 0``), and its mtmd always uses 112-pixel windows;
* the GGUF projector is ``qwen2.5vl_merger`` (gguf-py's ``VisionProjectorType.QWEN25VL``); the
  converter's tensor maps and ``clip.use_silu`` are in ``convert/gguf_qwen2_5vl.py``.

Published sizes (``synth_shapes``) were checked against the published configs: see
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

#: The window (pixels a side) llama.cpp's mtmd uses for this projector; it does not read the config's
#: (transformers' default, and every published config's, is the same).
LLAMA_WINDOW_SIZE = 112


@dataclass(frozen=True)
class VisionDims(qwen2vl.VisionDims):
    """Qwen2-VL's vision dims plus the window attention facts."""

    window_size: int = LLAMA_WINDOW_SIZE
    fullatt_block_indexes: tuple[int, ...] = ()


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
    aliases: ClassVar[tuple[str, ...]] = ("qwen2.5-vl", "qwen2_5_vl", "qwen2.5vl")
    hf_architectures: ClassVar[tuple[str, ...]] = ("Qwen2_5_VLForConditionalGeneration",)
    hf_model_types: ClassVar[tuple[str, ...]] = ("qwen2_5_vl",)
    hf_processor_class: ClassVar[str] = "Qwen2_5_VLProcessor"
    #: mlx-vlm's qwen2_5_vl runs its vision tower on its own (``cached_image_features``) like Qwen2-VL's.
    mlx_split_vision: ClassVar[bool] = True
    #: Absolute-time M-RoPE: a temporal patch's position is its time in seconds times
    #: ``vision_config.tokens_per_second`` (2 in every published config), not its index.
    video_time: ClassVar[str] = "seconds"
    video_tokens_per_second: ClassVar[int] = 2
    #: Every Qwen2.5-VL model takes video.
    video_refused_by: ClassVar[tuple[str, ...]] = ()
    #: The published Instruct models' default system prompt (their chat template's).
    system_prompt: ClassVar[str] = "You are a helpful assistant."
    #: Below :class:`Qwen25SynthShape`.
    synth_shapes: ClassVar[dict[str, Any]]

    @property
    def gguf_projector(self) -> str:
        from gguf import VisionProjectorType

        return VisionProjectorType.QWEN25VL

    # ---- config.json
    def merger_width(self, config: dict[str, Any]) -> Any:
        """The merger projects into ``vision_config.out_hidden_size`` (``hidden_size`` there is the ViT's)."""
        vision = config.get("vision_config")
        return vision.get("out_hidden_size") if isinstance(vision, dict) else None

    def dims_from_config(self, config: dict[str, Any], path: Path) -> tuple[TextDims, VisionDims]:
        """Text dims as Qwen2-VL's; the ViT from ``hidden_size``/``intermediate_size``/``out_hidden_size``."""
        text = self.text_dims(config, path)
        vc = config.get("vision_config")
        if not isinstance(vc, dict):
            raise ModelError("no vision_config", path=path)
        vpath = Path(f"{path} (vision_config)")
        embed = need_number(vc, "hidden_size", vpath)
        depth = need_number(vc, "depth", vpath)
        full = vc.get("fullatt_block_indexes", [])
        if not isinstance(full, list) or not all(isinstance(i, int) and 0 <= i < depth for i in full):
            raise ModelError(
                f"fullatt_block_indexes must list blocks 0..{depth - 1}, got {full!r}", path=vpath
            )
        vision = VisionDims(
            embed_dim=embed,
            depth=depth,
            num_heads=need_number(vc, "num_heads", vpath),
            mlp_dim=need_number(vc, "intermediate_size", vpath),
            patch_size=int(vc.get("patch_size", self.patch_size)),
            temporal_patch_size=int(vc.get("temporal_patch_size", self.temporal_patch_size)),
            in_channels=int(vc.get("in_chans", vc.get("in_channels", 3))),
            spatial_merge_size=int(vc.get("spatial_merge_size", self.merge_size)),
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

    # ---- tensors
    def vision_shapes(self, vision: VisionDims) -> dict[str, tuple[int, ...]]:
        """The ViT: RMSNorms with weights only, a gated MLP with biases, the RMSNorm + 2-layer merger."""
        e, m, md, out = vision.embed_dim, vision.mlp_dim, vision.merged_dim, vision.out_hidden_size
        p = vision.patch_size
        shapes: dict[str, tuple[int, ...]] = {
            "visual.patch_embed.proj.weight": (e, vision.in_channels, vision.temporal_patch_size, p, p)
        }
        for i in range(vision.depth):
            b = f"visual.blocks.{i}."
            shapes.update(
                {
                    b + "norm1.weight": (e,),
                    b + "attn.qkv.weight": (3 * e, e),
                    b + "attn.qkv.bias": (3 * e,),
                    b + "attn.proj.weight": (e, e),
                    b + "attn.proj.bias": (e,),
                    b + "norm2.weight": (e,),
                    b + "mlp.gate_proj.weight": (m, e),
                    b + "mlp.gate_proj.bias": (m,),
                    b + "mlp.up_proj.weight": (m, e),
                    b + "mlp.up_proj.bias": (m,),
                    b + "mlp.down_proj.weight": (e, m),
                    b + "mlp.down_proj.bias": (e,),
                }
            )
        shapes.update(
            {
                "visual.merger.ln_q.weight": (e,),
                "visual.merger.mlp.0.weight": (md, md),
                "visual.merger.mlp.0.bias": (md,),
                "visual.merger.mlp.2.weight": (out, md),
                "visual.merger.mlp.2.bias": (out,),
            }
        )
        return shapes


# ------------------------------------------------------------------------------------------ published sizes


@dataclass(frozen=True)
class Qwen25SynthShape(SynthShape):
    """A Qwen2.5-VL model: Qwen2-VL's text fields plus the ViT's own widths and windows.  The ViT is the
    same at every published size."""

    vision_intermediate_size: int = 3420
    window_size: int = LLAMA_WINDOW_SIZE
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    vision_depth: int = 32
    vision_embed_dim: int = 1280
    vision_num_heads: int = 16
    max_position_embeddings: int = 128000
    family: str = Qwen25VLFamily.name


def _shape(name: str, **kw: Any) -> Qwen25SynthShape:
    return Qwen25SynthShape(name=name, mrope_section=(16, 24, 24), **kw)


Qwen25VLFamily.synth_shapes = {
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

FAMILY = Qwen25VLFamily()
