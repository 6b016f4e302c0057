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

HTTP is the standard library's (``urllib``): this backend needs nothing installed.
"""

from __future__ import annotations

import base64
import io
import json
import os
import time
import urllib.error
import urllib.request
from collections import deque
from dataclasses import dataclass
from urllib.parse import urlsplit

from qvq_local.backends.base import ChatTurn, PrefillStats, Prompt, SamplingParams, Token
from qvq_local.backends.options import OpenAIOptions
from qvq_local.errors import BackendUnavailable, InputError, ModelError
from qvq_local.families import DEFAULT_FAMILY

BACKEND = "openai"
#: What the session writes between a reasoning field and the content that follows it.
REASONING_END = "\n</think>\n\n"
#: A context size to plan with; the server enforces its own.
REMOTE_CONTEXT = 131072
#: Environment variables read for the key when none is given, in order (QVQ-Max reads DashScope's first).
KEY_ENV = ("QVQ_API_KEY", "OPENAI_API_KEY")
QVQ_MAX_KEY_ENV = ("DASHSCOPE_API_KEY", "QVQ_API_KEY")
#: Alibaba Model Studio's OpenAI-compatible endpoint (international; in mainland China:
#: https://dashscope.aliyuncs.com/compatible-mode/v1).
QVQ_MAX_BASE_URL = "https://dashscope-intl.aliyuncs.com/compatible-mode/v1"


@dataclass(frozen=True)
class Traits:
    """How one kind of server is driven."""

    budget_on_server: bool  # thinking_budget is honoured by the server
    continuation: str | None  # "vllm" | "prefill" | None: how to continue an assistant message
    system_message: bool = True
    extra_sampling: bool = True  # accepts top_k and repetition_penalty
    enable_thinking: bool = False


TRAITS = {
    "qvq": Traits(budget_on_server=True, continuation=None),
    "qvq-max": Traits(
        budget_on_server=True,
        continuation=None,
        system_message=False,
        extra_sampling=False,
        enable_thinking=True,
    ),
    "vllm": Traits(budget_on_server=False, continuation="vllm"),
    "llama-server": Traits(budget_on_server=False, continuation="prefill"),
    "generic": Traits(budget_on_server=False, continuation=None, extra_sampling=False),
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


def _png_data_uri(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


class RemoteModel:
    """A model on a server: what :class:`qvq_local.model.Model` needs of a loaded model."""

    backend = BACKEND
    quantization = "remote"
    chat_template = None  # the server applies its own
    generation_config: dict = {}
    context_length = REMOTE_CONTEXT

    def __init__(self, http: _Http, name: str, kind: str):
        self.http = http
        self.name = name
        self.kind = kind
        self.traits = TRAITS[kind]
        #: the registry's ``server_budget`` capability: this server keeps the thinking budget and the loop
        #: stop itself (qvq serve, QVQ-Max), so the client sends them and does not count them again
        self.budget_on_server = self.traits.budget_on_server

    @staticmethod
    def image_token_estimate(width: int, height: int) -> int:
        return int(DEFAULT_FAMILY.image_tokens(width, height))

    def new_session(self, sampling: SamplingParams, *, n_ctx: int | None = None) -> RemoteSession:
        return RemoteSession(self, sampling, n_ctx or REMOTE_CONTEXT)

    def close(self) -> None:
        pass


def open_model(model: str | None, options: OpenAIOptions) -> RemoteModel:
    """Reach the server, detect its kind when asked to, and pick the model (the only one served, when
    ``model`` is None).  The registry's ``open_model`` for this backend: ``options`` are checked already
    (the URL's form, the kind)."""
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
    if kind == "auto" or not model:
        try:
            listing = http.get_json("/models")
        except ModelError:
            if not model:
                raise
    if not model:
        ids = [m.get("id") for m in (listing or {}).get("data", []) if isinstance(m, dict)]
        if len(ids) != 1:
            raise InputError(
                f"name the remote model with -m: the server at {url} serves {', '.join(map(str, ids)) or 'none'}"
            )
        model = str(ids[0])
    if kind == "auto":
        kind = detect_kind(http, model, listing)
    return RemoteModel(http, model, kind)


class RemoteSession:
    """One question on the server: a streamed request, then (after a cut) perhaps a continuation."""

    backend = BACKEND

    def __init__(self, model: RemoteModel, sampling: SamplingParams, n_ctx: int):
        self.model = model
        self.traits = model.traits
        self.sampling = sampling
        self.n_ctx = n_ctx
        self.n_past = 0
        self.images_encoded = 0
        #: set when the server ended the reply for its own reason: "max_tokens" (finish_reason length)
        #: or "cut" (thinking was cut at the budget and this server cannot continue a reply)
        self.stop_reason: str | None = None
        self.usage: dict | None = None
        self._response = None
        self._pending: deque = deque()
        self._written: list[str] = []  # what the model wrote, for a continuation
        self._reasoning_field = False  # the reasoning came in a field of its own
        self._content_started = False
        self._done = False
        self._messages: list[dict] = []
        self._max_new: int | None = None
        self._generated = 0  # deltas received

    # -- the request
    def _body(self, messages: list[dict]) -> dict:
        body: dict = {"model": self.model.name, "messages": messages, "stream": True}
        body["stream_options"] = {"include_usage": True}
        s = self.sampling
        for name in ("temperature", "top_p", "seed"):
            if getattr(s, name) is not None:
                body[name] = getattr(s, name)
        if self.traits.extra_sampling:
            if s.top_k is not None:
                body["top_k"] = s.top_k
            if s.repetition_penalty is not None:
                body["repetition_penalty"] = s.repetition_penalty
        return body

    def _open(self, body: dict) -> None:
        self._close_response()
        self._response = self.model.http.open("POST", "/chat/completions", body)
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
            if chunk.get("usage"):
                self.usage = chunk["usage"]
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
        content: list[dict] = [
            {"type": "image_url", "image_url": {"url": _png_data_uri(im)}} for im in prompt.images
        ]
        content.append({"type": "text", "text": question})
        messages: list[dict] = []
        if chat.system and self.traits.system_message:
            messages.append({"role": "system", "content": chat.system})
        messages.append({"role": "user", "content": content})
        self._messages = messages
        body = self._body(messages)
        if self.traits.budget_on_server and chat.think_budget is not None:
            body["thinking_budget"] = chat.think_budget
        if self.traits.enable_thinking:  # Alibaba's API: thinking is asked for, on unless switched off
            body["enable_thinking"] = chat.think is not False
        elif chat.think is not None:  # the template's switch, as vLLM, SGLang and qvq serve take it
            body["chat_template_kwargs"] = {"enable_thinking": chat.think}
        self._max_new = chat.max_new_tokens
        if self._max_new is not None and not self.traits.budget_on_server:
            # a server may go on generating after the client closes the stream (llama-cpp-python's does):
            # never let it run past what the controller could use
            body["max_tokens"] = self._max_new
        per_image = [self.model.image_token_estimate(*im.size) for im in prompt.images]
        t0 = time.perf_counter()
        self._open(body)
        first = self._read_piece()  # the server's prefill ends with its first delta
        seconds = time.perf_counter() - t0
        if first is not None:
            self._pending.appendleft(first)
        else:
            self._done = True
        self.images_encoded = len(prompt.images)
        self.n_past = self.count_tokens(question) + sum(per_image)
        return PrefillStats(
            prompt_tokens=self.n_past,
            image_tokens=sum(per_image),
            image_encode_s=0.0,
            prefill_s=seconds,
            image_tokens_per_image=per_image,
        )

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
            body["max_tokens"] = max(1, self._max_new - self._generated)
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
