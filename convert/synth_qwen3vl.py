"""Synthetic Qwen3-VL checkpoints, Thinking or Instruct, in the published layout.

config.json nests ``text_config`` and ``vision_config`` (transformers 4.57's layout, which the published
checkpoints use); the preprocessor is the fast Qwen2-VL image processor with pixel bounds under ``size``;
the tokenizer is Qwen2's byte-level BPE with Qwen3's 26 added tokens, of which only Qwen2-VL's 14 are
marked special (the tool, FIM and think tokens are decoded as text), and the chat template is the
variant's (the family's ``chat_template``).
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

from qvq_local.convert import tokenizer_synth
from qvq_local.convert.synth_writer import SynthWriter, register

from qvq_local.families import qwen2vl, qwen3vl
from qvq_local.families.qwen3vl import SynthShape

#: Tokens marked ``"special": true`` in the published tokenizer_config.json: Qwen2-VL's 14.
_MARKED_SPECIAL = frozenset(qwen2vl.FAMILY.special_tokens)


def build_tokenizer_json(
    base: int,
    kind: str = "trained",
    specials: tuple[str, ...] = qwen3vl.FAMILY.special_tokens,
    pattern: str = tokenizer_synth.QWEN2_PATTERN,
) -> str:
    """tokenizer.json: the byte-level BPE of ``tokenizer_synth`` split with ``pattern`` (Qwen2's by
    default) and Qwen3's 26 added tokens (``specials``), of which only Qwen2-VL's 14 are marked special."""
    from tokenizers import AddedToken, Tokenizer

    data = json.loads(tokenizer_synth.build_tokenizer_json(base, kind, (), pattern))
    data["added_tokens"] = []
    tok = Tokenizer.from_str(json.dumps(data))
    tok.add_special_tokens([AddedToken(t, special=t in _MARKED_SPECIAL, normalized=False) for t in specials])
    for t, i in tokenizer_synth.special_ids(specials, base).items():
        if tok.token_to_id(t) != i:  # would break every id in config.json: fail loudly
            raise RuntimeError(f"added token {t} got id {tok.token_to_id(t)}, expected {i}")
    return tok.to_str(pretty=False)


def _json(data: dict) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


@register(qwen3vl.FAMILY.name)
class Qwen3VLWriter(SynthWriter):
    """Qwen3-VL checkpoints: ``qvq synth --family qwen3-vl`` gives the Thinking variant, whose template
    opens ``<think>``."""

    variants: ClassVar[tuple[str, ...]] = ("thinking", "instruct")
    transformers_version: ClassVar[str] = "4.57.0.dev0"

    def config(self, shape: SynthShape, ids: dict[str, int], torch_dtype: str) -> dict[str, Any]:
        """config.json in the published layout (transformers 4.57: nested text_config and vision_config)."""
        s, fam = shape, self.family
        if sum(s.mrope_section) * 2 != s.head_dim:
            raise ValueError(f"mrope_section {s.mrope_section} does not cover head_dim {s.head_dim}")
        return {
            "architectures": [fam.hf_architectures[0]],
            "image_token_id": ids[fam.image_pad],
            "model_type": fam.hf_model_types[0],
            "text_config": {
                "attention_bias": False,
                "attention_dropout": 0.0,
                "bos_token_id": ids["<|endoftext|>"],
                "dtype": torch_dtype,
                "eos_token_id": ids["<|im_end|>"],
                "head_dim": s.head_dim,
                "hidden_act": "silu",
                "hidden_size": s.hidden_size,
                "initializer_range": 0.02,
                "intermediate_size": s.intermediate_size,
                "max_position_embeddings": s.max_position_embeddings,
                "model_type": "qwen3_vl_text",
                "num_attention_heads": s.num_attention_heads,
                "num_hidden_layers": s.num_hidden_layers,
                "num_key_value_heads": s.num_key_value_heads,
                "rms_norm_eps": s.rms_norm_eps,
                "rope_scaling": {
                    "mrope_interleaved": True,
                    "mrope_section": list(s.mrope_section),
                    "rope_type": "default",
                },
                "rope_theta": s.rope_theta,
                "tie_word_embeddings": s.tie_word_embeddings,
                "use_cache": True,
                "vocab_size": s.vocab_size,
            },
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

    def preprocessor_config(self, shape: SynthShape) -> dict[str, Any]:
        """As published: pixel bounds under ``size``, mean/std 0.5, the fast image processor."""
        fam = self.family
        return {
            "size": {"longest_edge": fam.processor_max_pixels, "shortest_edge": fam.processor_min_pixels},
            "patch_size": fam.patch_size,
            "temporal_patch_size": fam.temporal_patch_size,
            "merge_size": fam.merge_size,
            "image_mean": list(fam.image_mean),
            "image_std": list(fam.image_std),
            "processor_class": fam.hf_processor_class,
            "image_processor_type": "Qwen2VLImageProcessorFast",
        }

    def tokenizer_files(self, shape: SynthShape, kind: str, variant: str | None) -> dict[str, str]:
        """The tokenizer and template files of a Qwen3-VL-``variant`` checkpoint, name -> text."""
        template = qwen3vl.chat_template(variant == "thinking")
        base = shape.tokenizer_base
        return {
            "tokenizer_config.json": _json(self.tokenizer_config(base, template)),
            "chat_template.json": _json({"chat_template": template}),
            "tokenizer.json": build_tokenizer_json(base, kind),
            **tokenizer_synth.vocab_files(kind, base),
        }

    def tokenizer_config(self, base: int, template: str) -> dict[str, Any]:
        """tokenizer_config.json as published (no bos, eos <|im_end|>, pad <|endoftext|>)."""
        added = {
            str(i): {
                "content": t,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": t in _MARKED_SPECIAL,
            }
            for t, i in tokenizer_synth.special_ids(self.family.special_tokens, base).items()
        }
        return {
            "add_bos_token": False,
            "add_prefix_space": False,
            "added_tokens_decoder": added,
            "additional_special_tokens": list(qwen2vl.FAMILY.special_tokens[1:]),
            "bos_token": None,
            "chat_template": template,
            "clean_up_tokenization_spaces": False,
            "eos_token": "<|im_end|>",
            "errors": "replace",
            "model_max_length": 262144,
            "pad_token": "<|endoftext|>",
            "split_special_tokens": False,
            "tokenizer_class": "Qwen2Tokenizer",
            "unk_token": None,
        }
