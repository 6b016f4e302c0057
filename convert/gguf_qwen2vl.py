"""Qwen2-VL's GGUF pair (QVQ-72B-Preview's): llama.cpp's ``qwen2vl`` text model and ``qwen2vl_merger`` mmproj.

llama.cpp's ``qwen2vl`` text model is Qwen2 with multimodal RoPE: every tensor keeps its data and takes
llama.cpp's name.  The mmproj splits each block's fused ``attn.qkv`` by rows into ``attn_q``/``attn_k``/
``attn_v`` and names the merger ``v.post_ln`` (its LayerNorm) and ``mm.0``/``mm.2`` (its two linear
layers), as llama.cpp's converter does (``conversion/qwenvl.py``).
"""

from __future__ import annotations

from typing import Any, ClassVar

from qvq_local.convert.gguf_converter import GgufConverter, register

from qvq_local.errors import ModelError
from qvq_local.families import qwen2vl


@register(qwen2vl.FAMILY.name)
class Qwen2VLConverter(GgufConverter):
    """Qwen2-VL: biased q/k/v in the text model; a LayerNorm ViT with a quick-GELU MLP."""

    text_layer_map: ClassVar[dict[str, str]] = {
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
    #: ViT block tensor suffix -> mmproj block tensor name (the fused ``attn.qkv`` is split apart).
    mmproj_block_map: ClassVar[dict[str, str]] = {
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
    #: Merger tensor suffix -> mmproj name.
    mmproj_merger_map: ClassVar[dict[str, str]] = {
        "ln_q.weight": "v.post_ln.weight",
        "ln_q.bias": "v.post_ln.bias",
        "mlp.0.weight": "mm.0.weight",
        "mlp.0.bias": "mm.0.bias",
        "mlp.2.weight": "mm.2.weight",
        "mlp.2.bias": "mm.2.bias",
    }
    #: The ViT activation llama.cpp's projector runs (clip's default, quick-GELU, for this projector).
    vision_act: ClassVar[str] = "quick_gelu"

    def check_supported(self) -> None:
        super().check_supported()
        v, path = self.ckpt.vision, self.ckpt.folder / "config.json"
        if v.in_channels != 3:
            raise ModelError(f"vision in_chans is {v.in_channels}; only RGB (3) is supported", path=path)
        if v.hidden_act != self.vision_act:
            raise ModelError(
                f"vision hidden_act {v.hidden_act!r} is not supported ({self.family.name} uses {self.vision_act})",
                path=path,
            )

    def mmproj_tensors(self) -> list[tuple[str, str, Any]]:
        """The patch kernel's frames, then each block (q/k/v split by rows, the rest renamed), then the
        merger."""
        out = super().mmproj_tensors()
        vp = self.family.vision_prefix
        for i in range(self.ckpt.vision.depth):
            pre, gpre = f"{vp}blocks.{i}.", f"v.blk.{i}."
            for part in ("weight", "bias"):
                for k, letter in enumerate("qkv"):
                    out.append((f"{gpre}attn_{letter}.{part}", f"{pre}attn.qkv.{part}", ("rows", k, 3)))
            out += [(gpre + g, pre + src, None) for src, g in self.mmproj_block_map.items()]
        out += [(g, f"{vp}merger.{src}", None) for src, g in self.mmproj_merger_map.items()]
        return out

    def mmproj_image_size(self) -> int:
        """560, what llama.cpp's converter writes for this projector (mtmd uses it for its warm-up only)."""
        return 560

    def add_mmproj_keys(self, w: Any, file_type: int, name: str, mean: list[float], std: list[float]) -> None:
        super().add_mmproj_keys(w, file_type, name, mean, std)
        v = self.ckpt.vision
        w.add_vision_attention_layernorm_eps(v.layer_norm_eps)
        w.add_vision_spatial_merge_size(v.spatial_merge_size)
        w.add_vision_image_mean(mean)
        w.add_vision_image_std(std)
