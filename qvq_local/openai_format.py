"""The OpenAI ``chat.completion`` response as qvq-local writes it: ``qvq ask --json`` and ``qvq serve``.

Why a module of its own: the object is a wire format that two presentations share, the terminal's
``--json`` output (:class:`qvq_local.render.JsonRenderer`) and the server's answers (``qvq_local.serve``).
It was written inside the renderers, so the server imported the terminal's module to build its replies.

The answer goes in ``choices[0].message.content`` and the thought in ``reasoning_content`` (the field name
DeepSeek's and vLLM's servers use); everything specific to qvq-local sits under ``"qvq"``.  No heavy
imports here.
"""

from __future__ import annotations

import time
import uuid

from qvq_local.events import Result

#: ``Result.stop_reason`` -> OpenAI's ``finish_reason``; a reason not listed finishes as ``"stop"``.
FINISH_REASON = {
    "answer": "stop",
    "budget": "stop",
    "loop": "stop",
    "max_tokens": "length",
    "interrupted": "interrupted",
    "cut": "length",  # thinking cut at the budget, and the server could not continue to an answer
}


def new_id() -> str:
    """A completion's id, as OpenAI's look (``chatcmpl-...``)."""
    return f"chatcmpl-qvq-{uuid.uuid4().hex[:24]}"


def finish_reason(result: Result) -> str:
    return FINISH_REASON.get(result.stop_reason, "stop")


def usage_dict(result: Result) -> dict:
    """``usage`` of a completion: OpenAI's counts, the reasoning tokens among them, and qvq's split."""
    completion = result.thought_tokens + result.answer_tokens
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": result.prompt_tokens + completion,
        "reasoning_tokens": result.thought_tokens,
        "answer_tokens": result.answer_tokens,
        "completion_tokens_details": {"reasoning_tokens": result.thought_tokens},
    }


def completion_dict(result: Result, *, created: int | None = None, completion_id: str | None = None) -> dict:
    """``result`` as an OpenAI-style ``chat.completion`` object with a separate reasoning field."""
    return {
        "id": completion_id or new_id(),
        "object": "chat.completion",
        "created": int(time.time()) if created is None else created,
        "model": result.model,
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": result.answer,
                    "reasoning_content": result.thought,
                },
                "finish_reason": finish_reason(result),
            }
        ],
        "usage": usage_dict(result),
        "qvq": {
            "boxed": result.boxed,
            "stop_reason": result.stop_reason,
            "forced": [
                {"reason": f.reason, "text": f.text, "at_token": f.at_token, "seconds": f.seconds}
                for f in result.forced
            ],
            "timings": dict(vars(result.timings)),
            "backend": result.backend,
            "quantization": result.quantization,
            "images": [
                {
                    "path": i.path,
                    "original_size": list(i.original_size),
                    "size": list(i.size),
                    "tokens": i.tokens,
                }
                for i in result.images
            ],
            "settings": result.settings,
            **({"clip": clip_dict(result.clip)} if result.clip is not None else {}),
            **(
                {"chains": [c.to_dict() for c in result.chains], "vote": result.vote} if result.chains else {}
            ),
        },
    }


def clip_dict(clip) -> dict:
    """A clip in ``--json`` and the server's ``qvq`` field: the sampled timestamps and what they cost."""
    return {
        "path": clip.path,
        "mode": clip.mode,
        "duration_s": clip.duration_s,
        "timestamps": list(clip.timestamps),
        "frames": clip.frames,
        "source_size": list(clip.source_size),
        "frame_size": list(clip.frame_size),
        "tokens": clip.tokens,
        "decode_s": clip.decode_s,
        "notes": list(clip.notes),
    }


__all__ = ["FINISH_REASON", "clip_dict", "completion_dict", "finish_reason", "new_id", "usage_dict"]
