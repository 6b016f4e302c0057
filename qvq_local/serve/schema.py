"""The OpenAI chat-completions request as ``qvq serve`` reads it, and the chunks it streams back.

Parsing is strict on purpose: a field this server cannot honour (``n > 1``, tools, audio, stop sequences,
log-probabilities, JSON mode) is refused with an OpenAI-style 400 naming it, never ignored, so a client
never believes it got what it did not.  The conversation is an optional system (or developer) message,
then user and assistant turns ending with the user's question (:func:`parse_messages`): a chat front-end
sends the whole conversation every turn.  User turns hold text and ``image_url`` parts; assistant turns
text only (their reasoning, when a client sends it back, is dropped by the API as Qwen's templates drop
it).  The conversation's rules are :mod:`qvq_local.conversation`'s, each broken one a 400 naming the
message.

Reasoning fields: the thought goes out as ``reasoning_content`` (DeepSeek's, QVQ-Max's and older vLLM's
name) and as ``reasoning`` (newer vLLM's and OpenAI-style clients'); the answer as ``content``.  The
budget comes in as ``thinking_budget`` (QVQ-Max's name for it).  No heavy imports here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from qvq_local.conversation import ASSISTANT, USER, Turn, check_history
from qvq_local.errors import InputError

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
    """One ``image_url`` part: a ``data:`` URI or an http(s) URL, not fetched or decoded yet.

    ``detail``: its ``image_url.detail`` (OpenAI's ``low`` | ``high`` | ``auto``, and qvq's ``medium`` |
    ``max``; None: not given, the server's default); ``max_pixels``: the ``image_url.max_pixels`` extension,
    a pixel bound that wins over ``detail`` (None: not given)."""

    url: str
    index: int  # its position among the conversation's images (0 for the first)
    where: str  # the part, for error messages ("messages[1].content[0]")
    detail: str | None = None
    max_pixels: int | None = None


@dataclass
class VideoRef:
    """One clip: a ``video_url`` part (a file: ``data:video/...`` URI or an http(s) URL; vLLM's and
    DashScope's form) or a ``video`` part with a list of frame URLs (DashScope's), not fetched yet.
    ``fps``: DashScope's part-level ``fps`` (frames a second to sample a file at, or that a frame list
    stands for); None: the server's default."""

    urls: list[str]
    is_file: bool
    where: str
    fps: float | None = None


@dataclass
class ChatRequest:
    model: str | None
    question: str
    system: str | None
    images: list[ImageRef]  # the question's own
    stream: bool = False
    include_usage: bool = False
    think_budget: int | None = None
    answer_budget: int | None = None
    max_tokens: int | None = None
    sampling: dict = field(default_factory=dict)
    think: bool | None = None  # the template's thinking switch; None: the model's default
    videos: list[VideoRef] = field(default_factory=list)
    #: the turns before the question (:class:`qvq_local.conversation.Turn`, their images as ImageRefs)
    history: tuple = ()

    def all_images(self) -> list[ImageRef]:
        """Every image of the conversation, in order: the earlier turns', then the question's."""
        return [ref for turn in self.history for ref in turn.images] + list(self.images)


def _int_field(body: dict, name: str, *, minimum: int = 1, where: str = "") -> int | None:
    value = body.get(name)
    if value is None:
        return None
    param = f"{where}{name}"
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f"{param} must be an integer, got {value!r}", param=param, code="invalid_type")
    if value < minimum:
        raise ApiError(
            400, f"{param} must be at least {minimum}, got {value}", param=param, code="invalid_value"
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


def _video_part(part: dict, kind: str, here: str) -> VideoRef:
    """A ``video_url`` part (one file) or a ``video`` part (a list of frame URLs, or one file URL)."""
    fps = part.get("fps")
    if fps is not None and (
        isinstance(fps, bool) or not isinstance(fps, (int, float)) or not 0.1 <= fps <= 30 or fps != fps
    ):
        raise ApiError(400, f"{here}.fps must be a number in [0.1, 30], got {fps!r}", param=f"{here}.fps")
    fps = float(fps) if fps is not None else None
    if kind == "video_url":
        ref = part.get("video_url")
        url = ref.get("url") if isinstance(ref, dict) else ref
        if not isinstance(url, str) or not url:
            raise ApiError(400, f"{here}.video_url.url must be a non-empty string", param=here)
        return VideoRef(urls=[url], is_file=True, where=here, fps=fps)
    value = part.get("video")
    if isinstance(value, str) and value:
        return VideoRef(urls=[value], is_file=True, where=here, fps=fps)
    if not isinstance(value, list) or not value or not all(isinstance(u, str) and u for u in value):
        raise ApiError(
            400, f"{here}.video must be a URL or a non-empty list of frame URLs", param=f"{here}.video"
        )
    return VideoRef(urls=list(value), is_file=False, where=here, fps=fps)


def image_ref(ref: object, where: str, index: int) -> ImageRef:
    """One ``image_url`` part's object (or, as some clients send it, the URL alone) as an :class:`ImageRef`:
    its url, and its ``detail`` and ``max_pixels`` checked (400 naming the part when wrong)."""
    url = ref.get("url") if isinstance(ref, dict) else ref
    if not isinstance(url, str) or not url:
        raise ApiError(400, f"{where}.image_url.url must be a non-empty string", param=where)
    if not isinstance(ref, dict):
        return ImageRef(url=url, index=index, where=where)
    from qvq_local.detail import AUTO, LEVELS

    detail = ref.get("detail")
    if detail is not None and (not isinstance(detail, str) or detail.strip().lower() not in (*LEVELS, AUTO)):
        raise ApiError(
            400,
            f"{where}.image_url.detail must be {' | '.join((*LEVELS, AUTO))}, got {detail!r}",
            param=f"{where}.image_url.detail",
            code="invalid_value",
        )
    max_pixels = _int_field(ref, "max_pixels", minimum=1, where=f"{where}.image_url.")
    return ImageRef(
        url=url,
        index=index,
        where=where,
        detail=None if detail is None else detail.strip().lower(),
        max_pixels=max_pixels,
    )


def _text_of(
    content, where: str, *, allow_images: bool, first_image: int = 0
) -> tuple[list[str], list[ImageRef], list[VideoRef]]:
    if isinstance(content, str):
        return [content], [], []
    if not isinstance(content, list):
        raise ApiError(400, f"{where} must be a string or a list of parts", param=where)
    texts: list[str] = []
    images: list[ImageRef] = []
    videos: list[VideoRef] = []
    for i, part in enumerate(content):
        here = f"{where}[{i}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "text":
            raise ApiError(400, f"{here}.text must be a string", param=f"{here}.text")
        elif kind in ("video_url", "video") and allow_images:
            videos.append(_video_part(part, kind, here))
        elif kind in ("video_url", "video"):
            raise ApiError(400, f"{here}: videos belong in the user message", param=here)
        elif kind == "image_url" and allow_images:
            images.append(image_ref(part.get("image_url"), here, first_image + len(images)))
        elif kind == "image_url":
            raise ApiError(400, f"{here}: images belong in user messages", param=here)
        else:
            raise ApiError(
                400,
                f"{here}: unsupported content part type {kind!r} (text, image_url, video_url and video are "
                "supported)",
                param=here,
                code="unsupported_content",
            )
    return texts, images, videos


def parse_messages(
    messages: object,
) -> tuple[str | None, tuple[Turn, ...], str, list[ImageRef], list[VideoRef]]:
    """``(system, earlier turns, question, the question's images, the question's clips)`` of a request's
    ``messages``.  A clip belongs in the question's message (one in an earlier turn: 400).

    A system (or developer) message may come first; then user and assistant messages in any order, the
    last one the user's question, with text.  Earlier turns are checked by
    :func:`qvq_local.conversation.check_history` (an empty turn, an image in an assistant turn: 400 naming
    the message).  Tool and function messages are refused: this server makes no tool calls.
    """
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", param="messages")
    system: str | None = None
    turns: list[Turn] = []
    names: list[str] = []
    clips: list[list[VideoRef]] = []  # each turn's
    n_images = 0
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise ApiError(400, f"{where} must be an object", param=where)
        role = message.get("role")
        if role in ("system", "developer") and i == 0:
            texts, _, _ = _text_of(message.get("content"), f"{where}.content", allow_images=False)
            system = "\n".join(texts)
        elif role in (USER, ASSISTANT):
            texts, images, videos = _text_of(
                message.get("content"), f"{where}.content", allow_images=role == USER, first_image=n_images
            )
            n_images += len(images)
            clips.append(videos)
            text = "\n".join(t for t in texts if t.strip())
            turns.append(Turn(role, text, tuple(images)))
            names.append(where)
        elif role in ("system", "developer"):
            raise ApiError(400, f"{where}: a {role} message may only come first", param=where)
        elif role in ("tool", "function"):
            raise ApiError(
                400,
                f"{where}: {role} messages are not supported (no tool calls)",
                param=where,
                code="unsupported_conversation",
            )
        else:
            raise ApiError(400, f"{where}: unknown role {role!r}", param=where)
    if not turns:
        raise ApiError(400, "messages hold no user message", param="messages")
    if turns[-1].role != USER:
        raise ApiError(
            400,
            f"{names[-1]}: the conversation ends with an assistant message; the last message must be the "
            "user's question (this server does not continue an assistant message)",
            param=names[-1],
            code="unsupported_conversation",
        )
    last = turns.pop()
    where = names.pop()
    videos = clips.pop()
    for earlier in clips:
        if earlier:
            raise ApiError(
                400,
                f"{earlier[0].where}: a clip is asked about in the conversation's last user message only",
                param=earlier[0].where,
                code="unsupported_conversation",
            )
    if not last.text.strip():
        raise ApiError(400, f"{where}: the question has no text: ask a question about the image", param=where)
    try:
        history = check_history(turns, names)
    except InputError as err:
        raise ApiError(400, str(err), param=str(err).split(":", 1)[0]) from None
    return system, history, last.text, list(last.images), videos


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

    system, history, question, images, videos = parse_messages(body.get("messages"))

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
        videos=videos,
        stream=stream,
        include_usage=bool(options.get("include_usage")),
        think_budget=_int_field(body, "thinking_budget"),
        answer_budget=_int_field(body, "answer_budget"),
        max_tokens=max_tokens,
        sampling={k: v for k, v in sampling.items() if v is not None},
        think=_thinking_field(body),
        history=history,
    )


# ------------------------------------------------------------------------------------- responses


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


def now() -> int:
    return int(time.time())
