"""Qwen3-VL's GGUF pair: llama.cpp's ``qwen3vl`` text model and ``qwen3vl_merger`` mmproj with DeepStack.

What differs from the generic converter, after llama.cpp's own (``conversion/qwen3vl.py`` in the
llama-cpp-python 0.3.36 sdist): the text model is Qwen3 (q/k RMSNorm, no attention biases) and states
its head size (not width / heads on 4B) and its DeepStack layer count; the mmproj keeps ``attn.qkv``
fused (clip's qwen3vl graph reads ``attn_qkv``), carries the patch bias, the learned position table
(always F32: clip interpolates it with ggml_interpolate, which takes F32 only) and one merger per
DeepStack layer (``v.deepstack.<ViT layer>.*``), and writes its keys in llama.cpp's order, with
``clip.vision.is_deepstack_layers`` marking the ViT layers they read.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

from qvq_local.convert.gguf_converter import GgufConverter, register
from qvq_local.convert.gguf_text import Vocab

from qvq_local.errors import ModelError
from qvq_local.families import qwen3vl


@register(qwen3vl.FAMILY.name)
class Qwen3VLConverter(GgufConverter):
    """Qwen3-VL (dense): Qwen3 text layers; a ViT with a position table and DeepStack mergers."""

    text_layer_map: ClassVar[dict[str, str]] = {
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
    #: ViT block suffix -> mmproj name; ``attn.qkv`` stays fused.
    mmproj_block_map: ClassVar[dict[str, str]] = {
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
    mmproj_merger_map: ClassVar[dict[str, str]] = {
        "norm.weight": "v.post_ln.weight",
        "norm.bias": "v.post_ln.bias",
        "linear_fc1.weight": "mm.0.weight",
        "linear_fc1.bias": "mm.0.bias",
        "linear_fc2.weight": "mm.2.weight",
        "linear_fc2.bias": "mm.2.bias",
    }
    #: DeepStack merger suffix -> mmproj name; ``{}`` is the ViT layer the merger reads (not its list index).
    #: The text architecture reads a DeepStack layer count (``n_deepstack_layers``).
    deepstack_key: ClassVar[bool] = True
    mmproj_deepstack_map: ClassVar[dict[str, str]] = {
        "norm.weight": "v.deepstack.{}.norm.weight",
        "norm.bias": "v.deepstack.{}.norm.bias",
        "linear_fc1.weight": "v.deepstack.{}.fc1.weight",
        "linear_fc1.bias": "v.deepstack.{}.fc1.bias",
        "linear_fc2.weight": "v.deepstack.{}.fc2.weight",
        "linear_fc2.bias": "v.deepstack.{}.fc2.bias",
    }

    def check_supported(self) -> None:
        super().check_supported()
        v, path, fam = self.ckpt.vision, self.ckpt.folder / "config.json", self.family
        if v.spatial_merge_size != fam.merge_size:
            raise ModelError(
                f"vision spatial_merge_size is {v.spatial_merge_size}; llama.cpp's {fam.gguf_projector} "
                f"merges {fam.merge_size}x{fam.merge_size} only",
                path=path,
            )
        if v.in_channels != 3:
            raise ModelError(f"vision in_channels is {v.in_channels}; only RGB (3) is supported", path=path)
        if v.hidden_act not in ("gelu_pytorch_tanh", "gelu"):
            raise ModelError(
                f"vision hidden_act {v.hidden_act!r} is not supported ({fam.name} uses gelu)", path=path
            )

    # ---- the text model
    def add_text_keys(self, w: Any, vocab: Vocab, file_type: int, name: str) -> None:
        """The generic keys, then the head size (not width / heads on 4B) and the DeepStack layer count
        (where the text architecture reads one: :attr:`deepstack_key`)."""
        from gguf import Keys

        super().add_text_keys(w, vocab, file_type, name)
        w.add_key_length(self.ckpt.text.head_dim)
        w.add_value_length(self.ckpt.text.head_dim)
        if self.deepstack_key:
            w.add_uint32(
                Keys.LLM.NUM_DEEPSTACK_LAYERS.format(arch=self.family.gguf_text_arch),
                len(self.ckpt.vision.deepstack_visual_indexes),
            )

    # ---- the mmproj
    def mmproj_tensors(self) -> list[tuple[str, str, Any]]:
        """The patch kernel's frames, the patch bias, the position table, the blocks, the merger, then
        each DeepStack merger."""
        out = super().mmproj_tensors()
        vp, vision = self.family.vision_prefix, self.ckpt.vision
        pairs = [
            (vp + "patch_embed.proj.bias", "v.patch_embd.bias"),
            (vp + "pos_embed.weight", "v.position_embd.weight"),
        ]
        for i in range(vision.depth):
            pairs += [(f"{vp}blocks.{i}.{k}", f"v.blk.{i}.{g}") for k, g in self.mmproj_block_map.items()]
        pairs += [(f"{vp}merger.{k}", g) for k, g in self.mmproj_merger_map.items()]
        for k, layer in enumerate(vision.deepstack_visual_indexes):
            pairs += [
                (f"{vp}deepstack_merger_list.{k}.{s}", g.format(layer))
                for s, g in self.mmproj_deepstack_map.items()
            ]
        return out + [(gname, src, None) for src, gname in pairs]

    def mmproj_tensor_type(self, source: str, shape: tuple[int, ...], weight_type: str) -> str:
        """The generic rule, but the position table stays F32 whatever the mmproj type."""
        qtype = super().mmproj_tensor_type(source, shape, weight_type)
        return "F32" if source.endswith("pos_embed.weight") else qtype

    def mmproj_image_size(self) -> int:
        """The side of the position table's grid in pixels."""
        v = self.ckpt.vision
        return math.isqrt(v.num_position_embeddings) * v.patch_size

    def add_mmproj_keys(self, w: Any, file_type: int, name: str, mean: list[float], std: list[float]) -> None:
        super().add_mmproj_keys(w, file_type, name, mean, std)
        v = self.ckpt.vision
        w.add_vision_image_mean(mean)
        w.add_vision_image_std(std)
        w.add_vision_use_gelu(True)
        w.add_vision_spatial_merge_size(v.spatial_merge_size)
        # llama.cpp's converter uses the text model's RMS epsilon for the ViT's LayerNorms (both 1e-6)
        w.add_vision_attention_layernorm_eps(self.ckpt.text.rms_norm_eps)
        w.add_vision_is_deepstack_layers([i in v.deepstack_visual_indexes for i in range(v.depth)])
