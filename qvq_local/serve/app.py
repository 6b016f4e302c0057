"""The ASGI app behind ``qvq serve``: OpenAI-compatible chat completions for one loaded model.

Routes: ``POST /v1/chat/completions`` (streamed as server-sent events or not), ``GET /v1/models``,
``GET /health``.  With an API key every route but ``/health`` needs ``Authorization: Bearer KEY``, checked
in constant time.  Errors have OpenAI's shape (``{"error": {"message", "type", "param", "code"}}``).

A request pays in this order, and each step refuses before the next costs anything: the key (401); the
body's size (413, from Content-Length, then while it is read); the body as strict JSON and the request's
fields (400); the image count (413); a place in the queue (429 with ``Retry-After``); then each image,
fetched or decoded, its pixel count read from its header first (413) and its decoding done within the
memory budget shared by all requests (:class:`qvq_local.serve.media.DecodeBudget`); then the generation.

The generation itself is the Python API's (:meth:`qvq_local.model.Model.stream_settings`): the same prompt,
context sizing, reasoning controller and budget forcing as ``qvq ask``; this module only translates.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from dataclasses import dataclass
from typing import Any

# this module is imported only when a server is made (``qvq serve``), so FastAPI may load here; the route
# annotations need these names at module level to be resolved
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.requests import ClientDisconnect

from qvq_local import openai_format, strict_json
from qvq_local.serve import schema
from qvq_local.serve.media import DecodeBudget, Limits, check_count, check_videos, load_clip, load_images
from qvq_local.serve.worker import END, Job, QueueFull, Stopping, Worker

log = logging.getLogger("qvq.serve")


@dataclass(frozen=True)
class ServeOptions:
    api_key: str | None = None
    queue: int = 8
    limits: Limits = Limits()
    retry_after_s: int = 5


def _error_response(err: schema.ApiError):
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def _settings_for(request: schema.ChatRequest, model: Any):
    from qvq_local.backends.base import SamplingParams
    from qvq_local.budgets import DEFAULT_ANSWER_BUDGET
    from qvq_local.errors import InputError
    from qvq_local.settings import AskSettings

    try:
        return AskSettings(
            think_budget=request.think_budget,
            answer_budget=request.answer_budget or DEFAULT_ANSWER_BUDGET,
            max_tokens=request.max_tokens,
            sampling=SamplingParams(**request.sampling),
            think=request.think,
            labels={
                "think_budget": "thinking_budget",
                "answer_budget": "answer_budget",
                "max_tokens": "max_tokens",
                "think": "enable_thinking",
                "detail": "image_url.detail",
                "max_pixels": "image_url.max_pixels",
            },
        )
    except InputError as err:
        raise schema.ApiError(400, str(err)) from None


def _image_settings(settings: Any, ref: schema.ImageRef) -> Any:
    """``settings`` with one image part's ``detail`` and ``max_pixels`` (named by the part in messages and
    in the result's ``settings.detail.source``); unchanged when the part gives neither."""
    from dataclasses import replace

    if ref.detail is None and ref.max_pixels is None:
        return settings
    labels = {
        **settings.labels,
        "detail": f"{ref.where}.image_url.detail",
        "max_pixels": f"{ref.where}.image_url.max_pixels",
    }
    return replace(settings, detail=ref.detail, max_pixels=ref.max_pixels, labels=labels)


def _image_bounds(settings: Any, refs: list[schema.ImageRef], model: Any) -> tuple[Any, list]:
    """Each image's bound (its part's ``detail`` / ``max_pixels``, else the server's: the model's own, else
    the machine's default level), and the question's settings with the widest of them, the bound that
    holds every image of the prompt (what its ``settings.detail`` reports and the context is sized for)."""
    per_image = [_image_settings(settings, ref) for ref in refs]
    bounds = [model.image_bound(s) for s in per_image]
    if bounds:
        widest = max(range(len(bounds)), key=lambda i: bounds[i].max_pixels)
        settings = per_image[widest]
    return settings, bounds


def _sampled_clip(model: Any, ref: Any, limits: Limits, budget: DecodeBudget):
    """A request's clip, sampled for ``model`` (natively or as frames, as a question will take it), as the
    :class:`~qvq_local.video_prompt.ClipInput` its question is asked about."""
    from qvq_local.backends import registry
    from qvq_local.video import VideoOptions
    from qvq_local.video_prompt import ClipInput, goes_in_natively, temporal_patch

    family = model.family
    native = goes_in_natively(family, model.name, model.spec.has(registry.VIDEO_INPUT))
    clip = load_clip(
        ref,
        limits,
        VideoOptions(),
        family=family,
        temporal_patch=temporal_patch(family, native),
        machine=model.machine_class,
        budget=budget,
    )
    return ClipInput(path=clip.path, sampled=clip)


def create_app(model: Any, options: ServeOptions | None = None):
    """The FastAPI app serving ``model`` (a :class:`qvq_local.model.Model`, already loaded).

    ``app.state.worker`` is its queue (call ``shutdown()`` on it when the server stops).
    """
    options = options or ServeOptions()
    worker = Worker(queue=options.queue)
    decode_budget = DecodeBudget(options.limits.decode_budget_bytes)
    app = FastAPI(title="qvq serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.worker = worker
    app.state.decode_budget = decode_budget
    app.state.model = model
    key = options.api_key.encode() if options.api_key else None

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if key is not None and request.url.path != "/health":
            given = request.headers.get("authorization", "")
            scheme, _, token = given.partition(" ")
            ok = hmac.compare_digest(token.strip().encode(), key) and scheme.lower() == "bearer"
            if not ok:
                return _error_response(
                    schema.ApiError(
                        401,
                        "missing or wrong API key (send Authorization: Bearer KEY)",
                        kind="authentication_error",
                        code="invalid_api_key",
                    )
                )
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > options.limits.max_body_bytes:
            return _error_response(
                schema.ApiError(
                    413,
                    f"request body of {length} bytes is over this server's {options.limits.max_body_bytes}",
                    code="request_too_large",
                )
            )
        return await call_next(request)

    @app.exception_handler(schema.ApiError)
    async def api_error(_request: Request, err: schema.ApiError):
        return _error_response(err)

    @app.get("/health")
    async def health():
        return {
            "status": "ok",
            "model": model.name,
            "backend": model.backend,
            "queue": worker.state(),
            "decode": decode_budget.state(),
        }

    @app.get("/v1/models")
    async def models():
        card = {"id": model.name, "object": "model", "created": 0, "owned_by": "qvq-local"}
        if model.context_length:
            card["max_model_len"] = model.context_length  # vLLM's field: what a client may plan with
        return {"object": "list", "data": [card]}

    async def read_body(request: Request) -> dict:
        limit = options.limits.max_body_bytes
        data = bytearray()
        try:
            async for piece in request.stream():
                data += piece
                if len(data) > limit:
                    raise schema.ApiError(
                        413, f"request body is over {limit} bytes", code="request_too_large"
                    )
        except ClientDisconnect:  # the client left mid-body: a client error, for nobody to read
            raise schema.ApiError(400, "the client closed the connection before the body ended") from None
        try:
            return strict_json.loads(bytes(data), max_values=options.limits.max_json_values)
        except strict_json.JsonError as err:
            where = "" if err.path else "the request body: "
            raise schema.ApiError(400, f"{where}{err}", param=err.path, code="invalid_json") from None

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await read_body(request)
        parsed = schema.parse_chat_request(body)
        if parsed.model not in (None, "", model.name):
            raise schema.ApiError(
                404,
                f"model {parsed.model!r} is not served here; this server runs {model.name!r}",
                param="model",
                code="model_not_found",
            )
        settings = _settings_for(parsed, model)
        refs = parsed.all_images()  # the earlier turns' images too: the prompt shows them again
        if not refs and not parsed.videos:
            raise schema.ApiError(
                400, "no image or clip in the conversation: QVQ answers questions about images and clips"
            )
        if parsed.images and parsed.videos:
            raise schema.ApiError(
                400, "a clip and images together: ask about the clip, or about the images", param="messages"
            )
        if parsed.videos and parsed.history:
            raise schema.ApiError(
                400,
                "a clip is asked about in a conversation's first turn only: send it without the earlier turns",
                param="messages",
                code="unsupported_conversation",
            )
        check_count(refs, options.limits)
        check_videos(parsed.videos, options.limits)
        settings, bounds = _image_bounds(settings, refs, model)
        # admission before any cost: a full queue answers 429 at once, with no image fetched or decoded
        try:
            ticket = worker.reserve()
        except QueueFull:
            raise schema.ApiError(
                429,
                f"the server is busy ({options.queue} requests already waiting); retry later",
                kind="rate_limit_error",
                code="queue_full",
                headers={"Retry-After": str(options.retry_after_s)},
            ) from None
        except Stopping:
            raise _shutting_down() from None
        try:
            if parsed.videos:
                images = await asyncio.to_thread(
                    _sampled_clip, model, parsed.videos[0], options.limits, decode_budget
                )
                history = parsed.history
            else:
                loaded = await asyncio.to_thread(load_images, refs, options.limits, bounds, decode_budget)
                history, images = _with_images(parsed.history, loaded)

            def events():
                system = _with_system(settings, parsed.system)
                return iter(model.stream_settings(images, parsed.question, system, history=history))

            job = Job(make_events=events, loop=asyncio.get_running_loop())
            try:
                worker.submit(job, ticket)
            except Stopping:
                raise _shutting_down() from None
        finally:
            ticket.release()  # a no-op once the job holds the place
        completion_id, created = openai_format.new_id(), schema.now()
        if parsed.stream:
            return StreamingResponse(
                _sse(job, completion_id, created, model.name, parsed.include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        result = await _wait(job, request)
        if result is None:  # the client went away
            return JSONResponse({}, status_code=499)
        out = openai_format.completion_dict(result, created=created, completion_id=completion_id)
        message = out["choices"][0]["message"]
        message["reasoning"] = message["reasoning_content"]  # the newer clients' name for it
        return out

    return app


def _with_images(history: tuple, images: list) -> tuple[tuple, list]:
    """The earlier turns with their images loaded (``images``: the conversation's, in order, as
    :meth:`schema.ChatRequest.all_images` lists them), and the question's own images, the rest."""
    from dataclasses import replace

    turns, at = [], 0
    for turn in history:
        n = len(turn.images)
        turns.append(replace(turn, images=tuple(images[at : at + n])))
        at += n
    return tuple(turns), images[at:]


def _with_system(settings, system: str | None):
    from dataclasses import replace

    if system is None:
        return settings  # QVQ's own system prompt
    return replace(settings, system=system)


def _shutting_down() -> schema.ApiError:
    return schema.ApiError(
        503,
        "the server is shutting down; this request was not completed (retry on another server or later)",
        kind="server_error",
        code="server_shutting_down",
    )


def _raise_from(err: BaseException):
    from qvq_local.errors import ContextOverflow, QvqError

    if isinstance(err, Stopping):
        return _shutting_down()
    if isinstance(err, ContextOverflow):
        return schema.ApiError(400, str(err), code="context_length_exceeded")
    if isinstance(err, QvqError):
        return schema.ApiError(400, str(err))
    log.error("generation failed: %r", err)
    return schema.ApiError(500, f"generation failed: {type(err).__name__}", kind="server_error")


async def _disconnected(request) -> None:
    """Returns when the client has gone (the body is already read, so the next message is the end)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _wait(job: Job, request) -> Any:
    """The final Result of a non-streamed job; None when the client disconnected (the job is cancelled).

    The disconnect is watched beside the events, not between them: tokens arrive faster than any polling
    interval, so a check made only when none came in time never ran while the model was generating."""
    from qvq_local.events import Finished

    gone = asyncio.ensure_future(_disconnected(request))
    result = None
    try:
        while True:
            getter = asyncio.ensure_future(job.events.get())
            done, _ = await asyncio.wait({getter, gone}, return_when=asyncio.FIRST_COMPLETED)
            if getter not in done:
                getter.cancel()
                job.cancel()  # stops after the current token, or before it starts when still waiting
                return None
            item = getter.result()
            if item is END:
                return result
            if isinstance(item, BaseException):
                raise _raise_from(item)
            if isinstance(item, Finished):
                result = item.result
    finally:
        gone.cancel()


def _sse_line(data: dict | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {text}\n\n".encode()


async def _sse(job: Job, completion_id: str, created: int, name: str, include_usage: bool):
    """Server-sent events for one job, ending with ``[DONE]`` after a complete answer or with OpenAI's
    error object after anything else; closing this generator (the client left) cancels the job."""
    from qvq_local.events import Finished, Forced, TextDelta

    try:
        yield _sse_line(schema.chunk(completion_id, created, name, {"role": "assistant", "content": ""}))
        while True:
            item = await job.events.get()
            if item is END:
                break
            if isinstance(item, BaseException):
                # an error event ends the stream, and no [DONE] follows it: a cut answer (a failure, the
                # server shutting down) must never look like a finished one
                yield _sse_line(_raise_from(item).body())
                return
            if isinstance(item, TextDelta) and item.text:
                delta = schema.delta_for(item.phase, item.text)
                yield _sse_line(schema.chunk(completion_id, created, name, delta))
            elif isinstance(item, Forced):
                continue  # its text follows as ordinary deltas; the final chunk lists it under "qvq"
            elif isinstance(item, Finished):
                result = item.result
                final = schema.chunk(completion_id, created, name, {}, openai_format.finish_reason(result))
                final["qvq"] = openai_format.completion_dict(result)["qvq"]
                yield _sse_line(final)
                if include_usage:
                    usage = schema.chunk(completion_id, created, name, {})
                    usage["choices"] = []
                    usage["usage"] = openai_format.usage_dict(result)
                    yield _sse_line(usage)
        yield _sse_line("[DONE]")
    finally:
        job.cancel()  # a no-op once the job ended; stops it within a token when the client left early
