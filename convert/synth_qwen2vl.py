"""Synthetic Qwen2-VL checkpoints (QVQ-72B-Preview's layout): config, processor and tokenizer files.

The layout is the published one: flat text fields in config.json with a nested ``vision_config`` (no
``model_type`` there: mlx-vlm rejects it), the slow ``Qwen2VLImageProcessor`` with CLIP statistics, and
Qwen2-VL's chat template (chat_template.json of Qwen2-VL-*-Instruct) with the family's default system
prompt (QVQ's; Qwen2.5-VL ships the same template with its own).
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

from qvq_local.convert import tokenizer_synth
from qvq_local.convert.synth_writer import SynthWriter, register

from qvq_local.families import qwen2vl
from qvq_local.families.qwen2vl import SynthShape

_TEMPLATE_HEAD = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\n"
)
_TEMPLATE_TAIL = (
    "<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def chat_template(system_prompt: str) -> str:
    """The published Qwen2-VL chat template with this default system prompt.  Image parts render as
    ``<|vision_start|><|image_pad|><|vision_end|>``; the processor expands the pad."""
    return _TEMPLATE_HEAD + system_prompt + _TEMPLATE_TAIL


def _json(data: dict) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


@register(qwen2vl.FAMILY.name)
class Qwen2VLWriter(SynthWriter):
    """Qwen2-VL and QVQ-72B-Preview checkpoints."""

    transformers_version: ClassVar[str] = "4.47.0"

    def config(self, shape: SynthShape, ids: dict[str, int], torch_dtype: str) -> dict[str, Any]:
        """Flat text fields, nested vision_config."""
        s = shape
        cfg = {"architectures": [self.family.hf_architectures[0]], **self.text_config(s, ids, torch_dtype)}
        cfg["model_type"] = self.family.hf_model_types[0]
        cfg["vision_config"] = {
            "depth": s.vision_depth,
            "embed_dim": s.vision_embed_dim,
            "mlp_ratio": s.vision_mlp_ratio,
            "num_heads": s.vision_num_heads,
            "in_chans": 3,
            "hidden_size": s.vision_hidden_size,
            "patch_size": s.patch_size,
            "spatial_merge_size": s.spatial_merge_size,
            "spatial_patch_size": s.patch_size,
            "temporal_patch_size": s.temporal_patch_size,
        }
        return cfg

    def text_config(self, s: SynthShape, ids: dict[str, int], torch_dtype: str) -> dict[str, Any]:
        """The flat text fields of a Qwen2-VL-style config.json (Qwen2.5-VL shares them)."""
        if sum(s.mrope_section) * 2 != s.head_dim:
            raise ValueError(f"mrope_section {s.mrope_section} does not cover head_dim {s.head_dim}")
        return {
            "attention_dropout": 0.0,
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "vision_start_token_id": ids["<|vision_start|>"],
            "vision_end_token_id": ids["<|vision_end|>"],
            "vision_token_id": ids["<|vision_pad|>"],
            "image_token_id": ids["<|image_pad|>"],
            "video_token_id": ids["<|video_pad|>"],
            "hidden_act": "silu",
            "hidden_size": s.hidden_size,
            "initializer_range": 0.02,
            "intermediate_size": s.intermediate_size,
            "max_position_embeddings": s.max_position_embeddings,
            "max_window_layers": s.num_hidden_layers,
            "num_attention_heads": s.num_attention_heads,
            "num_hidden_layers": s.num_hidden_layers,
            "num_key_value_heads": s.num_key_value_heads,
            "rms_norm_eps": s.rms_norm_eps,
            "rope_theta": s.rope_theta,
            "sliding_window": 32768,
            "tie_word_embeddings": s.tie_word_embeddings,
            "torch_dtype": torch_dtype,
            "transformers_version": self.transformers_version,
            "use_cache": True,
            "use_sliding_window": False,
            "rope_scaling": {"type": "mrope", "mrope_section": list(s.mrope_section)},
            "vocab_size": s.vocab_size,
        }

    def preprocessor_config(self, shape: SynthShape) -> dict[str, Any]:
        """The slow Qwen2VLImageProcessor with the family's pixel bounds and statistics."""
        fam = self.family
        return {
            "min_pixels": fam.processor_min_pixels,
            "max_pixels": fam.processor_max_pixels,
            "patch_size": shape.patch_size,
            "temporal_patch_size": shape.temporal_patch_size,
            "merge_size": shape.spatial_merge_size,
            "image_mean": list(fam.image_mean),
            "image_std": list(fam.image_std),
            "image_processor_type": "Qwen2VLImageProcessor",
            "processor_class": fam.hf_processor_class,
        }

    def tokenizer_files(self, shape: SynthShape, kind: str, variant: str | None) -> dict[str, str]:
        """tokenizer.json, vocab.json, merges.txt, tokenizer_config.json and chat_template.json (the
        template's default system prompt and the processor class are the family's)."""
        fam, base = self.family, shape.tokenizer_base
        template = chat_template(fam.system_prompt)
        return {
            "tokenizer.json": tokenizer_synth.build_tokenizer_json(base, kind, fam.special_tokens),
            **tokenizer_synth.vocab_files(kind, base),
            "tokenizer_config.json": _json(
                self.tokenizer_config(base, shape.max_position_embeddings, template)
            ),
            "chat_template.json": _json({"chat_template": template}),
        }

    def tokenizer_config(self, base: int, model_max_length: int, template: str) -> dict[str, Any]:
        """tokenizer_config.json as Qwen2-VL ships it (eos <|im_end|>, pad <|endoftext|>, no bos)."""
        specials = self.family.special_tokens
        added = {
            str(i): {
                "content": t,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for t, i in tokenizer_synth.special_ids(specials, base).items()
        }
        return {
            "add_prefix_space": False,
            "added_tokens_decoder": added,
            "additional_special_tokens": list(specials[1:]),
            "bos_token": None,
            "chat_template": template,
            "clean_up_tokenization_spaces": False,
            "eos_token": "<|im_end|>",
            "errors": "replace",
            "model_max_length": model_max_length,
            "pad_token": "<|endoftext|>",
            "padding_side": "left",
            "processor_class": self.family.hf_processor_class,
            "split_special_tokens": False,
            "tokenizer_class": "Qwen2Tokenizer",
            "unk_token": None,
        }
