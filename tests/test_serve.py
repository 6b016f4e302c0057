"""`qvq serve` driven by the official `openai` client, on the tiny synthetic GGUF model.

What is checked against what: the served answers against the Python API's own answer for the same
question and settings (``Model.ask``: the path ``qvq ask`` takes), the wire format against what the
`openai` package parses, and the limits and errors against OpenAI's error shape and status codes.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from serve_util import ServerThread, SlowDown, data_uri, free_port

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("llama_cpp")

pytestmark = [pytest.mark.llama, pytest.mark.slow]

KEY = "test-key-0123"
QUESTION = "Which bar is the highest?"
BUDGET = {"thinking_budget": 16, "answer_budget": 8, "seed": 1}


@pytest.fixture(scope="module")
def served(tiny_gguf_f32):
    from qvq_local.api import load
    from qvq_local.serve.app import ServeOptions, create_app
    from qvq_local.serve.media import Limits

    model = load(tiny_gguf_f32.model, backend="llama")
    slow = SlowDown(model)
    app = create_app(
        model, ServeOptions(api_key=KEY, queue=4, limits=Limits(max_images=2, max_body_bytes=2_000_000))
    )
    with ServerThread(app) as server:
        server.model, server.slow, server.app = model, slow, app
        yield server
    app.state.worker.shutdown()  # a generation still running must stop before the model is closed
    model.close()


@pytest.fixture
def client(served):
    served.slow.delay = 0.0
    return openai.OpenAI(base_url=served.base_url, api_key=KEY, max_retries=0, timeout=120)


def _messages(image, question=QUESTION, system=None):
    out = [{"role": "system", "content": system}] if system else []
    content = [
        {"type": "image_url", "image_url": {"url": data_uri(image)}},
        {"type": "text", "text": question},
    ]
    return out + [{"role": "user", "content": content}]


def _reference(served, image, **options):
    """The same question through the Python API (what `qvq ask` runs), while no request is in flight."""
    return served.model.ask(image, QUESTION, **options)


def _wait_idle(served, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = served.app.state.worker.state()
        if state["running"] == 0 and state["waiting"] == 0:
            return state
        time.sleep(0.02)
    raise AssertionError("the server did not go idle")


def test_non_streamed_answer_with_a_budget_matches_the_api(served, client, sample_image):
    reply = client.chat.completions.create(
        model=served.model.name, messages=_messages(sample_image), extra_body=BUDGET
    )
    ref = _reference(served, sample_image, think_budget=16, answer_budget=8, seed=1)
    message = reply.choices[0].message
    extra = message.model_extra
    assert ref.forced and ref.forced[0].reason == "budget"  # the budget did cut the thought
    assert extra["reasoning_content"] == extra["reasoning"] == ref.thought
    assert message.content == ref.answer
    assert 16 <= ref.thought_tokens <= 16 + 32
    assert reply.usage.completion_tokens_details.reasoning_tokens == ref.thought_tokens
    assert reply.usage.completion_tokens == ref.thought_tokens + ref.answer_tokens
    assert reply.usage.prompt_tokens == ref.prompt_tokens
    qvq = reply.model_extra["qvq"]
    assert qvq["stop_reason"] == ref.stop_reason and qvq["forced"][0]["reason"] == "budget"
    assert reply.choices[0].finish_reason == ("length" if ref.stop_reason == "max_tokens" else "stop")
    assert qvq["timings"]["decode_tok_s"] > 0


def test_streamed_reasoning_then_content(served, client, sample_image):
    stream = client.chat.completions.create(
        model=served.model.name,
        messages=_messages(sample_image),
        stream=True,
        stream_options={"include_usage": True},
        extra_body=BUDGET,
    )
    thought, answer, order, finish, usage, qvq = [], [], [], None, None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta.model_extra or {}
        if delta.get("reasoning_content"):
            assert delta["reasoning"] == delta["reasoning_content"]
            thought.append(delta["reasoning_content"])
            order.append("t")
        if chunk.choices[0].delta.content:
            answer.append(chunk.choices[0].delta.content)
            order.append("a")
        if chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
            qvq = chunk.model_extra.get("qvq")
    ref = _reference(served, sample_image, think_budget=16, answer_budget=8, seed=1)
    assert "".join(thought).strip() == ref.thought
    assert "".join(answer).strip() == ref.answer
    assert order == sorted(order, key=lambda x: x != "t")  # every thought delta before every answer delta
    assert finish in ("stop", "length") and qvq["stop_reason"] == ref.stop_reason
    assert usage.completion_tokens_details.reasoning_tokens == ref.thought_tokens


def test_models_and_health(served, client):
    assert [m.id for m in client.models.list()] == [served.model.name]
    health = httpx.get(served.base_url.replace("/v1", "/health"))  # no key needed
    assert health.status_code == 200 and health.json()["status"] == "ok"


def test_unsupported_fields_are_refused_with_400(served, client, sample_image):
    for extra, param in (
        ({"n": 2}, "n"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
        ({"stop": ["x"]}, "stop"),
        ({"frobnicate": 1}, "frobnicate"),
        ({"temperature": 5}, "temperature"),
    ):
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(
                model=served.model.name, messages=_messages(sample_image), extra_body=extra
            )
        assert err.value.status_code == 400
        assert err.value.body["param"] == param, err.value.body
    with pytest.raises(openai.BadRequestError) as err:  # a question without an image
        client.chat.completions.create(model=served.model.name, messages=[{"role": "user", "content": "hi"}])
    assert "image" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:  # a file path is never read
        client.chat.completions.create(
            model=served.model.name,
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": f"file://{sample_image}"}},
                        {"type": "text", "text": "q"},
                    ],
                }
            ],
        )
    assert "data: URIs or http(s) URLs" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:  # URLs are off unless the operator allows them
        client.chat.completions.create(
            model=served.model.name,
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": "http://example.com/a.png"}},
                        {"type": "text", "text": "q"},
                    ],
                }
            ],
        )
    assert "--allow-image-urls" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:  # not an image: the same check as qvq ask
        client.chat.completions.create(
            model=served.model.name,
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8gd29ybGQ="}},
                        {"type": "text", "text": "q"},
                    ],
                }
            ],
        )
    assert err.value.body["code"] == "invalid_image"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=_messages(sample_image))


def test_wrong_or_missing_key_is_401(served, sample_image):
    bad = openai.OpenAI(base_url=served.base_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model=served.model.name, messages=_messages(sample_image))
    assert httpx.get(served.base_url + "/models").status_code == 401  # no header at all


def test_body_and_image_limits_are_413(served, client, sample_image):
    big = "x" * 2_100_000
    with pytest.raises(openai.APIStatusError) as err:
        client.chat.completions.create(
            model=served.model.name, messages=_messages(sample_image, question=big)
        )
    assert err.value.status_code == 413
    three = [{"type": "image_url", "image_url": {"url": data_uri(sample_image)}}] * 3
    with pytest.raises(openai.APIStatusError) as err:
        client.chat.completions.create(
            model=served.model.name,
            messages=[{"role": "user", "content": [*three, {"type": "text", "text": "q"}]}],
        )
    assert err.value.status_code == 413 and "at most 2" in err.value.body["message"]

    # a streamed body without Content-Length is counted as it arrives
    def chunks():
        for _ in range(30):
            yield b"x" * 100_000

    raw = httpx.post(
        served.base_url + "/chat/completions", content=chunks(), headers={"Authorization": f"Bearer {KEY}"}
    )
    assert raw.status_code == 413


def _post_stream(served, image, budget=400):
    body = {
        "model": served.model.name,
        "messages": _messages(image),
        "stream": True,
        "thinking_budget": budget,
        "answer_budget": 64,
    }
    return httpx.stream(
        "POST",
        served.base_url + "/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=60,
    )


def test_disconnect_stops_generation_and_frees_the_model(served, client, sample_image):
    _wait_idle(served)
    served.slow.delay = 0.02  # 50 tok/s: the full run (400+ thought tokens) would take 8 s or more
    before = served.app.state.worker.state()
    closed_before = served.slow.closed
    with _post_stream(served, sample_image) as response:
        assert response.status_code == 200
        seen = 0
        for line in response.iter_lines():
            if line.startswith("data: ") and "reasoning" in line:
                seen += 1
            if seen >= 3:
                break  # leaving the block closes the connection mid-stream
    t_left = time.monotonic()
    state = _wait_idle(served, timeout=5)
    stopped_in = time.monotonic() - t_left
    assert state["cancelled"] == before["cancelled"] + 1
    assert served.slow.closed == closed_before + 1  # the backend session was closed
    assert state["last_cancelled_events"] < 60  # stopped after a few tokens, not 400
    assert stopped_in < 2.0
    served.slow.delay = 0.0
    reply = client.chat.completions.create(  # the model is free for the next client
        model=served.model.name, messages=_messages(sample_image), extra_body=BUDGET
    )
    assert reply.choices[0].message.model_extra["reasoning_content"]


def test_full_queue_is_429_with_retry_after(served, sample_image):
    _wait_idle(served)
    served.slow.delay = 0.05
    open_streams = []
    try:
        for _ in range(5):  # one running, four waiting (queue=4)
            ctx = _post_stream(served, sample_image)
            response = ctx.__enter__()
            assert response.status_code == 200
            open_streams.append(ctx)
        refused = httpx.post(
            served.base_url + "/chat/completions",
            json={"model": served.model.name, "messages": _messages(sample_image), **BUDGET},
            headers={"Authorization": f"Bearer {KEY}"},
        )
        assert refused.status_code == 429
        assert int(refused.headers["retry-after"]) > 0
        assert refused.json()["error"]["code"] == "queue_full"
    finally:
        for ctx in open_streams:
            ctx.__exit__(None, None, None)
        served.slow.delay = 0.0
    _wait_idle(served)


def test_four_concurrent_clients_each_get_the_full_answer(served, client, sample_image):
    _wait_idle(served)
    ref = _reference(served, sample_image, think_budget=16, answer_budget=8, seed=1)
    replies, errors = [None] * 4, []

    def one(i):
        try:
            if i % 2:  # two streamed, two not
                parts = {"t": [], "a": []}
                stream = client.chat.completions.create(
                    model=served.model.name, messages=_messages(sample_image), stream=True, extra_body=BUDGET
                )
                for chunk in stream:
                    if chunk.choices:
                        d = chunk.choices[0].delta
                        parts["t"].append((d.model_extra or {}).get("reasoning_content") or "")
                        parts["a"].append(d.content or "")
                replies[i] = ("".join(parts["t"]).strip(), "".join(parts["a"]).strip())
            else:
                r = client.chat.completions.create(
                    model=served.model.name, messages=_messages(sample_image), extra_body=BUDGET
                )
                replies[i] = (
                    r.choices[0].message.model_extra["reasoning_content"],
                    r.choices[0].message.content,
                )
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert replies == [(ref.thought, ref.answer)] * 4


def test_qvq_serve_command_starts_and_warns_beyond_localhost(tiny_gguf_f32, tmp_path):
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "qvq_local.cli",
            "serve",
            "-m",
            str(tiny_gguf_f32.model),
            "--host",
            "0.0.0.0",
            "--port",
            str(port),
            "--backend",
            "llama",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except httpx.TransportError:
                assert proc.poll() is None, proc.stderr.read()
                assert time.monotonic() < deadline, "qvq serve did not come up"
                time.sleep(0.2)
        assert health.json()["model"]
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models").json()  # no key set: open
        assert models["data"][0]["owned_by"] == "qvq-local"
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert "without an API key" in err


def test_serve_refuses_bad_options_in_one_line(tiny_gguf_f32):
    out = subprocess.run(
        [sys.executable, "-m", "qvq_local.cli", "serve", "-m", str(tiny_gguf_f32.model), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0
    assert "--port must be in 1..65535" in out.stderr and "Traceback" not in out.stderr


def test_private_addresses_are_refused_for_image_urls():
    from qvq_local.serve.media import Limits, image_bytes
    from qvq_local.serve.schema import ApiError, ImageRef

    allow = Limits(allow_image_urls=True)
    for url in (
        "http://127.0.0.1/x.png",
        "http://localhost:8000/x.png",
        "http://10.1.2.3/x.png",
        "http://[::1]/x.png",
        "http://169.254.169.254/latest/meta-data",
    ):
        with pytest.raises(ApiError) as err:
            image_bytes(ImageRef(url=url, index=0, where="part"), allow)
        assert err.value.status == 400 and "non-public address" in err.value.message, url
    with pytest.raises(ApiError) as err:
        image_bytes(ImageRef(url="/etc/passwd", index=0, where="part"), allow)
    assert "not a path" in err.value.message


def test_a_json_body_that_is_not_json_is_400(served):
    r = httpx.post(
        served.base_url + "/chat/completions", content=b"{nope", headers={"Authorization": f"Bearer {KEY}"}
    )
    assert r.status_code == 400 and json.loads(r.text)["error"]["type"] == "invalid_request_error"


def test_a_repeated_image_reuses_its_prefix_from_memory(served, client, sample_image):
    """Issue 16's in-memory half in the server: a second question about the same image starts from the
    first one's image prefix (the model's LRU), not from a fresh encode and prefill."""
    from qvq_local.prefix_cache import MemoryCache

    _wait_idle(served)
    served.model.prefix_cache = MemoryCache()  # empty, so the first request is a fresh prefill
    first = client.chat.completions.create(
        model=served.model.name, messages=_messages(sample_image), extra_body=BUDGET
    )
    again = client.chat.completions.create(
        model=served.model.name,
        messages=_messages(sample_image, question="Which bar is the lowest?"),
        extra_body=BUDGET,
    )
    sources = [r.model_extra["qvq"]["settings"]["prefix_cache"]["source"] for r in (first, again)]
    assert sources == ["fresh", "memory"]
    assert again.choices[0].message.content is not None


# ------------------------------------------------------------------ issue 22: what a hostile probe found


def _raw(served, body: bytes, timeout: float = 60):
    """POST bytes as they are (the JSON extensions and escapes a client library would never send)."""
    return httpx.post(
        served.base_url + "/chat/completions",
        content=body,
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
        timeout=timeout,
    )


def _body(served, image, **fields) -> dict:
    return {
        "model": served.model.name,
        "messages": _messages(image),
        "thinking_budget": 4,
        "answer_budget": 4,
        **fields,
    }


def _assert_error_json(response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = json.loads(response.text)["error"]  # strict: a NaN in the body would not even parse here
    assert error["type"] == "invalid_request_error" and error["message"]
    return error


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize(
    "field, token",
    [("temperature", "NaN"), ("repetition_penalty", "NaN"), ("top_p", "-Infinity"), ("temperature", "1e400")],
)
def test_nan_and_infinity_are_400_before_anything_runs(served, sample_image, field, token, stream):
    """Defect 1: `"temperature": NaN` (Python's parser takes it) passed every range check, ran the whole
    generation and then answered 500, or streamed a final chunk holding the literal NaN."""
    _wait_idle(served)
    steps = served.slow.steps
    text = json.dumps(_body(served, sample_image, stream=stream, **{field: 12345.5}))
    response = _raw(served, text.replace("12345.5", token).encode())
    error = _assert_error_json(response, 400)
    assert token in error["message"]
    assert served.slow.steps == steps  # refused before any token


@pytest.mark.parametrize(
    "where",
    ["question", "system", "model", "image_url", "metadata key"],
)
def test_a_lone_surrogate_is_400_naming_the_field(served, sample_image, where):
    """Defect 2: a lone surrogate in the question gave 500 (UnicodeEncodeError at the tokenizer).  The rule,
    for every string and key of the body: 400 naming where it is."""
    _wait_idle(served)
    body = _body(served, sample_image)
    bad = "\ud800 hi"
    if where == "question":
        body["messages"][-1]["content"][1]["text"] = bad
        param = "messages[0].content[1].text"
    elif where == "system":
        body["messages"] = _messages(sample_image, system=bad)
        param = "messages[0].content"
    elif where == "model":
        body["model"] = bad
        param = "model"
    elif where == "image_url":
        body["messages"][-1]["content"][0]["image_url"]["url"] += bad
        param = "messages[0].content[0].image_url.url"
    else:
        body["metadata"] = {bad: "x"}
        param = "metadata.\\ud800 hi"
    response = _raw(served, json.dumps(body).encode())  # ensure_ascii: the surrogate goes as \ud800
    error = _assert_error_json(response, 400)
    assert error["param"] == param and "surrogate" in error["message"], error


def test_a_deeply_nested_body_is_400(served, sample_image):
    """Defect 3: a body nested 100,000 arrays deep gave 500 (RecursionError in the JSON parser)."""
    deep = b"[" * 100_000 + b"]" * 100_000
    _assert_error_json(_raw(served, deep), 400)
    body = json.dumps(_body(served, sample_image, metadata={"x": 0})).encode()
    nested = body.replace(b'{"x": 0}', b'{"x": ' + b"[" * 200 + b"]" * 200 + b"}")  # deep, but parseable
    error = _assert_error_json(_raw(served, nested), 400)
    assert "nested" in error["message"]


def test_a_non_streamed_client_that_leaves_is_cancelled(served, client, sample_image):
    """Defect 4: a non-streaming client that disconnected was not cancelled: its generation ran to the end
    while the next request waited behind it.  Now it stops within a token, as a streamed one does."""
    _wait_idle(served)
    served.slow.delay = 0.02  # 50 tok/s: the whole answer (400+ thought tokens) would take 8 s or more
    before = served.app.state.worker.state()
    closed_before = served.slow.closed
    body = _body(served, sample_image, thinking_budget=400, answer_budget=64)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            served.base_url + "/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {KEY}"},
            timeout=httpx.Timeout(60, read=1.5),  # the client gives up mid-generation and closes
        )
    t_left = time.monotonic()
    state = _wait_idle(served, timeout=5)
    stopped_in = time.monotonic() - t_left
    assert state["cancelled"] == before["cancelled"] + 1
    assert served.slow.closed == closed_before + 1  # the backend session was closed
    assert state["last_cancelled_events"] < 200  # stopped early, not after 400+ tokens
    assert stopped_in < 2.0
    served.slow.delay = 0.0
    reply = client.chat.completions.create(  # the model is free for the next client
        model=served.model.name, messages=_messages(sample_image), extra_body=BUDGET
    )
    assert reply.choices[0].message.content is not None


def _png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` (RGB) and whose pixels are one empty row: what a
    decompression bomb looks like before it is decoded."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00"))
        + chunk(b"IEND", b"")
    )


def _big_png(tmp_path, megapixels: int) -> Path:
    """A real, decodable PNG of ``megapixels`` (one colour: a few hundred KB on disk)."""
    from PIL import Image

    path = tmp_path / f"big-{megapixels}mp.png"
    side = int((megapixels * 1_000_000) ** 0.5)
    Image.new("RGB", (side, side), (200, 40, 40)).save(path)
    return path


def _image_body(served, uris: list[str], **fields) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in uris]
    return {
        "model": served.model.name,
        "messages": [{"role": "user", "content": [*parts, {"type": "text", "text": QUESTION}]}],
        "thinking_budget": 2,
        "answer_budget": 2,
        **fields,
    }


@pytest.fixture
def decode_spy(monkeypatch):
    """Counts the image decodes (qvq_local.images.load_image) and the most that ran at once; each holds
    its decode for ``hold_s`` so that concurrent requests really overlap."""
    import qvq_local.images as images

    original = images.load_image
    spy = type("Spy", (), {"calls": 0, "running": 0, "most": 0, "hold_s": 0.0})()
    lock = threading.Lock()

    def counted(*args, **kwargs):
        with lock:
            spy.calls += 1
            spy.running += 1
            spy.most = max(spy.most, spy.running)
        try:
            time.sleep(spy.hold_s)
            return original(*args, **kwargs)
        finally:
            with lock:
                spy.running -= 1

    monkeypatch.setattr(images, "load_image", counted)
    return spy


def test_a_full_queue_is_429_before_any_image_is_decoded(served, sample_image, decode_spy, tmp_path):
    """Defect 5: a full queue answered 429 only after decoding every image (four requests of 36 MP PNGs took
    12-14 s each to be refused, and RSS went to ~1 GB).  Admission comes first now."""
    _wait_idle(served)
    served.slow.delay = 0.05
    big = data_uri(_big_png(tmp_path, 36))
    open_streams = []
    try:
        for _ in range(5):  # one running, four waiting (queue=4)
            ctx = _post_stream(served, sample_image)
            assert ctx.__enter__().status_code == 200
            open_streams.append(ctx)
        decode_spy.calls = 0
        statuses, took = [], []

        def refused():
            t0 = time.monotonic()
            r = _raw(served, json.dumps(_image_body(served, [big, big])).encode())
            took.append(time.monotonic() - t0)
            statuses.append((r.status_code, r.json()["error"]["code"]))

        threads = [threading.Thread(target=refused) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert statuses == [(429, "queue_full")] * 4
        assert decode_spy.calls == 0  # not one image decoded for a request that was refused
        assert max(took) < 5.0, took  # (decoding two 36 MP images takes seconds on its own)
    finally:
        for ctx in open_streams:
            ctx.__exit__(None, None, None)
        served.slow.delay = 0.0
    _wait_idle(served)


def test_image_decoding_shares_one_memory_budget(served, decode_spy, tmp_path):
    """Defect 5's other half: decoding holds a bounded memory budget across concurrent requests (the
    served app's default, 512 MiB); three requests of two 16 MP RGB PNGs (about 190 MB each to decode)
    never decode more than two images at once, and all three are answered."""
    _wait_idle(served)
    uri = data_uri(_big_png(tmp_path, 16))
    decode_spy.hold_s = 0.4  # each decode lasts long enough for the requests to overlap
    statuses = []

    def one():
        r = _raw(served, json.dumps(_image_body(served, [uri, uri])).encode(), timeout=120)
        statuses.append(r.status_code)

    threads = [threading.Thread(target=one) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert statuses == [200, 200, 200]
    assert decode_spy.calls == 6
    assert decode_spy.most == 2, decode_spy.most  # three at once would be ~580 MB
    budget = served.app.state.decode_budget
    assert budget.total == 512 * 2**20
    assert budget.peak <= budget.total and budget.used == 0
    _wait_idle(served)


@pytest.mark.parametrize("width, height", [(6000, 7000), (20000, 10000)], ids=["42MP", "200MP-bomb"])
def test_every_image_over_the_pixel_limit_is_413(served, width, height, decode_spy):
    """Defect 6: an image over Pillow's own bomb limit (~179 MP) got 400 "too large to decode safely" while
    one of 42 MP got 413: the same class of input gets the same status, and neither is decoded."""
    import base64

    uri = "data:image/png;base64," + base64.b64encode(_png_declaring(width, height)).decode()
    error = _assert_error_json(_raw(served, json.dumps(_image_body(served, [uri])).encode()), 413)
    assert error["code"] == "request_too_large" and error["param"] == "messages[0].content[0]"
    assert "40000000 pixels" in error["message"] or "40,000,000 pixels" in error["message"]
    assert decode_spy.calls == 0


_SLOW_SERVE = """
import sys
sys.path.insert(0, {tests!r})
import qvq_local.api as api
from serve_util import SlowDown

real_load = api.load


def slow_load(*args, **kwargs):
    model = real_load(*args, **kwargs)
    SlowDown(model).delay = {delay!r}  # the real `qvq serve`, each token held back: a long answer
    return model


api.load = slow_load
from qvq_local.cli import main

sys.argv = ["qvq", "serve", "-m", {model!r}, "--port", "{port}", "--backend", "llama", "--queue", "2"]
main()
"""


def test_sigterm_mid_stream_ends_with_an_error_event(tiny_gguf_f32, sample_image):
    """Defect 8: on SIGTERM mid-stream the stream ended with neither [DONE] nor an error (uvicorn cancelled
    the response after its grace period; a CancelledError traceback went to the log), so a client could not
    tell a cut answer from a finished one.  Now the stream ends with OpenAI's error object in a data: line,
    a request still waiting gets a JSON 503, and the server exits without a traceback."""
    from pathlib import Path as _Path

    port = free_port()
    script = _SLOW_SERVE.format(
        tests=str(_Path(__file__).parent), delay=0.05, model=str(tiny_gguf_f32.model), port=port
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(base + "/health", timeout=1)
                break
            except httpx.TransportError:
                assert proc.poll() is None, proc.stderr.read()
                assert time.monotonic() < deadline, "qvq serve did not come up"
                time.sleep(0.2)
        image = {"type": "image_url", "image_url": {"url": data_uri(sample_image)}}
        body = {
            "messages": [{"role": "user", "content": [image, {"type": "text", "text": QUESTION}]}],
            "thinking_budget": 400,
            "answer_budget": 64,
        }
        waiting: dict = {}

        def second():  # queued behind the stream: it must be answered too, not dropped
            r = httpx.post(base + "/v1/chat/completions", json=body, timeout=60)
            waiting["status"], waiting["body"] = r.status_code, r.text

        lines: list[str] = []
        cut = None
        with httpx.stream(
            "POST", base + "/v1/chat/completions", json={**body, "stream": True}, timeout=60
        ) as response:
            assert response.status_code == 200
            thread = threading.Thread(target=second)
            try:
                for line in response.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    lines.append(line[6:])
                    if len(lines) == 4:
                        thread.start()
                        time.sleep(0.5)  # the second request is in the queue
                        proc.send_signal(signal.SIGTERM)
            except httpx.HTTPError as err:  # the connection closed mid-stream
                cut = err
        thread.join(timeout=60)
        assert cut is None, f"the stream was cut without an ending: {cut!r}; last lines {lines[-2:]}"
        assert lines[-1] != "[DONE]", lines[-3:]  # the answer did not finish: it must not look finished
        error = json.loads(lines[-1])["error"]
        assert error["type"] == "server_error" and error["code"] == "server_shutting_down", error
        for line in lines[:-1]:
            json.loads(line)  # every other line is a whole chunk
        assert waiting["status"] == 503, waiting
        assert json.loads(waiting["body"])["error"]["code"] == "server_shutting_down"
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert "Traceback" not in err and "CancelledError" not in err, err


def test_a_waiting_client_that_leaves_frees_its_place_at_once(served, sample_image):
    """Found by the load test (issue 22): a client that left while its request waited kept its place until
    the worker reached the dead job, so clients that disconnect could fill the queue and get live ones
    refused with 429.  Its place is free as soon as it leaves."""
    _wait_idle(served)
    served.slow.delay = 0.05
    held = []
    try:
        for _ in range(5):  # one running, four waiting (queue=4): full
            ctx = _post_stream(served, sample_image)
            assert ctx.__enter__().status_code == 200
            held.append(ctx)
        for ctx in (held.pop(), held.pop()):  # two of the waiting ones leave
            ctx.__exit__(None, None, None)
        deadline = time.monotonic() + 5
        while served.app.state.worker.state()["waiting"] > 2:
            assert time.monotonic() < deadline, served.app.state.worker.state()
            time.sleep(0.05)
        for _ in range(2):  # and their places take new requests at once
            ctx = _post_stream(served, sample_image)
            assert ctx.__enter__().status_code == 200
            held.append(ctx)
    finally:
        for ctx in held:
            ctx.__exit__(None, None, None)
        served.slow.delay = 0.0
    _wait_idle(served)


def test_a_client_that_leaves_mid_body_is_no_server_error(served):
    """Issue 22's class: a client that closes the connection halfway through its body made Starlette raise
    ClientDisconnect out of the route, logged as "Exception in ASGI application" with a traceback (a 500
    nobody received).  It is an ordinary client error now, and the server goes on answering."""
    import logging
    import socket

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("uvicorn.error")
    logger.addHandler(handler)
    try:
        conn = socket.create_connection(("127.0.0.1", served.port))
        conn.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {KEY}\r\nContent-Length: 1000\r\n\r\n".encode()
            + b'{"messages": ['
        )
        time.sleep(0.3)
        conn.close()
        time.sleep(0.5)
    finally:
        logger.removeHandler(handler)
    assert not [r for r in records if r.levelno >= logging.ERROR], [r.getMessage() for r in records]
    assert httpx.get(served.base_url.replace("/v1", "/health")).status_code == 200


# ------------------------------------------------------------------ issue 24: chat front-ends (earlier turns)


def test_a_three_turn_conversation_through_the_openai_client(served, client, sample_image):
    """What every chat front-end does: the whole conversation each turn.  Each turn answers as the Python
    API answers the same conversation; turns 2 and 3 start from turn 1's image prefix in memory and encode
    no image again; the thought of an earlier reply sent back is dropped before the model sees it."""
    from qvq_local.conversation import Turn
    from qvq_local.prefix_cache import MemoryCache

    _wait_idle(served)
    served.model.prefix_cache = MemoryCache()  # empty: turn 1 is a fresh prefill
    served.slow.encoded.clear()
    served.slow.prompts.clear()
    questions = ["Which bar is the highest?", "And the lowest?", "How many bars are there?"]
    messages = _messages(sample_image, questions[0])
    replies = []
    for turn, question in enumerate(questions):
        if turn:
            previous = replies[-1].choices[0].message
            content = previous.content
            if turn == 2:  # a client that sends the whole reply back, thought and QVQ's marker included
                content = previous.model_extra["reasoning_content"] + "\n\n**Final Answer**\n\n" + content
            messages += [{"role": "assistant", "content": content}, {"role": "user", "content": question}]
        replies.append(
            client.chat.completions.create(model=served.model.name, messages=messages, extra_body=BUDGET)
        )
    # the model saw turn 2's reply as its answer alone: the thought the client sent back was dropped
    thought, answer = (
        replies[1].choices[0].message.model_extra["reasoning_content"],
        replies[1].choices[0].message.content,
    )
    last_prompt = served.slow.prompts[-1]
    assert f"<|im_start|>assistant\n{answer}<|im_end|>" in last_prompt and thought not in last_prompt
    sources = [r.model_extra["qvq"]["settings"]["prefix_cache"]["source"] for r in replies]
    assert sources == ["fresh", "memory", "memory"]
    assert served.slow.encoded[-3:] == [1, 0, 0]  # turn 1's image was encoded once, in turn 1
    # the same conversation through the API (earlier assistant turns as answers only)
    history: list = []
    for turn, question in enumerate(questions):
        reply = replies[turn]
        own = [sample_image] if turn == 0 else []
        ref = served.model.ask(own, question, history=history, think_budget=16, answer_budget=8, seed=1)
        assert reply.choices[0].message.content == ref.answer, turn
        assert reply.choices[0].message.model_extra["reasoning_content"] == ref.thought, turn
        assert reply.model_extra["qvq"]["stop_reason"] == ref.stop_reason
        assert ref.thought_tokens <= 16 + 32  # the budget applies to the new turn only
        history += [Turn.user(question, own), Turn.assistant(ref.answer)]


@pytest.mark.parametrize(
    ("conversation", "param", "words"),
    [
        ([("user", "q"), ("assistant", "a")], "messages[1]", "ends with an assistant message"),
        ([("user", "q"), ("assistant", ""), ("user", "q2")], "messages[1]", "the assistant turn is empty"),
        ([("user", ""), ("assistant", "a"), ("user", "q2")], "messages[0]", "the user turn is empty"),
        (
            [("user", "q"), ("assistant", "IMAGE"), ("user", "q2")],
            "messages[1].content[0]",
            "images belong in user",
        ),
        ([("user", "q"), ("tool", "x"), ("user", "q2")], "messages[1]", "tool messages are not supported"),
    ],
)
def test_malformed_conversations_are_400_in_one_line(
    served, client, sample_image, conversation, param, words
):
    image_part = {"type": "image_url", "image_url": {"url": data_uri(sample_image)}}
    messages = []
    for i, (role, text) in enumerate(conversation):
        if text == "IMAGE":
            content = [image_part, {"type": "text", "text": "look"}]
        elif role == "user" and i == 0 and text:
            content = [image_part, {"type": "text", "text": text}]
        else:
            content = text
        messages.append({"role": role, "content": content})
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=served.model.name, messages=messages, extra_body=BUDGET)
    body = err.value.body
    assert err.value.status_code == 400 and body["param"] == param, body
    assert words in body["message"] and "\n" not in body["message"]


def test_models_lists_the_context(served, client):
    (card,) = client.models.list().data
    assert card.model_extra["max_model_len"] == served.model.context_length > 0


# ------------------------------------------------------------------ issue 24: image detail per request


def _photo(tmp_path) -> Path:
    from PIL import Image, ImageDraw

    path = tmp_path / "photo.png"
    image = Image.new("RGB", (1200, 900), (230, 230, 230))
    ImageDraw.Draw(image).rectangle([100, 100, 700, 500], fill=(30, 90, 200))
    image.save(path)
    return path


def _detail_body(served, parts: list[dict], **fields) -> dict:
    return {
        "model": served.model.name,
        "messages": [{"role": "user", "content": [*parts, {"type": "text", "text": QUESTION}]}],
        "thinking_budget": 4,
        "answer_budget": 4,
        "seed": 1,
        **fields,
    }


def _post(served, body: dict):
    return httpx.post(
        served.base_url + "/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=300,
    )


def test_an_image_part_sets_its_own_detail_or_max_pixels(served, tmp_path):
    photo = _photo(tmp_path)
    uri = data_uri(photo)
    # detail high, as OpenAI's image parts say it: the same image, answer and settings as the API's
    reply = _post(
        served, _detail_body(served, [{"type": "image_url", "image_url": {"url": uri, "detail": "high"}}])
    )
    assert reply.status_code == 200, reply.text
    qvq = reply.json()["qvq"]
    local = served.model.ask(photo, QUESTION, detail="high", think_budget=4, answer_budget=4, seed=1)
    assert qvq["images"][0]["size"] == list(local.images[0].size) and qvq["images"][0]["tokens"] > 1024
    assert reply.json()["choices"][0]["message"]["content"] == local.answer
    detail = qvq["settings"]["detail"]
    assert detail["level"] == "high" and detail["source"] == "messages[0].content[0].image_url.detail"
    assert detail["max_pixels"] == local.settings["detail"]["max_pixels"]

    # two images, one high and one bounded in pixels: each its own bound; the question's the widest
    parts = [
        {"type": "image_url", "image_url": {"url": uri, "detail": "HIGH"}},
        {"type": "image_url", "image_url": {"url": uri, "max_pixels": 50_176}},
    ]
    reply = _post(served, _detail_body(served, parts))
    assert reply.status_code == 200, reply.text
    first, second = reply.json()["qvq"]["images"]
    assert first["size"] == list(local.images[0].size)
    assert second["size"][0] * second["size"][1] <= 50_176 and second["tokens"] <= 64
    assert reply.json()["qvq"]["settings"]["detail"]["level"] == "high"

    # none given: the server's default, the machine's level, as the API's default
    reply = _post(
        served, _detail_body(served, [{"type": "image_url", "image_url": {"url": uri, "detail": "auto"}}])
    )
    assert reply.status_code == 200, reply.text
    default = served.model.image_bound()
    qvq = reply.json()["qvq"]
    assert (
        qvq["settings"]["detail"]["source"] == "machine"
        and qvq["settings"]["max_pixels"] == default.max_pixels
    )
    size = qvq["images"][0]["size"]
    assert size[0] * size[1] <= default.max_pixels


@pytest.mark.parametrize(
    "image_url, words",
    [
        (
            {"detail": "ultra"},
            "messages[0].content[0].image_url.detail must be low | medium | high | max | auto",
        ),
        ({"detail": 3}, "messages[0].content[0].image_url.detail must be"),
        ({"max_pixels": 0}, "messages[0].content[0].image_url.max_pixels must be at least 1, got 0"),
        ({"max_pixels": "big"}, "messages[0].content[0].image_url.max_pixels must be an integer"),
    ],
)
def test_a_bad_detail_or_max_pixels_is_400_naming_the_part(served, sample_image, image_url, words):
    parts = [{"type": "image_url", "image_url": {"url": data_uri(sample_image), **image_url}}]
    error = _assert_error_json(_post(served, _detail_body(served, parts)), 400)
    assert error["message"].startswith(words), error


def test_a_request_past_the_context_is_400_naming_its_own_fields(served, sample_image):
    """The hint of a request that cannot fit names the request's fields, not qvq ask's flags."""
    body = _body(served, sample_image, thinking_budget=10**9)
    reply = httpx.post(
        f"{served.base_url}/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=60,
    )
    assert reply.status_code == 400, reply.text
    message = reply.json()["error"]["message"]
    assert "thinking_budget" in message and "image_url.max_pixels" in message and "--" not in message
