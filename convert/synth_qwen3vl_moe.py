"""Synthetic Qwen3-VL MoE checkpoints, Thinking or Instruct, in the published layout.

Qwen3-VL's files (``convert/synth_qwen3vl.py``: tokenizer, templates, processor) with the MoE config:
``text_config`` carries the experts (``num_experts``, ``num_experts_per_tok``, ``moe_intermediate_size``,
``decoder_sparse_step``, ``mlp_only_layers``, ``norm_topk_prob``, ``router_aux_loss_coef``) and the text and
vision ``model_type`` spellings of Qwen3-VL-30B-A3B's config.json.
"""

from __future__ import annotations

from typing import Any

from qvq_local.convert.synth_qwen3vl import Qwen3VLWriter
from qvq_local.convert.synth_writer import register

from qvq_local.families import qwen3vl_moe
from qvq_local.families.qwen3vl_moe import MoeSynthShape


@register(qwen3vl_moe.FAMILY.name)
class Qwen3VLMoeWriter(Qwen3VLWriter):
    """Qwen3-VL MoE checkpoints: ``qvq synth --family qwen3-vl-moe`` gives the Thinking variant."""

    def config(self, shape: MoeSynthShape, ids: dict[str, int], torch_dtype: str) -> dict[str, Any]:
        """Qwen3-VL's config.json with the experts in ``text_config``."""
        cfg = super().config(shape, ids, torch_dtype)
        s = shape
        cfg["text_config"].update(
            {
                "decoder_sparse_step": s.decoder_sparse_step,
                "mlp_only_layers": list(s.mlp_only_layers),
                "model_type": "qwen3_vl_moe_text",
                "moe_intermediate_size": s.moe_intermediate_size,
                "norm_topk_prob": True,
                "num_experts": s.num_experts,
                "num_experts_per_tok": s.num_experts_per_tok,
                "router_aux_loss_coef": 0.001,
            }
        )
        cfg["text_config"] = dict(sorted(cfg["text_config"].items()))
        return cfg
