"""Synthetic Qwen3.5 checkpoints, dense and MoE, in the published layout.

config.json nests ``text_config`` (the layer types, DeltaNet dims, ``rope_parameters`` with the partial
rotation, the MTP block's size; the MoE's experts and shared expert) and ``vision_config`` (Qwen3-VL's ViT
with an empty ``deepstack_visual_indexes``); the preprocessor is Qwen3-VL's; the tokenizer is the trained
byte-level BPE split with Qwen3.5's pattern, with Qwen3's 26 added tokens from the family's base (248044
at the published sizes: the real vocabulary is not available offline, so its first 248,044 entries are
the trained tokens and fillers); the chat template is the family's, thinking by default or not as the
size ships it (variant ``published``), or as asked (``thinking`` / ``non-thinking``).
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

from qvq_local.convert import tokenizer_synth
from qvq_local.convert.synth_qwen3vl import Qwen3VLWriter, build_tokenizer_json
from qvq_local.convert.synth_writer import register

from qvq_local.families import qwen3_5
from qvq_local.families.qwen3_5 import Qwen35SynthShape


def _json(data: dict) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


@register(qwen3_5.FAMILY.name, qwen3_5.MOE_FAMILY.name)
class Qwen35Writer(Qwen3VLWriter):
    """Qwen3.5 and Qwen3.5-MoE checkpoints (``qvq synth --family qwen3.5 | qwen3.5-moe``)."""

    #: ``published``: the template the size ships (0.8B/2B do not think by default, larger ones do).
    variants: ClassVar[tuple[str, ...]] = ("published", "thinking", "non-thinking")
    transformers_version: ClassVar[str] = "4.57.0.dev0"

    def config(self, shape: Qwen35SynthShape, ids: dict[str, int], torch_dtype: str) -> dict[str, Any]:
        """config.json in the published layout."""
        s, fam = shape, self.family
        layer_types = [
            "linear_attention" if (i + 1) % s.full_attention_interval else "full_attention"
            for i in range(s.num_hidden_layers)
        ]
        text: dict[str, Any] = {
            "attention_bias": False,
            "attention_dropout": 0.0,
            "attn_output_gate": True,
            "dtype": torch_dtype,
            "eos_token_id": ids["<|endoftext|>"],
            "full_attention_interval": s.full_attention_interval,
            "head_dim": s.head_dim,
            "hidden_act": "silu",
            "hidden_size": s.hidden_size,
            "initializer_range": 0.02,
            "layer_types": layer_types,
            "linear_conv_kernel_dim": s.linear_conv_kernel_dim,
            "linear_key_head_dim": s.linear_key_head_dim,
            "linear_num_key_heads": s.linear_num_key_heads,
            "linear_num_value_heads": s.linear_num_value_heads,
            "linear_value_head_dim": s.linear_value_head_dim,
            "mamba_ssm_dtype": "float32",
            "max_position_embeddings": s.max_position_embeddings,
            "mlp_only_layers": [],
            "model_type": fam.hf_model_types[0] + "_text",
            "mtp_num_hidden_layers": s.mtp_num_hidden_layers,
            "mtp_use_dedicated_embeddings": False,
            "num_attention_heads": s.num_attention_heads,
            "num_hidden_layers": s.num_hidden_layers,
            "num_key_value_heads": s.num_key_value_heads,
            "rms_norm_eps": s.rms_norm_eps,
            "rope_parameters": {
                "mrope_interleaved": True,
                "mrope_section": list(s.mrope_section),
                "partial_rotary_factor": s.partial_rotary_factor,
                "rope_theta": s.rope_theta,
                "rope_type": "default",
            },
            "tie_word_embeddings": s.tie_word_embeddings,
            "use_cache": True,
            "vocab_size": s.vocab_size,
        }
        if s.num_experts:
            text.update(
                {
                    "moe_intermediate_size": s.moe_intermediate_size,
                    "num_experts": s.num_experts,
                    "num_experts_per_tok": s.num_experts_per_tok,
                    "router_aux_loss_coef": 0.001,
                    "shared_expert_intermediate_size": s.shared_expert_intermediate_size,
                }
            )
        else:
            text["intermediate_size"] = s.intermediate_size
        return {
            "architectures": [fam.hf_architectures[0]],
            "image_token_id": ids[fam.image_pad],
            "model_type": fam.hf_model_types[0],
            "text_config": dict(sorted(text.items())),
            "tie_word_embeddings": s.tie_word_embeddings,
            "transformers_version": self.transformers_version,
            "video_token_id": ids["<|video_pad|>"],
            "vision_config": {
                "deepstack_visual_indexes": list(s.deepstack_visual_indexes),
                "depth": s.vision_depth,
                "hidden_act": "gelu_pytorch_tanh",
                "hidden_size": s.vision_hidden_size,
                "in_channels": 3,
                "initializer_range": 0.02,
                "intermediate_size": s.vision_intermediate_size,
                "model_type": fam.hf_model_types[0],
                "num_heads": s.vision_num_heads,
                "num_position_embeddings": s.num_position_embeddings,
                "out_hidden_size": s.hidden_size,
                "patch_size": fam.patch_size,
                "spatial_merge_size": fam.merge_size,
                "temporal_patch_size": fam.temporal_patch_size,
            },
            "vision_end_token_id": ids["<|vision_end|>"],
            "vision_start_token_id": ids["<|vision_start|>"],
        }

    def tokenizer_files(self, shape: Qwen35SynthShape, kind: str, variant: str | None) -> dict[str, str]:
        """The tokenizer (Qwen3.5's split pattern) and the template of ``variant``, name -> text."""
        thinks = shape.thinks_by_default if variant in (None, "published") else variant == "thinking"
        template = qwen3_5.chat_template(thinks_by_default=thinks)
        base = shape.tokenizer_base
        return {
            "tokenizer_config.json": _json(self.tokenizer_config(base, template)),
            "chat_template.json": _json({"chat_template": template}),
            "tokenizer.json": build_tokenizer_json(
                base, kind, self.family.special_tokens, self.family.pretokenizer_pattern
            ),
            **tokenizer_synth.vocab_files(kind, base),
        }
