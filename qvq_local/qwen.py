"""Facts about the Qwen2-VL / QVQ model family that several modules share (constants only, no code).

The tokenizer builder, the prompt builder and the converters read these from here, so a fact is
written once (as gguf-py keeps its constants apart from its writer).
"""

from __future__ import annotations

#: Qwen's special tokens in their original order; the first one's id is the size of the base vocabulary.
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

#: Id of ``<|endoftext|>`` in every Qwen2 / Qwen2-VL / QVQ tokenizer.
QWEN_BASE_VOCAB = 151643

#: QVQ-72B-Preview's system prompt, sent unless ``--system`` (``system=``) replaces it.
#:
#: Two versions are published.  The model card's example passes this sentence.  LLaMA-Factory and ms-swift
#: register QVQ with one more: "... You are Qwen developed by Alibaba. Answer in the language of the
#: question. You should think step-by-step."  This project sends the model card's, because it is the
#: authors' own inference example, the published demo replies the controller is built and tested on
#: (``tests/test_replay.py``) come from it, and a sentence the base model may never have been trained
#: with is an untested change to its behaviour; the language of the answer is this project's job instead
#: (the forced answer in the question's language, ``reasoning.default_forced_text``).  A model fine-tuned
#: with those frameworks saw their sentence: pass it with ``--system``.
QVQ_SYSTEM_PROMPT = "You are a helpful and harmless assistant. You are Qwen developed by Alibaba. You should think step-by-step."

#: What one image looks like in a rendered Qwen2-VL prompt (backends rewrite it for their library).
IMAGE_BLOCK = "<|vision_start|><|image_pad|><|vision_end|>"
IMAGE_PAD = "<|image_pad|>"

#: QVQ-72B-Preview's published sampling (its generation_config.json): near-greedy.  The fallback for a model
#: that ships no sampling values of its own (``SamplingParams.resolved``).
QVQ_SAMPLING: dict[str, float | int] = {
    "temperature": 0.01,
    "top_p": 0.001,
    "top_k": 1,
    "repetition_penalty": 1.05,
}
