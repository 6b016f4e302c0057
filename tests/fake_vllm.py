"""A stand-in for vLLM's OpenAI-compatible server, behaving as its documentation and source say.

What it does as vLLM does (vLLM 0.x ``vllm/entrypoints/openai``; checked against a real vLLM 0.32 CPU build,
see DESIGN.md):
* ``GET /v1/models`` lists the model with ``owned_by: "vllm"`` and ``max_model_len`` (its ``ModelCard``);
* a chat request whose ``max_tokens`` (or ``max_completion_tokens``) exceeds ``max_model_len`` is refused
  with 400 (``max_tokens=N cannot be greater than max_model_len=max_total_tokens=M``), and one whose prompt
  plus ``max_tokens`` exceeds it with 400 (``This model's maximum context length is ...``); without
  ``max_tokens`` the reply may run to the end of the context;
* a sampling field the request leaves out takes the checkpoint's generation_config (``GENERATION_CONFIG``,
  the values vLLM logged for the tiny QVQ-layout checkpoint); ``top_k`` and ``repetition_penalty`` are
  taken as extra fields; any other unknown field is ignored (vLLM logs a warning), and listed in
  ``ignored`` so a test can see a field that was sent under a name vLLM does not read;
* ``stream_options.include_usage``: a last chunk with ``choices: []`` and ``usage``, the other chunks
  carrying ``usage: null``; with ``continuous_usage_stats`` every chunk carries the running usage;
* ``continue_final_message`` with ``add_generation_prompt: false`` continues the last assistant message;
* ``finish_reason: "length"`` when ``max_tokens`` ends the reply.

Its tokenizer is its own (one token per word, three per message for the chat framing, each image's Qwen
grid tokens plus its two vision markers), and some of its streamed pieces hold two tokens, as vLLM's do
when the detokenizer waits for a whole character: so a client that counts chunks counts wrong, and one
that reads ``usage`` counts right.
"""

from __future__ import annotations

import base64
import io
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

#: What this fake's checkpoint ships in generation_config.json (applied to the fields a request omits).
GENERATION_CONFIG = {"temperature": 0.05, "top_p": 0.005, "top_k": 3, "repetition_penalty": 1.1, "seed": None}
#: The body fields it reads (vLLM's ChatCompletionRequest, the ones that matter here).
KNOWN = {
    "model",
    "messages",
    "stream",
    "stream_options",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "repetition_penalty",
    "seed",
    "continue_final_message",
    "add_generation_prompt",
}
#: The reply, as (text, tokens) pieces: QVQ-style thought, its marker, the answer.
THOUGHT = [
    ("Let", 1),
    (" me", 1),
    (" look", 1),
    (" at", 1),
    (" the", 1),
    (" chart", 1),
    (" carefully.", 2),
    (" There", 1),
    (" are", 1),
    (" five", 1),
    (" bars", 1),
    (" of", 1),
    (" different", 1),
    (" heights.", 2),
    (" The", 1),
    (" fourth", 1),
    (" looks", 1),
    (" tallest.", 2),
]
MARKER = [("\n\n**Final Answer**\n\n", 3)]
ANSWER = [("The", 1), (" fourth", 1), (" bar.", 2), (" $$\\boxed{4}$$", 5)]
CONTINUATION = [("The", 1), (" fourth", 1), (" bar", 1), (" is", 1), (" the", 1), (" highest.", 2)]


def image_tokens(url: str) -> int:
    """Tokens of one ``data:`` image for a Qwen2-VL processor: 28-pixel cells after the resize (the sizes
    qvq sends are on that grid already), plus ``<|vision_start|>`` and ``<|vision_end|>``."""
    from PIL import Image

    data = base64.b64decode(url.split(",", 1)[1])
    width, height = Image.open(io.BytesIO(data)).size
    return (width // 28) * (height // 28) + 2


def prompt_tokens(messages: list[dict]) -> int:
    count = 0
    for message in messages:
        count += 3  # <|im_start|>role\n ... <|im_end|>
        content = message.get("content")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content or []
        for part in parts:
            if part.get("type") == "text":
                count += len(re.findall(r"\S+", part["text"]))
            elif part.get("type") == "image_url":
                count += image_tokens(part["image_url"]["url"])
    return count + 3  # the generation prompt


class FakeVllm:
    """The server on a free localhost port; ``requests`` records what each chat request got."""

    def __init__(
        self,
        model: str = "Qwen/QVQ-72B-Preview",
        max_model_len: int | None = 2048,
        reasoning_parser: bool = False,
        owned_by: str = "vllm",
    ):
        self.model = model
        self.max_model_len = max_model_len
        self.reasoning_parser = reasoning_parser
        self.owned_by = owned_by
        self.requests: list[dict] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _json(self, status: int, data: dict) -> None:
                raw = json.dumps(data).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def do_GET(self):
                if self.path.rstrip("/") != "/v1/models":
                    self._json(404, {"error": {"message": "Not Found", "code": 404}})
                    return
                card = {"id": fake.model, "object": "model", "created": 0, "owned_by": fake.owned_by}
                card.update(root=fake.model, parent=None, permission=[])
                if fake.max_model_len is not None:
                    card["max_model_len"] = fake.max_model_len
                self._json(200, {"object": "list", "data": [card]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                record = fake.check(body)
                fake.requests.append(record)
                if record["status"] != 200:
                    self._json(record["status"], {"error": record["error"]})
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                try:
                    for line in fake.stream(body, record):
                        self.wfile.write(line)
                        self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    record["disconnected"] = True  # the client closed the stream (its budget)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # ------------------------------------------------------------------ vLLM's checks
    def check(self, body: dict) -> dict:
        record: dict = {"body": body, "status": 200, "sent": [], "completion_tokens": 0, "running": []}
        record["ignored"] = sorted(set(body) - KNOWN)
        record["sampling"] = {
            name: body[name] if body.get(name) is not None else default
            for name, default in GENERATION_CONFIG.items()
        }
        messages = body["messages"]
        continuing = bool(body.get("continue_final_message")) and messages[-1]["role"] == "assistant"
        record["continuing"] = continuing
        record["prompt_tokens"] = prompt_tokens(messages) - (3 if continuing else 0)
        limit = self.max_model_len or 10**9
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
        if max_tokens is not None and max_tokens > limit:
            return self._refuse(
                record,
                f"max_tokens={max_tokens} cannot be greater than max_model_len=max_total_tokens={limit}. "
                "Please request fewer output tokens.",
            )
        if max_tokens is not None and record["prompt_tokens"] + max_tokens > limit:
            return self._refuse(
                record,
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{max_tokens} output tokens and your prompt contains at least {record['prompt_tokens']} "
                f"input tokens, for a total of at least {record['prompt_tokens'] + max_tokens} tokens. "
                "Please reduce the length of the input prompt or the number of requested output tokens.",
            )
        record["max_tokens"] = max_tokens if max_tokens is not None else limit - record["prompt_tokens"]
        return record

    @staticmethod
    def _refuse(record: dict, message: str) -> dict:
        record["status"] = 400
        record["error"] = {"message": message, "type": "BadRequestError", "param": "max_tokens", "code": 400}
        return record

    # ------------------------------------------------------------------ the stream
    def stream(self, body: dict, record: dict):
        options = body.get("stream_options") or {}
        include_usage = bool(options.get("include_usage"))
        continuous = include_usage and bool(options.get("continuous_usage_stats"))
        pieces = CONTINUATION if record["continuing"] else THOUGHT + MARKER + ANSWER
        in_thought = not record["continuing"]

        def usage() -> dict:
            done = record["completion_tokens"]
            prompt = record["prompt_tokens"]
            return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}

        def chunk(delta: dict, finish: str | None = None) -> bytes:
            data = {
                "id": "chatcmpl-fake",
                "object": "chat.completion.chunk",
                "created": 0,
                "model": self.model,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
                "usage": usage() if continuous else None,
            }
            return f"data: {json.dumps(data)}\n\n".encode()

        yield chunk({"role": "assistant", "content": ""})
        finish = "stop"
        for text, tokens in pieces:
            if record["completion_tokens"] + tokens > record["max_tokens"]:
                finish = "length"
                break
            record["completion_tokens"] += tokens
            record["running"].append(record["completion_tokens"])
            record["sent"].append(text)
            if (text, tokens) == MARKER[0]:
                in_thought = False
                if self.reasoning_parser:
                    continue  # the parser drops the marker between the reasoning and the content
            field = "reasoning" if self.reasoning_parser and in_thought else "content"
            yield chunk({field: text})
        yield chunk({}, finish)
        if include_usage:
            data = {
                "id": "chatcmpl-fake",
                "object": "chat.completion.chunk",
                "created": 0,
                "model": self.model,
            }
            data.update(choices=[], usage=usage())
            yield f"data: {json.dumps(data)}\n\n".encode()
        yield b"data: [DONE]\n\n"
