"""``qvq serve``: an OpenAI-compatible endpoint with thinking budgets that work for QVQ.

Other servers (Ollama, LM Studio, llama-server, mlx-vlm, vLLM) key their reasoning budgets on ``<think>``
tags, which QVQ-72B-Preview never writes.  This one runs the project's own reasoning controller, so
``thinking_budget`` (QVQ-Max's request field) cuts the thought and forces an answer, and the thought
streams as ``reasoning_content``/``reasoning`` ahead of the answer in ``content``.

Pieces: :mod:`.schema` (the request and the chunks), :mod:`.media` (images over HTTP and their limits),
:mod:`.worker` (the single-model queue), :mod:`.app` (the FastAPI routes).  FastAPI and uvicorn are the
``serve`` extra; they are imported only when a server starts.
"""

from __future__ import annotations

import ipaddress
import os

from qvq_local.errors import BackendUnavailable, InputError

INSTALL_HINT = "pip install 'qvq-local[serve]'"
#: The environment variable read when --api-key is not given.
API_KEY_ENV = "QVQ_API_KEY"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_installed() -> None:
    from importlib.util import find_spec

    missing = [m for m in ("fastapi", "uvicorn") if find_spec(m) is None]
    if missing:
        raise BackendUnavailable(f"qvq serve needs {' and '.join(missing)}", hint=INSTALL_HINT)


def serve(
    model_ref: str | None,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    queue: int = 8,
    backend: str = "auto",
    max_pixels: int | None = None,
    detail: str | None = None,
    allow_image_urls: bool = False,
    max_images: int | None = None,
    max_body_bytes: int | None = None,
    gpu_layers: int | str | None = None,
    warn=print,
) -> None:
    """Load the model once and serve it until interrupted."""
    from dataclasses import replace

    from qvq_local.serve.media import Limits, return_freed_memory

    check_installed()
    if not 0 < port < 65536:
        raise InputError(f"--port must be in 1..65535, got {port}")
    if queue < 0:
        raise InputError(f"--queue must be 0 or more, got {queue}")
    if detail is not None:
        from qvq_local.detail import AUTO, check_level

        detail = check_level(detail)
        detail = None if detail == AUTO else detail
    from qvq_local.backends.llama_buffers import requested_gpu_layers

    gpu_layers = requested_gpu_layers(gpu_layers)
    api_key = api_key or os.environ.get(API_KEY_ENV) or None
    if not is_loopback(host) and not api_key:
        warn(
            f"warning: serving on {host} without an API key: anyone who can reach this port can use the model "
            f"(set --api-key or {API_KEY_ENV})"
        )
    limits = Limits(allow_image_urls=allow_image_urls)
    if max_images is not None:
        limits = replace(limits, max_images=max_images)
    if max_body_bytes is not None:
        limits = replace(limits, max_body_bytes=max_body_bytes)

    import uvicorn

    from qvq_local.api import load
    from qvq_local.serve.app import ServeOptions, create_app

    return_freed_memory()  # so that decoding images holds its budget, not the allocator's high-water mark
    model = load(model_ref, backend=backend, max_pixels=max_pixels, detail=detail, gpu_layers=gpu_layers)
    try:
        app = create_app(model, ServeOptions(api_key=api_key, queue=queue, limits=limits))
        worker = app.state.worker

        class Server(uvicorn.Server):
            def handle_exit(self, sig, frame) -> None:
                # SIGTERM/SIGINT: end every answer now, with an error event, while its connection is still
                # open; uvicorn then waits for the responses (up to its grace period) instead of cutting
                # them off mid-stream
                worker.stop()
                super().handle_exit(sig, frame)

        warn(
            f"qvq serve: {model.name} ({model.backend}) on http://{host}:{port}/v1 · {model.image_bound().label()}"
        )
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=2)
        try:
            Server(config).run()
        finally:
            worker.shutdown()
    finally:
        model.close()
