"""The ``openai`` backend: a model behind an OpenAI-compatible server, driven as a Session.

The reasoning controller (``qvq_local.reasoning``) runs here, in the client, exactly as for a local model:
each streamed delta is one "token" to it, so the live panel, ``--json`` and the transcript are the same.
What a server gives, and how the budget is kept, depends on its kind (``--server-kind``):

==============  ======================================  ===============================================
kind            budget                                  when thinking is cut (client-side budget)
==============  ======================================  ===============================================
``qvq``         sent as ``thinking_budget``; qvq serve  (not needed: the server cuts and answers)
                cuts and forces the answer itself
``qvq-max``     sent as ``thinking_budget`` with        (not needed); no system message is sent
                ``enable_thinking`` (Alibaba's API)
``vllm``        counted here; the stream is closed      a second request continues the assistant
                at the budget                           message (``continue_final_message``)
``llama-server`` counted here                           a second request ending with the assistant
                                                        message (llama.cpp's server prefills it)
``generic``     counted here                            cannot continue: stop reason ``cut``
==============  ======================================  ===============================================

``auto`` asks ``GET /models``: ``owned_by`` says ``qvq-local`` (qvq serve), ``vllm`` or ``llamacpp``
(llama.cpp's llama-server); a ``dashscope`` host or a ``qvq-max``/``qvq-plus`` model is QVQ-Max; anything
else (llama-cpp-python's server, say) is ``generic``.

Reasoning is read from ``delta.reasoning_content`` (QVQ-Max, DeepSeek, older vLLM), ``delta.reasoning``
(newer vLLM, qvq serve), or from plain ``content`` where the splitter finds ``<think>`` tags or QVQ's
``**Final Answer**`` markers (vLLM without a reasoning parser, llama-server).  When the server switches
from a reasoning field to ``content``, the session writes ``</think>`` between them, so the controller's
one splitter sees the boundary.

What the server is told, and what qvq reports (``--json``'s ``settings``):

* **Context.**  Read where the server states it: ``max_model_len`` in ``GET /models`` (vLLM, qvq serve),
  llama-server's ``GET /props`` (``default_generation_settings.n_ctx``: one slot's context), else the
  ``meta`` of its ``/models`` entry (``n_ctx``, then the trained ``n_ctx_train``).  ``max_tokens`` is then
  the controller's cap (thought cap + forced-text margin + answer budget), never more than that context
  minus the prompt.  The prompt is counted as an upper bound, since the server's tokenizer is not here:
  one token per byte of the templated text (a byte-level BPE token is at least one byte), plus each
  image's tokens on the Qwen grid at the size sent (exact for a Qwen-VL processor, which keeps a size
  already on its grid).  When the server states no context, ``max_tokens`` is sent only when the caller
  bounded the reply (a think budget or ``max_tokens``); otherwise it is left out, and the server's own
  limit applies.
* **Sampling.**  Only the values the caller set are sent, under the names each kind takes (llama-server
  calls the repetition penalty ``repeat_penalty``; vLLM takes ``top_k`` and ``repetition_penalty`` as
  extra fields; QVQ-Max and a generic server take ``temperature``, ``top_p`` and ``seed`` only, and a
  value set for another field is refused rather than silently dropped).  A value not set is not sent:
  the server applies its own default (vLLM: the checkpoint's generation_config), reported as
  ``"server default"``.
* **Tokens.**  ``stream_options.include_usage`` asks for the server's ``usage`` (vLLM, DashScope and qvq
  serve send a last chunk with it; vLLM also ``continuous_usage_stats``, a running count in every chunk,
  so a stream closed at the budget still has its count).  Where every request of the question got one,
  the result's prompt and completion counts are the server's; the thought/answer split is the server's
  ``reasoning_tokens`` where given, else the streamed chunks' (the answer's chunks taken off the total).
  Where a server sent none, every count is per streamed chunk (a chunk is usually, not always, one
  token), and ``settings["token_count"]`` says which.

HTTP is the standard library's (``urllib``): this backend needs nothing installed.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from collections import deque
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from qvq_local.backends.base import ChatTurn, PrefillStats, Prompt, SamplingParams, Token
from qvq_local.backends.options import OpenAIOptions
from qvq_local.backends.remote_media import clip_parts, png_data_uri
from qvq_local.errors import BackendUnavailable, ContextOverflow, InputError, ModelError
from qvq_local.families import DEFAULT_FAMILY

BACKEND = "openai"
#: What the session writes between a reasoning field and the content that follows it.
REASONING_END = "\n</think>\n\n"
#: Environment variables read for the key when none is given, in order (QVQ-Max reads DashScope's first).
KEY_ENV = ("QVQ_API_KEY", "OPENAI_API_KEY")
QVQ_MAX_KEY_ENV = ("DASHSCOPE_API_KEY", "QVQ_API_KEY")
#: Alibaba Model Studio's OpenAI-compatible endpoint (international; in mainland China:
#: https://dashscope.aliyuncs.com/compatible-mode/v1).
QVQ_MAX_BASE_URL = "https://dashscope-intl.aliyuncs.com/compatible-mode/v1"


#: Sampling fields every OpenAI-compatible server takes: our name -> the request's field.
STANDARD_SAMPLING = {"temperature": "temperature", "top_p": "top_p", "seed": "seed"}
#: vLLM and qvq serve also take these two under their own names (vLLM as extra fields).
EXTRA_SAMPLING = {"top_k": "top_k", "repetition_penalty": "repetition_penalty"}
#: llama-server takes ``top_k``, and the repetition penalty as ``repeat_penalty`` (llama.cpp's name).
LLAMA_SERVER_SAMPLING = {"top_k": "top_k", "repetition_penalty": "repeat_penalty"}


@dataclass(frozen=True)
class Traits:
    """How one kind of server is driven."""

    budget_on_server: bool  # thinking_budget is honoured by the server
    continuation: str | None  # "vllm" | "prefill" | None: how to continue an assistant message
    #: answer_budget is honoured by the server too (qvq serve's own field)
    answer_budget_on_server: bool = False
    system_message: bool = True
    #: the sampling fields it takes: :class:`SamplingParams` name -> the request's field name
    sampling_fields: dict = field(default_factory=lambda: {**STANDARD_SAMPLING, **EXTRA_SAMPLING})
    enable_thinking: bool = False
    #: ``stream_options.continuous_usage_stats`` (vLLM's): a running usage in every chunk
    continuous_usage: bool = False


TRAITS = {
    "qvq": Traits(budget_on_server=True, continuation=None, answer_budget_on_server=True),
    "qvq-max": Traits(
        budget_on_server=True,
        continuation=None,
        system_message=False,
        sampling_fields=dict(STANDARD_SAMPLING),
        enable_thinking=True,
    ),
    "vllm": Traits(budget_on_server=False, continuation="vllm", continuous_usage=True),
    "llama-server": Traits(
        budget_on_server=False,
        continuation="prefill",
        sampling_fields={**STANDARD_SAMPLING, **LLAMA_SERVER_SAMPLING},
    ),
    "generic": Traits(budget_on_server=False, continuation=None, sampling_fields=dict(STANDARD_SAMPLING)),
}


class _Http:
    """JSON over HTTP with a bearer key; one-line errors naming the server."""

    def __init__(self, base_url: str, api_key: str | None, timeout: float = 600.0):
        self.base_url = base_url
        self.api_key = api_key
        self.timeout = timeout

    def _request(self, method: str, path: str, body: dict | None):
        headers = {"Accept": "application/json", "User-Agent": "qvq-local"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return urllib.request.Request(self.base_url + path, data=data, headers=headers, method=method)

    def open(self, method: str, path: str, body: dict | None = None, timeout: float | None = None):
        request = self._request(method, path, body)
        try:
            return urllib.request.urlopen(request, timeout=timeout or self.timeout)  # noqa: S310 - http(s) only
        except urllib.error.HTTPError as err:
            raise ModelError(
                f"the server at {self.base_url} answered {err.code}: {_error_text(err)}"
            ) from None
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise BackendUnavailable(f"cannot reach the server at {self.base_url}: {reason}") from None

    def get_json(self, path: str, timeout: float = 10.0) -> dict:
        with self.open("GET", path, timeout=timeout) as response:
            try:
                return json.loads(response.read())
            except ValueError:
                raise ModelError(f"the server at {self.base_url} sent no JSON for {path}") from None


def _error_text(err: urllib.error.HTTPError) -> str:
    try:
        data = json.loads(err.read() or b"{}")
    except (ValueError, OSError):
        return err.reason or "error"
    inner = data.get("error", data) if isinstance(data, dict) else data
    if isinstance(inner, dict):
        return str(inner.get("message") or inner.get("detail") or inner)[:300]
    return str(inner)[:300]


def _looks_like_qvq_max(base_url: str, model: str | None) -> bool:
    host = urlsplit(base_url).hostname or ""
    return "dashscope" in host or (model or "").lower().startswith(("qvq-max", "qvq-plus"))


def detect_kind(http: _Http, model: str | None, listing: dict | None) -> str:
    """The server kind ``auto`` stands for (see the module docstring)."""
    if _looks_like_qvq_max(http.base_url, model):
        return "qvq-max"
    owners = {
        str(m.get("owned_by", "")).lower() for m in (listing or {}).get("data", []) if isinstance(m, dict)
    }
    if "qvq-local" in owners:
        return "qvq"
    if "vllm" in owners:
        return "vllm"
    if "llamacpp" in owners:
        return "llama-server"
    return "generic"


def _user_content(text: str, images, labels=(), clip=None, kind: str = "generic") -> list[dict]:
    """A user message's parts: its images (PNG ``data:`` URIs, each after its label where a clip's frames
    go in as images: their times), the clip in the form this kind of server documents (remote_media),
    then its text."""
    parts: list[dict] = []
    for i, image in enumerate(images):
        if i < len(labels):  # a clip's frame: its time before it
            parts.append({"type": "text", "text": labels[i]})
        parts.append({"type": "image_url", "image_url": {"url": png_data_uri(image)}})
    if clip is not None:
        parts += clip_parts(clip, kind)
    if text:
        parts.append({"type": "text", "text": text})
    return parts


def _positive_int(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _server_root(base_url: str) -> str:
    """The server's root for the routes outside the OpenAI prefix (llama-server's ``/props``)."""
    return base_url[: -len("/v1")] if base_url.endswith("/v1") else base_url


def read_context(http: _Http, kind: str, entry: dict | None) -> tuple[int, str | None]:
    """``(tokens, where it was read)`` for the server's context, ``(0, None)`` when it states none.

    ``entry``: the model's item in ``GET /models``.  Looked up in the order of the module docstring; a
    server that answers ``/props`` with an error, or not at all, simply states nothing there.
    """
    entry = entry or {}
    tokens = _positive_int(entry.get("max_model_len"))
    if tokens:
        return tokens, "GET /models max_model_len"
    if kind == "llama-server":
        props_http = _Http(_server_root(http.base_url), http.api_key)
        try:
            props = props_http.get_json("/props")
        except (ModelError, BackendUnavailable):
            props = {}
        settings = props.get("default_generation_settings") if isinstance(props, dict) else None
        tokens = _positive_int((settings or {}).get("n_ctx"))
        if tokens:
            return tokens, "GET /props default_generation_settings.n_ctx"
    meta = entry.get("meta") if isinstance(entry.get("meta"), dict) else {}
    for name in ("n_ctx", "n_ctx_train"):
        tokens = _positive_int(meta.get(name))
        if tokens:
            return tokens, f"GET /models meta.{name}"
    return 0, None


class RemoteModel:
    """A model on a server: what :class:`qvq_local.model.Model` needs of a loaded model.

    ``context_length``: the server's stated context (0: it states none; see :func:`read_context`), and
    ``context_from`` where it was read.
    """

    backend = BACKEND
    quantization = "remote"
    chat_template = None  # the server applies its own
    generation_config: dict = {}

    def __init__(
        self, http: _Http, name: str, kind: str, context_length: int = 0, context_from: str | None = None
    ):
        self.http = http
        self.name = name
        self.kind = kind
        self.traits = TRAITS[kind]
        self.context_length = context_length
        self.context_from = context_from
        #: the registry's ``server_budget`` capability: this server keeps the thinking budget and the loop
        #: stop itself (qvq serve, QVQ-Max), so the client sends them and does not count them again
        self.budget_on_server = self.traits.budget_on_server
        self.answer_budget_on_server = self.traits.answer_budget_on_server

    @staticmethod
    def image_token_estimate(width: int, height: int) -> int:
        return int(DEFAULT_FAMILY.image_tokens(width, height))

    def new_session(self, sampling: SamplingParams, *, n_ctx: int | None = None) -> RemoteSession:
        """A session that sends the values of ``sampling`` that are set; one this kind of server does not
        take is refused (``InputError``) rather than silently dropped."""
        refused = [
            name
            for name in ("temperature", "top_p", "top_k", "repetition_penalty", "seed")
            if getattr(sampling, name) is not None and name not in self.traits.sampling_fields
        ]
        if refused:
            takes = ", ".join(self.traits.sampling_fields)
            raise InputError(
                f"{' and '.join(refused)} cannot be sent to a {self.kind} server (it takes {takes}); "
                "leave it unset, or name the server's kind with --server-kind (vllm, llama-server)"
            )
        return RemoteSession(self, sampling, n_ctx or self.context_length)

    def close(self) -> None:
        pass


def open_model(model: str | None, options: OpenAIOptions) -> RemoteModel:
    """Reach the server, detect its kind when asked to, pick the model (the only one served, when
    ``model`` is None) and read its context where the server states it.  The registry's ``open_model``
    for this backend: ``options`` are checked already (the URL's form, the kind)."""
    url = options.base_url
    if not url:
        raise InputError(
            "the openai backend needs --base-url (e.g. http://127.0.0.1:8000/v1), or "
            "`qvq config set base_url URL`"
        )
    kind, api_key = options.server_kind, options.api_key
    qvq_max = kind == "qvq-max" or (kind == "auto" and _looks_like_qvq_max(url, model))
    envs = QVQ_MAX_KEY_ENV if qvq_max else KEY_ENV
    key = api_key or next((os.environ[e] for e in envs if os.environ.get(e)), None)
    http = _Http(url, key)
    listing = None
    try:
        listing = http.get_json("/models")
    except ModelError:
        if not model:
            raise  # a server that lists nothing cannot tell which model to use
    entries = [m for m in (listing or {}).get("data", []) if isinstance(m, dict)]
    if not model:
        ids = [m.get("id") for m in entries]
        if len(ids) != 1:
            raise InputError(
                f"name the remote model with -m: the server at {url} serves {', '.join(map(str, ids)) or 'none'}"
            )
        model = str(ids[0])
    if kind == "auto":
        kind = detect_kind(http, model, listing)
    entry = next((m for m in entries if m.get("id") == model), None)
    context, where = read_context(http, kind, entry)
    return RemoteModel(http, model, kind, context, where)


def _positive_int_or_zero(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


@dataclass(frozen=True)
class TokenCounts:
    """A question's token counts as a remote session can give them (:meth:`RemoteSession.token_counts`)."""

    prompt_tokens: int | None  # None: the server did not say (keep the estimate)
    thought_tokens: int
    answer_tokens: int
    how: str  # what they are, for ``settings["token_count"]``


class RemoteSession:
    """One question on the server: a streamed request, then (after a cut) perhaps a continuation."""

    backend = BACKEND

    def __init__(self, model: RemoteModel, sampling: SamplingParams, n_ctx: int):
        self.model = model
        self.traits = model.traits
        #: what is sent: the caller's values (a field None is not sent; the server applies its own)
        self.sampling = sampling
        self.n_ctx = n_ctx
        self.n_past = 0
        self.images_encoded = 0
        #: set when the server ended the reply for its own reason: "max_tokens" (finish_reason length)
        #: or "cut" (thinking was cut at the budget and this server cannot continue a reply)
        self.stop_reason: str | None = None
        #: the ``max_tokens`` of the first request (None: not sent)
        self.max_tokens_sent: int | None = None
        self._usage: list[dict | None] = []  # the last usage the server sent, per request
        self._response = None
        self._pending: deque = deque()
        self._written: list[str] = []  # what the model wrote, for a continuation
        self._reasoning_field = False  # the reasoning came in a field of its own
        self._content_started = False
        self._done = False
        self._messages: list[dict] = []
        self._max_new: int | None = None
        self._generated = 0  # deltas received
        #: the prompt's tokens, counted as an upper bound (:meth:`prompt_bound`)
        self.n_past_estimate = 0

    # -- the request
    def _body(self, messages: list[dict]) -> dict:
        body: dict = {"model": self.model.name, "messages": messages, "stream": True}
        body["stream_options"] = {"include_usage": True}
        if self.traits.continuous_usage:
            body["stream_options"]["continuous_usage_stats"] = True
        for name, wire in self.traits.sampling_fields.items():
            value = getattr(self.sampling, name)
            if value is not None:
                body[wire] = value
        return body

    def request_report(self) -> dict:
        """How the question was put to the server, for ``settings["remote"]``."""
        return {
            "server_kind": self.model.kind,
            "context": self.model.context_length or None,
            "context_from": self.model.context_from,
            "max_tokens": self.max_tokens_sent,
            "prompt_tokens_bound": self.n_past_estimate,
        }

    def token_counts(self, thought_chunks: int, answer_chunks: int) -> TokenCounts:
        """The question's counts: the server's ``usage`` where every request got one (see the module
        docstring), else the chunks the controller counted (``thought_chunks``, ``answer_chunks``)."""
        usages = self._usage
        completions = [_positive_int_or_zero((u or {}).get("completion_tokens")) for u in usages]
        if not usages or any(c is None for c in completions):
            return TokenCounts(None, thought_chunks, answer_chunks, "per chunk")
        prompt = _positive_int_or_zero(usages[0].get("prompt_tokens"))
        total = sum(completions)
        reasoning = [
            _positive_int_or_zero(((u or {}).get("completion_tokens_details") or {}).get("reasoning_tokens"))
            for u in usages
        ]
        if all(r is not None for r in reasoning):
            thought = min(total, sum(reasoning))
            return TokenCounts(prompt, thought, total - thought, "server usage")
        if len(usages) > 1:
            # the first stream was closed at the budget (all thought); the continuation is the answer
            return TokenCounts(prompt, completions[0], total - completions[0], "server usage")
        answer = min(answer_chunks, total)
        return TokenCounts(
            prompt, total - answer, answer, "server usage total; thought/answer split per chunk"
        )

    def _open(self, body: dict) -> None:
        self._close_response()
        self._response = self.model.http.open("POST", "/chat/completions", body)
        self._usage.append(None)
        self._done = False

    def _read_piece(self) -> tuple[str, str] | None:
        """The next ``(field, text)`` of the stream ("reasoning" or "content"); None at its end."""
        response = self._response
        while response is not None:
            raw = response.readline()
            if not raw:
                return None
            line = raw.decode("utf-8", "replace").strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                return None
            try:
                chunk = json.loads(data)
            except ValueError:
                continue
            if isinstance(chunk.get("error"), dict):
                message = chunk["error"].get("message", "error")
                raise ModelError(f"the server at {self.model.http.base_url} failed mid-answer: {message}")
            if isinstance(chunk.get("usage"), dict):
                self._usage[-1] = chunk["usage"]
            server = chunk.get("qvq")
            if isinstance(server, dict) and server.get("stop_reason") in ("budget", "loop", "max_tokens"):
                self.stop_reason = server["stop_reason"]  # qvq serve cut the thought itself: say so here too
            for choice in chunk.get("choices") or []:
                delta = choice.get("delta") or {}
                if choice.get("finish_reason") == "length":
                    self.stop_reason = "max_tokens"
                reasoning = delta.get("reasoning_content") or delta.get("reasoning")
                if reasoning:
                    self._pending.append(("reasoning", reasoning))
                if delta.get("content"):
                    self._pending.append(("content", delta["content"]))
            if self._pending:
                return self._pending.popleft()
        return None

    def _close_response(self) -> None:
        if self._response is not None:
            try:
                self._response.close()  # the server sees the disconnect and stops generating
            except OSError:
                pass
            self._response = None

    # -- the Session protocol
    def prefill(self, prompt: Prompt) -> PrefillStats:
        chat = prompt.chat or ChatTurn(question=prompt.text)  # the backend reads ``chat`` (chat_messages)
        question = chat.question
        messages: list[dict] = []
        if chat.system and self.traits.system_message:
            messages.append({"role": "system", "content": chat.system})
        for turn in chat.history:  # earlier turns: user turns with their images, assistant turns' answers
            if turn.role == "assistant":
                messages.append({"role": "assistant", "content": turn.text})
            else:
                messages.append({"role": "user", "content": _user_content(turn.text, turn.images)})
        earlier = sum(len(turn.images) for turn in chat.history)  # the prompt lists theirs first
        messages.append(
            {
                "role": "user",
                "content": _user_content(
                    question, prompt.images[earlier:], prompt.image_labels, prompt.clip, self.model.kind
                ),
            }
        )
        self._messages = messages
        body = self._body(messages)
        if self.traits.budget_on_server and chat.think_budget is not None:
            body["thinking_budget"] = chat.think_budget
        if self.traits.answer_budget_on_server and chat.answer_budget is not None:
            body["answer_budget"] = chat.answer_budget
        if self.traits.enable_thinking:  # Alibaba's API: thinking is asked for, on unless switched off
            body["enable_thinking"] = chat.think is not False
        elif chat.think is not None:  # the template's switch, as vLLM, SGLang and qvq serve take it
            body["chat_template_kwargs"] = {"enable_thinking": chat.think}
        per_image = [self.model.image_token_estimate(*im.size) for im in prompt.images]
        if prompt.clip is not None:  # two frames a temporal patch, except where they go as images
            frames = len(prompt.clip.frames)
            patches = frames if self.model.kind == "llama-server" else (frames + 1) // 2
            per_image.append(patches * self.model.image_token_estimate(*prompt.clip.frame_size))
        self.n_past_estimate = self.prompt_bound(prompt.text, per_image)
        self._max_new = chat.max_new_tokens
        if self._max_new is not None and not self.traits.budget_on_server:
            # the controller's cap, within what the server's context leaves after the prompt: a server may
            # refuse more (vLLM answers 400) or go on generating after the client closes the stream
            # (llama-cpp-python's does)
            body["max_tokens"] = self.max_tokens_sent = self._fit(self._max_new)
        t0 = time.perf_counter()
        self._open(body)
        first = self._read_piece()  # the server's prefill ends with its first delta
        seconds = time.perf_counter() - t0
        if first is not None:
            self._pending.appendleft(first)
        else:
            self._done = True
        self.images_encoded = len(prompt.images) + (prompt.clip is not None)
        self.n_past = self.n_past_estimate
        return PrefillStats(
            prompt_tokens=self.n_past,
            image_tokens=sum(per_image),
            image_encode_s=0.0,
            prefill_s=seconds,
            image_tokens_per_image=per_image,
        )

    @staticmethod
    def prompt_bound(text: str, image_tokens: list[int]) -> int:
        """An upper bound on a prompt's tokens without the server's tokenizer: one per byte of the
        templated text (image placeholders left out), plus each image's tokens."""
        return len(text.replace(DEFAULT_FAMILY.image_pad, "").encode("utf-8")) + sum(image_tokens)

    def _fit(self, tokens: int, prompt_bound: int | None = None) -> int:
        """``tokens`` within the server's stated context after a prompt of up to ``prompt_bound`` tokens
        (None: this question's); as is when the server states no context."""
        context = self.model.context_length
        if not context:
            return tokens
        bound = self.n_past_estimate if prompt_bound is None else prompt_bound
        room = context - bound
        if room < 1:
            raise ContextOverflow(
                f"the prompt needs up to {bound} tokens (counted as an upper bound: a token "
                f"per byte, plus the image tokens), but the server's context holds {context}",
                hint="lower --max-pixels, or shorten the question",
            )
        return min(tokens, room)

    def step(self, banned=None) -> Token:
        if self._done:
            return Token(0, "", is_eos=True)
        piece = self._pending.popleft() if self._pending else self._read_piece()
        if piece is None:
            self._done = True
            self._close_response()
            return Token(0, "", is_eos=True)
        field, text = piece
        self._written.append(text)
        self._generated += 1
        if field == "reasoning":
            self._reasoning_field = True
        elif not self._content_started:
            self._content_started = True
            if self._reasoning_field:
                text = REASONING_END + text  # the boundary the server drew, for the controller's splitter
        self.n_past += 1
        return Token(self.n_past, text)

    def feed(self, text: str) -> int:
        """The controller cut the thought: stop this stream, then continue the reply after ``text`` where
        the server can; elsewhere end with stop reason ``cut``."""
        self._close_response()
        self._pending.clear()
        n = self.count_tokens(text)
        self.n_past += n
        how = self.traits.continuation
        if how is None:
            self.stop_reason = "cut"
            self._done = True
            return n
        assistant = "".join(self._written) + text
        body = self._body([*self._messages, {"role": "assistant", "content": assistant}])
        if self._max_new is not None:
            # what is left of the cap: the server's running count where it sends one, else the chunks
            usage = self._usage[-1] if self._usage else None
            used = _positive_int_or_zero((usage or {}).get("completion_tokens"))
            left = max(1, self._max_new - max(used or 0, self._generated))
            body["max_tokens"] = self._fit(left, self.n_past_estimate + len(assistant.encode("utf-8")))
        if how == "vllm":
            body["continue_final_message"] = True
            body["add_generation_prompt"] = False
        self._written.append(text)
        self._content_started = True  # what follows is answer; no boundary to write
        self._open(body)
        return n

    def count_tokens(self, text: str) -> int:
        """An estimate (the server's tokenizer is not here): about four bytes a token."""
        return max(1, len(text.encode("utf-8")) // 4) if text else 0

    def close(self) -> None:
        self._close_response()
        self._done = True
