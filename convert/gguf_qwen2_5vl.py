"""Qwen2.5-VL's GGUF pair: Qwen2-VL's (its text model is the same), with its own ViT in the mmproj.

The ``qwen2.5vl_merger`` mmproj has RMSNorms (weights only), a gated SiLU MLP (``ffn_gate``/``ffn_up``/
``ffn_down``), ``clip.use_silu``, and the full-attention blocks as one period ``clip.vision.n_wa_pattern``
(llama.cpp makes block ``i`` full when ``(i + 1) % n == 0`` and always uses 112-pixel windows), as
llama.cpp's converter writes it (``conversion/qwenvl.py``).
"""

from __future__ import annotations

from typing import Any, ClassVar

from qvq_local.convert.gguf_converter import register
from qvq_local.convert.gguf_qwen2vl import Qwen2VLConverter

from qvq_local.errors import ModelError
from qvq_local.families import qwen2_5vl


def window_pattern(full: tuple[int, ...], depth: int) -> int | None:
    """llama.cpp's ``n_wa_pattern`` for these full-attention blocks, or None when it cannot express them
    (it makes block ``i`` full exactly when ``(i + 1) % n == 0``)."""
    if not full:
        return None
    n = full[0] + 1
    return n if set(full) == {i for i in range(depth) if (i + 1) % n == 0} else None


@register(qwen2_5vl.FAMILY.name)
class Qwen25VLConverter(Qwen2VLConverter):
    """Qwen2.5-VL: Qwen2-VL's converter with its own ViT block and merger names, SiLU and windows."""

    #: llama.cpp's tensor_mapping: ``mlp.gate_proj`` is ``ffn_gate``, ...; the norms have no bias.
    mmproj_block_map: ClassVar[dict[str, str]] = {
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
    mmproj_merger_map: ClassVar[dict[str, str]] = {
        "ln_q.weight": "v.post_ln.weight",
        "mlp.0.weight": "mm.0.weight",
        "mlp.0.bias": "mm.0.bias",
        "mlp.2.weight": "mm.2.weight",
        "mlp.2.bias": "mm.2.bias",
    }
    vision_act: ClassVar[str] = "silu"

    def check_supported(self) -> None:
        super().check_supported()
        v, path, projector = self.ckpt.vision, self.ckpt.folder / "config.json", self.family.gguf_projector
        if v.window_size != qwen2_5vl.LLAMA_WINDOW_SIZE:
            raise ModelError(
                f"vision window_size is {v.window_size}; llama.cpp's {projector} runs only "
                f"{qwen2_5vl.LLAMA_WINDOW_SIZE}-pixel windows",
                path=path,
            )
        if window_pattern(v.fullatt_block_indexes, v.depth) is None:
            raise ModelError(
                f"fullatt_block_indexes {list(v.fullatt_block_indexes)} are not every n-th block, which is "
                f"all llama.cpp's {projector} can express",
                path=path,
            )

    def add_mmproj_keys(self, w: Any, file_type: int, name: str, mean: list[float], std: list[float]) -> None:
        """Qwen2-VL's keys, then SiLU in the ViT's MLP and the window-attention period."""
        super().add_mmproj_keys(w, file_type, name, mean, std)
        v = self.ckpt.vision
        w.add_vision_use_silu(True)
        w.add_vision_n_wa_pattern(window_pattern(v.fullatt_block_indexes, v.depth))
