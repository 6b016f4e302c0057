"""The OpenAI chat-completions request as ``qvq serve`` reads it, and the chunks it streams back.

Parsing is strict on purpose: a field this server cannot honour (``n > 1``, tools, audio, stop sequences,
log-probabilities, JSON mode) is refused with an OpenAI-style 400 naming it, never ignored, so a client
never believes it got what it did not.  QVQ answers one question about images, so the conversation is an
optional system message and one user message (text and ``image_url`` parts).

Reasoning fields: the thought goes out as ``reasoning_content`` (DeepSeek's, QVQ-Max's and older vLLM's
name) and as ``reasoning`` (newer vLLM's and OpenAI-style clients'); the answer as ``content``.  The
budget comes in as ``thinking_budget`` (QVQ-Max's name for it).  No heavy imports here.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from qvq_local.openai_format import FINISH_REASON

#: Body fields accepted (anything else is refused by name).
KNOWN_FIELDS = frozenset(
    {
        "model",
        "messages",
        "stream",
        "stream_options",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "top_k",
        "seed",
        "repetition_penalty",
        "thinking_budget",
        "enable_thinking",
        "chat_template_kwargs",
        "answer_budget",
        "n",
        "user",
        "metadata",
        "store",
        "reasoning_effort",  # accepted only when absent/None: refused below otherwise
    }
)
#: Fields refused with the reason a user needs.
UNSUPPORTED = {
    "tools": "tool calls are not supported: QVQ answers questions about images",
    "tool_choice": "tool calls are not supported: QVQ answers questions about images",
    "functions": "function calls are not supported",
    "function_call": "function calls are not supported",
    "parallel_tool_calls": "tool calls are not supported",
    "audio": "audio output is not supported",
    "modalities": "only text output is supported",
    "logprobs": "log-probabilities are not returned",
    "top_logprobs": "log-probabilities are not returned",
    "logit_bias": "logit_bias is not supported",
    "stop": "stop sequences are not supported (the answer ends at the model's end of turn)",
    "response_format": "structured output (response_format) is not supported",
    "presence_penalty": "presence_penalty is not supported (use repetition_penalty)",
    "frequency_penalty": "frequency_penalty is not supported (use repetition_penalty)",
    "prediction": "predicted outputs are not supported",
    "web_search_options": "web search is not supported",
}


class ApiError(Exception):
    """An OpenAI-style error response: HTTP status, message, the offending parameter and a code."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = " ".join(message.split())
        self.param = param
        self.code = code
        self.kind = kind
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class ImageRef:
    """One ``image_url`` part: a ``data:`` URI or an http(s) URL, not fetched or decoded yet."""

    url: str
    index: int  # the part's position, for error messages ("messages[1].content[0]")
    where: str


@dataclass
class ChatRequest:
    model: str | None
    question: str
    system: str | None
    images: list[ImageRef]
    stream: bool = False
    include_usage: bool = False
    think_budget: int | None = None
    answer_budget: int | None = None
    max_tokens: int | None = None
    sampling: dict = field(default_factory=dict)
    think: bool | None = None  # the template's thinking switch; None: the model's default


def _int_field(body: dict, name: str, *, minimum: int = 1) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f"{name} must be an integer, got {value!r}", param=name, code="invalid_type")
    if value < minimum:
        raise ApiError(
            400, f"{name} must be at least {minimum}, got {value}", param=name, code="invalid_value"
        )
    return value


def _float_field(body: dict, name: str, low: float, high: float, *, open_low: bool = False) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ApiError(400, f"{name} must be a number, got {value!r}", param=name, code="invalid_type")
    if value < low or value > high or (open_low and value == low):
        span = f"({low}, {high}]" if open_low else f"[{low}, {high}]"
        raise ApiError(400, f"{name} must be in {span}, got {value}", param=name, code="invalid_value")
    return float(value)


def _text_of(content, where: str, *, allow_images: bool) -> tuple[list[str], list[ImageRef]]:
    if isinstance(content, str):
        return [content], []
    if not isinstance(content, list):
        raise ApiError(400, f"{where} must be a string or a list of parts", param=where)
    texts: list[str] = []
    images: list[ImageRef] = []
    for i, part in enumerate(content):
        here = f"{where}[{i}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url" and allow_images:
            ref = part.get("image_url")
            url = ref.get("url") if isinstance(ref, dict) else ref
            if not isinstance(url, str) or not url:
                raise ApiError(400, f"{here}.image_url.url must be a non-empty string", param=here)
            images.append(ImageRef(url=url, index=len(images), where=here))
        elif kind == "image_url":
            raise ApiError(400, f"{here}: images belong in the user message", param=here)
        else:
            raise ApiError(
                400,
                f"{here}: unsupported content part type {kind!r} (text and image_url are supported)",
                param=here,
                code="unsupported_content",
            )
    return texts, images


def _thinking_field(body: dict) -> bool | None:
    """``enable_thinking`` (QVQ-Max's and DashScope's top-level field) or ``chat_template_kwargs.
    enable_thinking`` (vLLM's and SGLang's): true or false switches a template that has the switch (Qwen3.5),
    absent leaves its default; both given must agree.  Other ``chat_template_kwargs`` are refused by name."""
    kwargs = body.get("chat_template_kwargs")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise ApiError(400, "chat_template_kwargs must be an object", param="chat_template_kwargs")
    kwargs = kwargs or {}
    for name in kwargs:
        if name != "enable_thinking":
            raise ApiError(
                400,
                f"chat_template_kwargs.{name} is not supported (only enable_thinking)",
                param=f"chat_template_kwargs.{name}",
                code="unsupported_parameter",
            )
    values = {}
    for where, value in (("enable_thinking", body.get("enable_thinking")),
                         ("chat_template_kwargs.enable_thinking", kwargs.get("enable_thinking"))):  # fmt: skip
        if value is not None:
            if not isinstance(value, bool):
                raise ApiError(400, f"{where} must be true or false", param=where)
            values[where] = value
    if len(set(values.values())) > 1:
        raise ApiError(
            400, "enable_thinking and chat_template_kwargs.enable_thinking disagree", param="enable_thinking"
        )
    return next(iter(values.values()), None)


def parse_chat_request(body: object) -> ChatRequest:
    """Check a decoded JSON body and turn it into a :class:`ChatRequest`; :class:`ApiError` (400) if not."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    for name in body:
        if name in UNSUPPORTED and body[name] not in (None, False, [], {}):
            raise ApiError(400, f"{name}: {UNSUPPORTED[name]}", param=name, code="unsupported_parameter")
        if name not in KNOWN_FIELDS and name not in UNSUPPORTED:
            raise ApiError(
                400, f"unknown or unsupported field {name!r}", param=name, code="unsupported_parameter"
            )
    n = _int_field(body, "n")
    if n is not None and n != 1:
        raise ApiError(
            400, f"n must be 1 (one answer per request), got {n}", param="n", code="unsupported_value"
        )
    if body.get("reasoning_effort") is not None:
        raise ApiError(
            400, "reasoning_effort is not supported: set thinking_budget (tokens)", param="reasoning_effort"
        )
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise ApiError(400, "model must be a string", param="model")

    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", param="messages")
    system: str | None = None
    user: tuple[list[str], list[ImageRef]] | None = None
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise ApiError(400, f"{where} must be an object", param=where)
        role = message.get("role")
        if role in ("system", "developer") and i == 0:
            texts, _ = _text_of(message.get("content"), f"{where}.content", allow_images=False)
            system = "\n".join(texts)
        elif role == "user" and user is None:
            user = _text_of(message.get("content"), f"{where}.content", allow_images=True)
        elif role in ("user", "assistant", "tool", "function"):
            raise ApiError(
                400,
                f"{where}: qvq serve answers one question (an optional system message and one user "
                "message); earlier turns are not supported",
                param=where,
                code="unsupported_conversation",
            )
        else:
            raise ApiError(400, f"{where}: unknown role {role!r}", param=where)
    if user is None:
        raise ApiError(400, "messages hold no user message", param="messages")
    texts, images = user
    question = "\n".join(t for t in texts if t.strip())
    if not question.strip():
        raise ApiError(400, "the user message has no text: ask a question about the image", param="messages")

    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "stream must be true or false", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "stream_options must be an object", param="stream_options")
    max_tokens = _int_field(body, "max_completion_tokens") or _int_field(body, "max_tokens")
    sampling = {
        "temperature": _float_field(body, "temperature", 0.0, 2.0),
        "top_p": _float_field(body, "top_p", 0.0, 1.0, open_low=True),
        "top_k": _int_field(body, "top_k", minimum=0),
        "repetition_penalty": _float_field(body, "repetition_penalty", 0.0, 10.0, open_low=True),
        "seed": _int_field(body, "seed", minimum=0),
    }
    return ChatRequest(
        model=model,
        question=question,
        system=system,
        images=images,
        stream=stream,
        include_usage=bool(options.get("include_usage")),
        think_budget=_int_field(body, "thinking_budget"),
        answer_budget=_int_field(body, "answer_budget"),
        max_tokens=max_tokens,
        sampling={k: v for k, v in sampling.items() if v is not None},
        think=_thinking_field(body),
    )


# ------------------------------------------------------------------------------------- responses


def new_id() -> str:
    return f"chatcmpl-qvq-{uuid.uuid4().hex[:24]}"


def usage_dict(result) -> dict:
    completion = result.thought_tokens + result.answer_tokens
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": result.prompt_tokens + completion,
        "completion_tokens_details": {"reasoning_tokens": result.thought_tokens},
    }


def chunk(
    completion_id: str, created: int, model: str, delta: dict, finish_reason: str | None = None
) -> dict:
    """One ``chat.completion.chunk``."""
    return {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    }


def delta_for(phase: str, text: str) -> dict:
    """The delta of one piece of text: the thought in both reasoning fields, the answer in ``content``."""
    if phase == "thought":
        return {"reasoning_content": text, "reasoning": text}
    return {"content": text}


def finish_reason(result) -> str:
    return FINISH_REASON.get(result.stop_reason, "stop")


def now() -> int:
    return int(time.time())
