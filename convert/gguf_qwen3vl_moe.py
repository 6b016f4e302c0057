"""Qwen3-VL MoE's GGUF pair: llama.cpp's ``qwen3vlmoe`` text model and Qwen3-VL's ``qwen3vl_merger`` mmproj.

What differs from Qwen3-VL's converter, after llama.cpp's own (``Qwen3VLMoeTextModel`` in
``conversion/qwen3vl.py`` of the llama-cpp-python 0.3.36 sdist): each layer's MLP is the router
(``ffn_gate_inp``, always F32, as llama.cpp's converter and quantiser keep it) and the experts packed in
three 3-D tensors, which llama.cpp reads as ``ne = {in, out, expert}``, i.e. torch order ``[expert, out,
in]``: ``ffn_gate_exps`` and ``ffn_up_exps`` ``[experts, width, hidden]`` (the two halves of the published
``gate_up_proj`` ``[experts, hidden, 2 x width]``, transposed) and ``ffn_down_exps`` ``[experts, hidden,
width]`` (``down_proj`` ``[experts, width, hidden]``, transposed); the keys add the expert count, the
experts used per token and an expert's width.  llama.cpp's ``qwen3vlmoe`` has experts in every layer and
renormalises the top-k weights, as the published models do; a checkpoint with dense layers is refused.
The mmproj is Qwen3-VL's.
"""

from __future__ import annotations

from typing import Any, ClassVar

from qvq_local.convert.gguf_converter import register
from qvq_local.convert.gguf_qwen3vl import Qwen3VLConverter
from qvq_local.convert.gguf_text import TextSource, Vocab

from qvq_local.errors import ModelError
from qvq_local.families import qwen3vl_moe

#: The layer tensors llama.cpp keeps in F32 whatever the file type (its converter's rule).
ROUTER = "ffn_gate_inp.weight"


def _half(part: int, width: int):
    """Row-block select of one half of a published ``gate_up_proj`` (``part`` 0: gate, 1: up), transposed to
    ``[experts, width, hidden]``."""
    return lambda block: block[:, :, part * width : (part + 1) * width].transpose(0, 2, 1)


def _rows_half(part: int, width: int):
    """Row-block select of one half of a transformers-5 ``gate_up_proj`` ``[experts, 2 x width, hidden]``:
    already llama.cpp's order."""
    return lambda block: block[:, part * width : (part + 1) * width]


def _transposed(block):
    return block.transpose(0, 2, 1)


@register(qwen3vl_moe.FAMILY.name)
class Qwen3VLMoeConverter(Qwen3VLConverter):
    """Qwen3-VL MoE: Qwen3-VL's attention and vision tower; a router and packed experts per layer."""

    text_layer_map: ClassVar[dict[str, str]] = {
        k: v for k, v in Qwen3VLConverter.text_layer_map.items() if not k.startswith("mlp.")
    } | {"mlp.gate.weight": ROUTER}

    def check_supported(self) -> None:
        super().check_supported()
        text = self.ckpt.text
        dense = [i for i in range(text.num_layers) if not text.is_moe_layer(i)]
        if dense:
            raise ModelError(
                f"text layers {dense[:4]}{' ...' if len(dense) > 4 else ''} have a dense MLP "
                "(mlp_only_layers / decoder_sparse_step); llama.cpp's qwen3vlmoe needs experts in every layer",
                path=self.ckpt.folder / "config.json",
            )

    # ---- the text model
    def text_layer_tensors(self, layer: int) -> list[tuple[str | TextSource, str]]:
        """The attention and the router, then the experts: gate and up split out of ``gate_up_proj`` and
        each transposed, down transposed (a checkpoint saved by transformers 5 holds them in llama.cpp's
        order already: split only)."""
        text, p = self.ckpt.text, f"{self.family.text_prefix}layers.{layer}.mlp.experts."
        e, h, f = text.num_experts, text.hidden_size, text.moe_intermediate_size
        if self.family.experts_transposed(text, self.ckpt.shape(p + "gate_up_proj")):
            gate, up, down = _rows_half(0, f), _rows_half(1, f), None
        else:
            gate, up, down = _half(0, f), _half(1, f), _transposed
        b = f"blk.{layer}."
        return super().text_layer_tensors(layer) + [
            (TextSource(p + "gate_up_proj", select=gate, shape=(e, f, h)), b + "ffn_gate_exps.weight"),
            (TextSource(p + "gate_up_proj", select=up, shape=(e, f, h)), b + "ffn_up_exps.weight"),
            (TextSource(p + "down_proj", select=down, shape=(e, h, f)), b + "ffn_down_exps.weight"),
        ]

    def keep_f32(self, gguf_name: str) -> bool:
        """The routers stay F32."""
        return gguf_name.endswith(ROUTER)

    def add_text_keys(self, w: Any, vocab: Vocab, file_type: int, name: str) -> None:
        """Qwen3-VL's keys, then the experts: their count, how many one token uses, and their width."""
        super().add_text_keys(w, vocab, file_type, name)
        text = self.ckpt.text
        w.add_expert_count(text.num_experts)
        w.add_expert_used_count(text.num_experts_per_tok)
        w.add_expert_feed_forward_length(text.moe_intermediate_size)
