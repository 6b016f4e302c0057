"""Hostile input, generated (issue 22): one generator of awkward values drives every field of a chat request,
every option of `qvq ask` and every `qvq config set`, and the answers must stay inside the contract.

The values: arbitrary JSON (nested lists and objects), arbitrary strings (lone surrogates, NUL, right-to-left
text, 100,000 characters) and arbitrary numbers (NaN, infinities, -0.0, 1e308, 2**70, 10**400).

* ``qvq serve``: each example takes a valid request and puts generated values at one to three places (any
  field, the whole message, the whole body, raw bytes), with a right, wrong or missing key.  The status is
  always 200, 400, 401, 404 (only for a generated ``model`` name), 413 or 429, never a 5xx; every body is
  strict JSON (an error object, a completion, or a stream of strict-JSON chunks that ends with ``[DONE]``
  or an error object); and afterwards the server answers a normal request.
* ``qvq ask``: generated values as the text of each option (and the question): exit code 0, 2 or 3, one
  ``error:`` line (or click's usage error for a value that is not a number), no traceback, no ``--save``
  file and nothing on stdout after a failure.
* ``qvq config set``: exit 0 or 2, one line, the settings file unchanged after a failure and strict JSON
  after a success.

Example counts are fixed (no database, deadlines off) so the run time is bounded; ``-s`` prints them.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.slow

KEY = "hostile-key-0"
COUNTS: Counter[str] = Counter()
RUNS = dict(deadline=None, database=None, suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    print(f"\n[hostile] {dict(COUNTS)}")


# ------------------------------------------------------------------------------------------ the values
SPECIAL_NUMBERS = [
    math.nan,
    math.inf,
    -math.inf,
    -0.0,
    0.0,
    1e308,
    -1e308,
    5e-324,
    2**70,
    -(2**70),
    2**63,
    2**64,
    2**32,
    2**31,
    10**400,
    -1,
    0,
    1,
    2,
    0.5,
]
SPECIAL_STRINGS = [
    "",
    " ",
    "\x00",
    "a\x00b",
    "\ud800 hi",
    "hi \udfff",
    "\udcff",
    "\u202eevil\u202c",
    "\u05e9\u05dc\u05d5\u05dd " * 5,
    "x" * 100_000,
    "\u05d0" * 100_000,
    "🙂" * 50,
    "\r\n\t",
    "nan",
    "NaN",
    "inf",
    "-Infinity",
    "1e400",
    "-0",
    "0x10",
    "1_000",
    "all",
    "auto",
    "llama",
    "None",
    "null",
    "true",
    "{",
    "data:image/png;base64,AAAA",
    "file:///etc/passwd",
    "http://169.254.169.254/",
]
# Each class a generator should reach gets its own branch (one_of picks branches about evenly), so a few
# hundred examples meet each of them many times, alone and combined with other changes.
numbers = st.one_of(
    st.sampled_from([math.nan, math.inf, -math.inf]),
    st.sampled_from(SPECIAL_NUMBERS),
    st.integers(),
    st.floats(),
    st.integers(-5, 5000),
)
strings = st.one_of(
    st.sampled_from(SPECIAL_STRINGS),
    st.builds(  # lone surrogates inside ordinary text
        "{}{}{}".format,
        st.text(max_size=5),
        st.text(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1, max_size=3),
        st.text(max_size=5),
    ),
    st.text(st.characters(exclude_categories=()), max_size=40),  # any code point, surrogates included
    st.text(max_size=12),
)
json_values = st.recursive(
    st.none() | st.booleans() | numbers | strings,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(strings, inner, max_size=3),
    max_leaves=8,
)
values = st.one_of(numbers, strings, json_values)


# ------------------------------------------------------------------------------------------ qvq serve
#: The fields a value reaches the model through come twice: drawn twice as often.
MODEL_FIELDS = [
    ("messages", 0, "content", 1, "text"),
    ("system",),
    ("temperature",),
    ("top_p",),
    ("top_k",),
    ("seed",),
    ("repetition_penalty",),
    ("thinking_budget",),
    ("answer_budget",),
    ("max_tokens",),
]
FIELDS = MODEL_FIELDS + [
    ("model",),
    ("messages",),
    ("messages", 0),
    ("messages", 0, "role"),
    ("messages", 0, "content"),
    ("messages", 0, "content", 0),
    ("messages", 0, "content", 0, "type"),
    ("messages", 0, "content", 0, "image_url"),
    ("messages", 0, "content", 0, "image_url", "url"),
    ("messages", 0, "content", 1),
    ("messages", 0, "content", 1, "type"),
    ("messages", 0, "content", 1, "text"),
    ("system",),  # a system message put first, with this content
    ("stream",),
    ("stream_options",),
    ("stream_options", "include_usage"),
    ("max_tokens",),
    ("max_completion_tokens",),
    ("temperature",),
    ("top_p",),
    ("top_k",),
    ("seed",),
    ("repetition_penalty",),
    ("thinking_budget",),
    ("answer_budget",),
    ("enable_thinking",),
    ("reasoning_effort",),
    ("n",),
    ("user",),
    ("metadata",),
    ("store",),
    ("tools",),
    ("stop",),
    ("logprobs",),
    ("response_format",),
    ("presence_penalty",),
    ("an unknown field",),
]


def _strict(text: str):
    """JSON as a strict client reads it: NaN and Infinity are not JSON."""

    def refuse(token):
        raise ValueError(f"{token} in the response")

    return json.loads(text, parse_constant=refuse)


def _base(model_name: str, image_uri: str, stream: bool) -> dict:
    return {
        "model": model_name,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": image_uri}},
                    {"type": "text", "text": "Which bar is the highest?"},
                ],
            }
        ],
        "thinking_budget": 2,
        "answer_budget": 2,
        "max_tokens": 2,  # one thought and one answer token: the budget's grace tokens would add 32
        "stream": stream,
    }


def _put(body: dict, path: tuple, value, delete: bool) -> None:
    if path == ("system",):
        body["messages"].insert(0, {"role": "system", "content": value})
        return
    target = body
    for key in path[:-1]:
        if isinstance(target, dict):
            target = target.get(key)
        elif isinstance(target, list) and isinstance(key, int) and key < len(target):
            target = target[key]
        else:
            target = None
        if not isinstance(target, (dict, list)):
            return  # an earlier change replaced this branch: nothing left to put it in
    last = path[-1]
    if isinstance(target, dict):
        if delete:
            target.pop(last, None)
        else:
            target[last] = value
    elif isinstance(target, list) and isinstance(last, int) and last < len(target):
        if delete:
            del target[last]
        else:
            target[last] = value


changes = st.lists(
    st.tuples(st.sampled_from(FIELDS), values, st.sampled_from([False] * 7 + [True])),  # True: remove it
    min_size=1,
    max_size=2,
)
requests = st.fixed_dictionaries(
    {
        "stream": st.booleans(),
        "changes": changes,
        "auth": st.sampled_from(["ok"] * 8 + ["missing", "wrong", "scheme"]),
        "whole": st.one_of(
            *[st.none()] * 6,
            json_values,
            st.binary(max_size=64),
            st.integers(1, 200_000).map(lambda n: b"[" * n + b"]" * n),  # nested past the recursion limit
        ),
    }
)


@pytest.fixture(scope="module")
def hostile_server(tiny_gguf_f32, sample_image):
    pytest.importorskip("fastapi")
    pytest.importorskip("llama_cpp")
    from serve_util import ServerThread, data_uri

    from qvq_local.api import load
    from qvq_local.serve.app import ServeOptions, create_app
    from qvq_local.serve.media import Limits

    model = load(tiny_gguf_f32.model, backend="llama")
    app = create_app(
        model, ServeOptions(api_key=KEY, queue=4, limits=Limits(max_images=2, max_body_bytes=2_000_000))
    )
    with ServerThread(app) as server:
        server.model, server.app, server.image_uri = model, app, data_uri(sample_image)
        yield server
    app.state.worker.shutdown()
    model.close()


ALLOWED = {200, 400, 401, 404, 413, 429}


def _check_answer(response, *, stream: bool, model_changed: bool) -> None:
    status = response.status_code
    assert status in ALLOWED, (status, response.text[:500])
    COUNTS[f"server_{status}"] += 1
    if status == 200 and stream:
        lines = [ln[6:] for ln in response.text.split("\n") if ln.startswith("data: ")]
        assert lines, response.text[:500]
        for line in lines[:-1]:
            assert "error" not in _strict(line), line[:500]  # an error ends the stream
        if lines[-1] != "[DONE]":
            assert isinstance(_strict(lines[-1])["error"]["message"], str)
        return
    data = _strict(response.text)
    if status == 200:
        assert isinstance(data["choices"][0]["message"]["content"], str)
        return
    error = data["error"]
    assert isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str)
    assert "\n" not in error["message"]
    if status == 404:
        assert model_changed and error["code"] == "model_not_found", error


def test_any_chat_request_gets_a_4xx_or_an_answer_never_a_5xx(hostile_server):
    import httpx

    server = hostile_server
    url = server.base_url + "/chat/completions"
    started = time.monotonic()
    client = httpx.Client(timeout=120)  # one connection for all: the server's answers are what is timed

    @settings(max_examples=300, **RUNS)
    @given(requests)
    def check(case):
        COUNTS["server_examples"] += 1
        headers = {"Content-Type": "application/json"}
        auth = case["auth"]
        if auth == "ok":
            headers["Authorization"] = f"Bearer {KEY}"
        elif auth == "wrong":
            headers["Authorization"] = "Bearer not-the-key"
        elif auth == "scheme":
            headers["Authorization"] = f"Basic {KEY}"
        stream = case["stream"]
        model_changed = False
        if isinstance(case["whole"], bytes):
            payload = case["whole"]
        elif case["whole"] is not None:
            payload = json.dumps(case["whole"]).encode()  # NaN/Infinity tokens, \ud800 escapes as they come
        else:
            body = _base(server.model.name, server.image_uri, stream)
            for path, value, delete in case["changes"]:
                _put(body, path, value, delete)
                model_changed |= path == ("model",)
            stream = body.get("stream") is True
            payload = json.dumps(body).encode()
        response = client.post(url, content=payload, headers=headers)
        if auth != "ok":
            assert response.status_code == 401, response.text[:300]
        _check_answer(response, stream=stream, model_changed=model_changed)

    with client:
        check()
    # afterwards: nothing stuck, nothing held, and a normal request is answered
    deadline = time.monotonic() + 30
    while server.app.state.worker.state()["running"] or server.app.state.worker.state()["waiting"]:
        assert time.monotonic() < deadline, server.app.state.worker.state()
        time.sleep(0.05)
    assert server.app.state.decode_budget.used == 0
    normal = httpx.post(
        url,
        json=_base(server.model.name, server.image_uri, False),
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=120,
    )
    assert normal.status_code == 200 and normal.json()["choices"][0]["message"]["content"] is not None
    COUNTS["server_seconds"] = round(time.monotonic() - started)


# ------------------------------------------------------------------------------------------ qvq ask
ASK_OPTIONS = [
    "--think-budget",
    "--answer-budget",
    "--max-pixels",
    "--temperature",
    "--top-p",
    "--top-k",
    "--repetition-penalty",
    "--seed",
    "--system",
    "--lang-lock",
    "--cpu-buffers",
    "--gpu-layers",
    "--samples",
    "--backend",
]


def _as_argument(value) -> str:
    """A generated value as a user would type it (numbers as Python writes them: nan, inf, 1e+308)."""
    if isinstance(value, str):
        return value
    if isinstance(value, (bool, type(None))) or not isinstance(value, (int, float)):
        return json.dumps(value)
    return str(value)


arguments = st.one_of(numbers, strings).map(_as_argument)
#: A value each option takes (small budgets keep a run short), so that one hostile value can meet others
#: that pass and reach the model.
FINE = {
    "--think-budget": st.integers(1, 4).map(str),
    "--answer-budget": st.integers(1, 3).map(str),
    "--max-pixels": st.sampled_from(["3136", "50176"]),
    "--temperature": st.floats(0, 2).map(str),
    "--top-p": st.floats(0.05, 1).map(str),
    "--top-k": st.integers(0, 50).map(str),
    "--repetition-penalty": st.floats(0.5, 2).map(str),
    "--seed": st.integers(0, 2**32 - 1).map(str),
    "--system": st.text(st.characters(codec="utf-8"), max_size=20),
    "--lang-lock": st.sampled_from(["auto", "on", "off"]),
    "--cpu-buffers": st.sampled_from(["auto", "all", "no-amx", "none"]),
    "--gpu-layers": st.sampled_from(["0", "all"]),
    "--samples": st.sampled_from(["1", "2"]),
    "--backend": st.sampled_from(["llama", "auto"]),
}
option_values = st.sampled_from(ASK_OPTIONS).flatmap(
    lambda option: st.tuples(st.just(option), st.one_of(FINE[option], arguments))
)
ask_cases = st.fixed_dictionaries(
    {
        "options": st.lists(option_values, min_size=1, max_size=3),
        "question": st.one_of(st.just("Which bar is the highest?"), strings),
        "json": st.booleans(),
    }
)


@pytest.fixture(scope="module")
def shared_model(tiny_gguf_f32):
    """The tiny GGUF, loaded once: each `qvq ask` below gets it instead of loading its own."""
    pytest.importorskip("llama_cpp")
    from qvq_local.api import load

    model = load(tiny_gguf_f32.model, backend="llama")
    yield model
    model.close()


def _one_error(result) -> str:
    """The one error a failed command printed: an ``error:`` line, or click's usage error box."""
    text = result.stderr
    assert "Traceback" not in result.output and "Traceback" not in text, text[-2000:]
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    if lines and lines[0].startswith("Usage:"):
        assert result.exit_code == 2 and "Error" in text, text  # e.g. "Invalid value for '--top-k'"
        return "usage"
    assert len(lines) == 1 and lines[0].startswith("error: "), text[-2000:]
    return "error"


def test_any_ask_option_value_is_an_answer_or_one_clear_error(
    shared_model, sample_image, tmp_path, monkeypatch
):
    from typer.testing import CliRunner

    from qvq_local import api
    from qvq_local.cli import app
    from qvq_local.model import Model

    runner = CliRunner()
    monkeypatch.setenv("QVQ_HOME", str(tmp_path / "home"))

    def lend(ref, *, max_pixels=None, **kwargs):
        model = Model(
            shared_model.loaded,
            name=shared_model.name,
            spec=shared_model.spec,
            quantization=shared_model.quantization,
            max_pixels=max_pixels,
        )
        model.close = lambda: None  # the shared model stays loaded for the next example
        return model

    monkeypatch.setattr(api, "load", lend)
    save = tmp_path / "run.md"
    started = time.monotonic()

    @settings(max_examples=200, **RUNS)
    @given(ask_cases)
    def check(case):
        COUNTS["ask_examples"] += 1
        save.unlink(missing_ok=True)
        args = ["ask", "-m", "tiny", "--save", str(save)]
        args += ["--think-budget", "3", "--answer-budget", "3"]  # cheap by default; an option may override
        for option, value in case["options"]:
            args += [option, value]
        if case["json"]:
            args.append("--json")
        args += ["--", str(sample_image), case["question"]]  # a question may start with "-"
        result = runner.invoke(app, args)
        assert result.exit_code in (0, 2, 3), (
            args,
            result.exit_code,
            result.output[-2000:],
            result.exception,
        )
        if result.exit_code == 0:
            COUNTS["ask_ok"] += 1
            if case["json"]:
                _strict(result.stdout)  # --json prints strict JSON (no NaN)
            assert save.is_file()
        else:
            COUNTS[f"ask_{_one_error(result)}"] += 1
            assert result.stdout == "", result.stdout[:500]
            assert not save.exists()

    check()
    COUNTS["ask_seconds"] = round(time.monotonic() - started)


# ------------------------------------------------------------------------------------------ qvq config set
config_cases = st.tuples(
    st.one_of(
        st.sampled_from(
            ["model", "backend", "think_budget", "answer_budget", "max_pixels", "cache_max_mb", "base_url"]
            + ["server_kind", "Think-Budget"]
        ),
        strings,
    ),
    arguments,
)


def test_any_config_set_is_stored_or_one_clear_error_with_nothing_written(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from qvq_local import config
    from qvq_local.cli import app

    runner = CliRunner()
    home = tmp_path / "home"
    monkeypatch.setenv("QVQ_HOME", str(home))
    for name in ("QVQ_MODEL", "QVQ_BACKEND", "QVQ_CACHE_MAX_MB", "QVQ_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    path = Path(config.config_path())

    @settings(max_examples=300, **RUNS)
    @given(config_cases)
    def check(case):
        COUNTS["config_examples"] += 1
        key, value = case
        before = path.read_bytes() if path.exists() else None
        result = runner.invoke(app, ["config", "set", "--", key, value])  # a value may start with "-"
        assert result.exit_code in (0, 2, 3), (
            case,
            result.exit_code,
            result.output[-2000:],
            result.exception,
        )
        if result.exit_code == 0:
            COUNTS["config_ok"] += 1
            stored = _strict(path.read_text(encoding="utf-8"))  # strict JSON, whatever was set
            assert config.get(key) == stored[key.strip().lower().replace("-", "_")]
        else:
            COUNTS[f"config_{_one_error(result)}"] += 1
            assert (path.read_bytes() if path.exists() else None) == before  # nothing written

    check()
