"""Synthetic Qwen2.5-VL checkpoints: Qwen2-VL's files with the published Qwen2.5-VL ``vision_config``.

The processor and tokenizer files are Qwen2-VL's with the family's own processor class and default system
prompt (its chat template's "You are a helpful assistant.").
"""

from __future__ import annotations

from typing import Any

from qvq_local.convert.synth_qwen2vl import Qwen2VLWriter
from qvq_local.convert.synth_writer import register

from qvq_local.families import qwen2_5vl
from qvq_local.families.qwen2_5vl import Qwen25SynthShape


@register(qwen2_5vl.FAMILY.name)
class Qwen25VLWriter(Qwen2VLWriter):
    """Qwen2.5-VL checkpoints."""

    def config(self, shape: Qwen25SynthShape, ids: dict[str, int], torch_dtype: str) -> dict[str, Any]:
        """Qwen2-VL's layout, with the ViT's own vision_config keys."""
        s = shape
        cfg = super().config(s, ids, torch_dtype)
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
