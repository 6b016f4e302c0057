"""Shared by the `qvq serve` and openai-backend tests: a served tiny model in a background thread."""

from __future__ import annotations

import base64
import socket
import threading
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


class SlowDown:
    """Wraps a loaded model's sessions so each ``step`` waits ``delay`` seconds (0: full speed), and counts
    the steps, so tests can hold a generation open (queue, disconnect) and see when it stops; keeps each
    prompt prefilled and each session's image encodes."""

    def __init__(self, model):
        self.delay = 0.0
        self.steps = 0
        self.closed = 0
        self.encoded: list[int] = []  # each closed session's images_encoded, in order
        self.prompts: list[str] = []  # each prefilled prompt's text, in order
        original = model.loaded.new_session
        outer = self

        def new_session(*args, **kwargs):
            session = original(*args, **kwargs)
            step, close, prefill = session.step, session.close, session.prefill

            def seen_prefill(prompt, **k):
                outer.prompts.append(prompt.text)
                return prefill(prompt, **k)

            def slow_step(*a, **k):
                if outer.delay:
                    time.sleep(outer.delay)
                outer.steps += 1
                return step(*a, **k)

            def counted_close():
                outer.closed += 1
                outer.encoded.append(session.images_encoded)
                return close()

            session.step = slow_step
            session.close = counted_close
            session.prefill = seen_prefill
            return session

        model.loaded.new_session = new_session


class ServerThread:
    """uvicorn serving ``app`` on a free localhost port, in a daemon thread."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)
