"""The ``openai`` backend: the reasoning controller in the client, a server's stream as its tokens.

Three kinds of server:
* ``qvq serve`` on the tiny GGUF (in this process): the budget travels as ``thinking_budget`` and the
  answer must equal what the Python API gives locally for the same question and settings;
* llama-cpp-python's own OpenAI-compatible server (``python -m llama_cpp.server``), a server this project
  did not write: the client counts the budget, and since that server cannot continue an assistant message
  the result says so (stop reason ``cut``);
* QVQ-Max's and vLLM's streaming formats replayed from fixtures (tests/data/remote/*.sse) written from their
  documentation: Alibaba Model Studio's OpenAI-compatible mode (``reasoning_content`` deltas with ``content``
  null, then ``content``; usage in a last chunk with empty ``choices``) and vLLM's chat completions with a
  reasoning parser (``reasoning``) and without one (plain content, QVQ's own markers); vLLM's continuation
  request (``continue_final_message`` with ``add_generation_prompt: false``) is checked from its body.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from helpers import assert_error
from serve_util import ServerThread, free_port

from qvq_local.api import load
from qvq_local.errors import BackendUnavailable, InputError, ModelError

DATA = Path(__file__).parent / "data" / "remote"
QUESTION = "Which bar is the highest?"


# ------------------------------------------------------------------ replayed servers (fixtures)


class _Replay:
    """A stdlib HTTP server that answers /models with ``owned_by`` and each chat request with the next
    fixture, recording every request body."""

    def __init__(self, owned_by: str, fixtures: list[str], model: str = "m"):
        self.bodies: list[dict] = []
        self.headers: list[dict] = []
        replay = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                data = json.dumps({"object": "list", "data": [{"id": model, "owned_by": owned_by}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                replay.bodies.append(body)
                replay.headers.append(dict(self.headers))
                name = fixtures[min(len(replay.bodies), len(fixtures)) - 1]
                data = (DATA / name).read_bytes()
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client closed the stream at its budget

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


@pytest.fixture
def replay():
    made = []

    def make(*args, **kwargs):
        made.append(_Replay(*args, **kwargs))
        return made[-1]

    yield make
    for r in made:
        r.close()


def test_qvq_max_stream_and_request(replay, sample_image, monkeypatch):
    monkeypatch.setenv("DASHSCOPE_API_KEY", "dash-key")
    server = replay("system", ["qvq_max_stream.sse"], model="qvq-max")
    with load("qvq-max", backend="openai", base_url=server.url) as model:
        assert model.loaded.kind == "qvq-max"  # from the model's name
        result = model.ask(sample_image, QUESTION, think_budget=512)
    body = server.bodies[0]
    assert body["stream"] is True and body["enable_thinking"] is True and body["thinking_budget"] == 512
    assert [m["role"] for m in body["messages"]] == ["user"]  # QVQ-Max takes no system message
    parts = body["messages"][0]["content"]
    assert parts[0]["type"] == "image_url" and parts[0]["image_url"]["url"].startswith(
        "data:image/png;base64,"
    )
    assert parts[-1] == {"type": "text", "text": QUESTION}
    assert "top_k" not in body and "repetition_penalty" not in body
    assert server.headers[0]["Authorization"] == "Bearer dash-key"
    assert (
        result.thought
        == "The image shows a bar chart with five bars. The fourth bar reaches the highest value, about 120."
    )
    assert result.answer == "The highest bar is the fourth one. $$\\boxed{4}$$"
    assert result.boxed == "4" and result.stop_reason == "answer" and not result.forced
    assert result.backend == "openai" and result.quantization == "remote"
    # the counts are the server's (its last chunk's usage, reasoning_tokens included), not the chunks (5 + 3)
    assert result.thought_tokens == 80 and result.answer_tokens == 97 - 80 and result.prompt_tokens == 1275
    assert result.settings["token_count"] == "server usage"


def test_vllm_reasoning_field(replay, sample_image):
    server = replay("vllm", ["vllm_reasoning_stream.sse"], model="Qwen/QVQ-72B-Preview")
    with load("Qwen/QVQ-72B-Preview", backend="openai", base_url=server.url, api_key="k") as model:
        assert model.loaded.kind == "vllm"  # from owned_by
        result = model.ask(sample_image, QUESTION, seed=3, top_k=5)
    body = server.bodies[0]
    assert "thinking_budget" not in body and body["seed"] == 3 and body["top_k"] == 5
    assert body["messages"][0]["role"] == "system"  # QVQ's system prompt goes to vLLM
    assert result.thought.startswith("The image shows") and result.answer.endswith("$$\\boxed{4}$$")
    assert result.boxed == "4" and result.stop_reason == "answer"


def test_the_thinking_switch_goes_to_the_servers_template(replay, sample_image, monkeypatch):
    """--think/--no-think reach a server that applies its own template: vLLM (and qvq serve) read
    ``chat_template_kwargs.enable_thinking``; QVQ-Max its ``enable_thinking``; none is sent by default."""
    server = replay("vllm", ["vllm_reasoning_stream.sse"] * 3, model="Qwen/QVQ-72B-Preview")
    with load("Qwen/QVQ-72B-Preview", backend="openai", base_url=server.url, api_key="k") as model:
        for think in (None, True, False):
            result = model.ask(sample_image, QUESTION, think=think)
    assert "chat_template_kwargs" not in server.bodies[0]
    assert server.bodies[1]["chat_template_kwargs"] == {"enable_thinking": True}
    assert server.bodies[2]["chat_template_kwargs"] == {"enable_thinking": False}
    assert result.settings["thinking"] is False  # what the server streams is taken as answer
    monkeypatch.setenv("DASHSCOPE_API_KEY", "dash-key")
    server = replay("system", ["qvq_max_stream.sse"], model="qvq-max")
    with load("qvq-max", backend="openai", base_url=server.url) as model:
        model.ask(sample_image, QUESTION, think=False)
    assert server.bodies[0]["enable_thinking"] is False and "chat_template_kwargs" not in server.bodies[0]


def test_vllm_plain_content_budget_continues_the_assistant_message(replay, sample_image):
    server = replay(
        "vllm", ["vllm_plain_stream.sse", "vllm_continuation_stream.sse"], model="Qwen/QVQ-72B-Preview"
    )
    with load("Qwen/QVQ-72B-Preview", backend="openai", base_url=server.url) as model:
        result = model.ask(sample_image, QUESTION, think_budget=8, loop_detection=False)
    assert len(server.bodies) == 2  # the stream was stopped at the budget, then continued
    first, second = server.bodies
    assert "thinking_budget" not in first  # vLLM does not keep a QVQ budget: the client does
    # the server is never asked for more than the controller could use: thought cap (the budget), the
    # forced-text margin and the answer budget; the continuation for what is left of that
    assert first["max_tokens"] == 8 + 96 + 1024
    assert second["max_tokens"] == first["max_tokens"] - result.thought_tokens
    assert second["continue_final_message"] is True and second["add_generation_prompt"] is False
    last = second["messages"][-1]
    assert last["role"] == "assistant"
    forced = result.forced[0]
    assert forced.reason == "budget" and 8 <= forced.at_token <= 8 + 32
    assert last["content"].endswith(forced.text) and last["content"].startswith("Let me look at the chart")
    assert "**Final Answer**" in forced.text
    assert result.answer == "The fourth bar is the highest. $$\\boxed{4}$$"
    assert result.stop_reason == "budget" and result.boxed == "4"


def test_plain_content_without_budget_splits_at_qvqs_marker(replay, sample_image):
    server = replay("vllm", ["vllm_plain_stream.sse"], model="Qwen/QVQ-72B-Preview")
    with load(None, backend="openai", base_url=server.url) as model:  # the one model the server lists
        assert model.name == "Qwen/QVQ-72B-Preview"
        result = model.ask(sample_image, QUESTION)
    assert result.thought.endswith("The fourth looks tallest.") and result.answer == "$$\\boxed{4}$$"
    assert result.stop_reason == "answer"


def test_generic_server_cannot_continue_and_says_so(replay, sample_image):
    server = replay("someone", ["vllm_plain_stream.sse"], model="m")
    with load("m", backend="openai", base_url=server.url) as model:
        assert model.loaded.kind == "generic"
        result = model.ask(sample_image, QUESTION, think_budget=8, loop_detection=False)
    assert len(server.bodies) == 1
    assert result.stop_reason == "cut" and result.answer == "" and result.forced
    from qvq_local.openai_format import completion_dict

    assert completion_dict(result)["choices"][0]["finish_reason"] == "length"


def test_bad_remote_settings_fail_in_one_line(sample_image):
    with pytest.raises(InputError) as err:
        load("m", backend="openai")
    assert_error(err, "needs --base-url")
    with pytest.raises(InputError) as err:
        load("m", backend="openai", base_url="ftp://x")
    assert_error(err, "must be an http")
    with pytest.raises(InputError) as err:
        load("m", backend="openai", base_url="http://127.0.0.1:1/v1", server_kind="ollama")
    assert_error(err, "unknown server kind")
    with pytest.raises(BackendUnavailable) as err:
        load("m", backend="openai", base_url=f"http://127.0.0.1:{free_port()}/v1")
    assert_error(err, "cannot reach the server")


# ------------------------------------------------------------------ against qvq serve


@pytest.fixture(scope="module")
def qvq_server(tiny_gguf_f32):
    pytest.importorskip("fastapi")
    pytest.importorskip("llama_cpp")
    from qvq_local.serve.app import ServeOptions, create_app

    model = load(tiny_gguf_f32.model, backend="llama")
    app = create_app(model, ServeOptions(api_key="k1"))
    with ServerThread(app) as server:
        server.model = model
        yield server
    app.state.worker.shutdown()
    model.close()


@pytest.mark.llama
@pytest.mark.slow
def test_against_qvq_serve_the_budget_is_the_servers(qvq_server, sample_image):
    local = qvq_server.model.ask(sample_image, QUESTION, think_budget=16, answer_budget=8, seed=1)
    with load(qvq_server.model.name, backend="openai", base_url=qvq_server.base_url, api_key="k1") as remote:
        assert remote.loaded.kind == "qvq"
        result = remote.ask(sample_image, QUESTION, think_budget=16, answer_budget=8, seed=1)
    assert local.forced  # the budget cut the thought on the server...
    assert result.thought == local.thought and result.answer == local.answer  # ...and the client agrees
    assert result.stop_reason == local.stop_reason
    assert result.settings["think_budget"] == 16


@pytest.mark.llama
@pytest.mark.slow
def test_qvq_ask_backend_openai_json_against_qvq_serve(qvq_server, sample_image, tmp_path):
    save = tmp_path / "run.md"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "qvq_local.cli",
            "ask",
            str(sample_image),
            QUESTION,
            "--backend",
            "openai",
            "--base-url",
            qvq_server.base_url,
            "--api-key",
            "k1",
            "-m",
            qvq_server.model.name,
            "--think-budget",
            "16",
            "--answer-budget",
            "8",
            "--seed",
            "1",
            "--json",
            "--save",
            str(save),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    local = qvq_server.model.ask(sample_image, QUESTION, think_budget=16, answer_budget=8, seed=1)
    assert data["choices"][0]["message"]["content"] == local.answer
    assert data["choices"][0]["message"]["reasoning_content"] == local.thought
    assert data["qvq"]["backend"] == "openai"
    assert local.answer in save.read_text()
    # a wrong key: one line, non-zero, no traceback
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "qvq_local.cli",
            "ask",
            str(sample_image),
            QUESTION,
            "--backend",
            "openai",
            "--base-url",
            qvq_server.base_url,
            "--api-key",
            "nope",
            "-m",
            qvq_server.model.name,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode != 0 and "401" in bad.stderr and "Traceback" not in bad.stderr
    assert bad.stderr.strip().count("\n") == 0


# ------------------------------------------------------------------ against llama-cpp-python's server


@pytest.fixture(scope="module")
def llama_cpp_server(tiny_gguf_f32):
    pytest.importorskip("llama_cpp")
    pytest.importorskip("sse_starlette")
    pytest.importorskip("starlette_context")
    port = free_port()
    # f32 weights: llama.cpp's AMX buffer type (which crashes on quantised models, see llama_buffers.py) is
    # not used for them, so this unmodified server is safe to run on an AMX CPU
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            str(tiny_gguf_f32.model),
            "--clip_model_path",
            str(tiny_gguf_f32.mmproj),
            "--chat_format",
            "qwen2.5-vl",
            "--n_ctx",
            "4096",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--verbose",
            "false",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ},
    )
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 120
    import urllib.request

    while True:
        try:
            urllib.request.urlopen(url + "/models", timeout=1).read()
            break
        except OSError:
            if proc.poll() is not None:
                pytest.fail(f"llama_cpp.server exited: {proc.stderr.read()[-2000:]}")
            assert time.monotonic() < deadline, "llama_cpp.server did not come up"
            time.sleep(0.3)
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=15)


@pytest.mark.llama
@pytest.mark.slow
def test_against_llama_cpp_python_server(llama_cpp_server, sample_image):
    with load("tiny", backend="openai", base_url=llama_cpp_server) as model:
        assert model.loaded.kind == "generic"  # owned_by "me": no continuation known
        # a small answer budget keeps max_tokens small: this server goes on generating after the client
        # has closed the stream, up to max_tokens (8 + 96 + 4 here)
        result = model.ask(
            sample_image, QUESTION, think_budget=8, answer_budget=4, loop_detection=False, seed=1
        )
    assert result.thought and result.thought_tokens >= 8  # the random model's words streamed in
    assert result.forced and result.forced[0].reason == "budget"
    assert result.stop_reason == "cut" and result.answer == ""  # it cannot continue, and says so


@pytest.mark.llama
@pytest.mark.slow
def test_qvq_ask_plain_output_against_llama_cpp_python_server(llama_cpp_server, sample_image):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "qvq_local.cli",
            "ask",
            str(sample_image),
            QUESTION,
            "--backend",
            "openai",
            "--base-url",
            llama_cpp_server,
            "-m",
            "tiny",
            "--think-budget",
            "8",
            "--answer-budget",
            "4",
            "--no-loop-stop",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "stop: cut" in out.stderr  # the summary line says why there is no answer


def test_remote_session_errors_mid_stream_are_one_line(replay, sample_image, tmp_path):
    (tmp_path / "err.sse").write_text('data: {"error": {"message": "out of memory"}}\n\n')
    server = replay("vllm", [str(tmp_path / "err.sse")])
    with load("m", backend="openai", base_url=server.url) as model, pytest.raises(ModelError) as err:
        model.ask(sample_image, QUESTION)
    assert_error(err, "failed mid-answer: out of memory")


def test_llama_server_kind_continues_by_prefill(replay, sample_image):
    server = replay("llamacpp", ["vllm_plain_stream.sse", "vllm_continuation_stream.sse"], model="m")
    with load("m", backend="openai", base_url=server.url) as model:
        assert model.loaded.kind == "llama-server"  # llama.cpp's server says owned_by "llamacpp"
        result = model.ask(sample_image, QUESTION, think_budget=8, loop_detection=False)
    second = server.bodies[1]
    assert second["messages"][-1]["role"] == "assistant"  # llama-server prefills a final assistant message
    assert "continue_final_message" not in second
    assert result.answer == "The fourth bar is the highest. $$\\boxed{4}$$" and result.stop_reason == "budget"


def test_base_url_and_server_kind_come_from_qvq_config(replay, sample_image, tmp_path, monkeypatch):
    from qvq_local import config

    monkeypatch.setenv("QVQ_HOME", str(tmp_path))
    server = replay("someone", ["vllm_reasoning_stream.sse"], model="m")
    config.set_value("base_url", server.url)
    config.set_value("server_kind", "VLLM")
    assert config.get("server_kind") == "vllm"
    with pytest.raises(InputError) as err:
        config.set_value("server_kind", "ollama")
    assert_error(err, "unknown server kind")
    with load("m", backend="openai") as model:
        assert model.loaded.kind == "vllm"  # from the setting, not detected ("someone" would be generic)
        assert model.ask(sample_image, QUESTION).boxed == "4"


@pytest.mark.llama
@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="needs a POSIX pseudo-terminal")
def test_live_panel_for_a_remote_model(qvq_server, sample_image, tmp_path):
    from test_cli_pty import PtyProcess, _argv, _env

    proc = PtyProcess(
        _argv(
            str(sample_image),
            QUESTION,
            "--backend",
            "openai",
            "--base-url",
            qvq_server.base_url,
            "--api-key",
            "k1",
            "-m",
            qvq_server.model.name,
            "--think-budget",
            "16",
            "--answer-budget",
            "8",
            "--seed",
            "1",
        ),
        _env(tmp_path),
    )
    code = proc.wait(timeout=120)
    text = proc.text
    assert code == 0, text[-3000:]
    assert "\x1b[" in text and "thinking" in text and "answer" in text  # the same live panel
    assert "openai" in text and "remote" in text  # the header names the backend
    local = qvq_server.model.ask(sample_image, QUESTION, think_budget=16, answer_budget=8, seed=1)
    assert f"stop: {local.stop_reason}" in text  # the server's stop reason, in the summary


def test_the_stop_reason_qvq_serve_reports_is_kept(replay, sample_image, tmp_path):
    # qvq serve's last chunk carries its own stop reason under "qvq": the thought was cut by the budget on
    # the server, which the client cannot see from the text alone
    def chunk(delta, finish=None, **extra):
        return (
            "data: "
            + json.dumps({"choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra})
            + "\n\n"
        )

    sse = chunk({"reasoning_content": "Thinking.", "reasoning": "Thinking."})
    sse += chunk({"reasoning_content": " I have run out of time to think, so I will answer now."})
    sse += (
        chunk({"content": "B"})
        + chunk({}, "stop", qvq={"stop_reason": "budget", "boxed": None})
        + "data: [DONE]\n\n"
    )
    (tmp_path / "qvq.sse").write_text(sse)
    server = replay("qvq-local", [str(tmp_path / "qvq.sse")], model="m")
    with load("m", backend="openai", base_url=server.url) as model:
        result = model.ask(sample_image, QUESTION, think_budget=4)
    assert server.bodies[0]["thinking_budget"] == 4 and "max_tokens" not in server.bodies[0]
    assert result.answer == "B" and result.thought.endswith("answer now.")
    assert result.stop_reason == "budget" and result.settings["budget_kept_by"] == "server"


def test_qvq_serve_keeps_the_answer_budget(replay, sample_image, tmp_path):
    """qvq serve keeps the answer budget (sent as ``answer_budget``, as the thinking budget is): its stream's
    pieces are not tokens (its splitter sends a held-back word as one piece: "double need" was two tokens
    there and one piece here), so counting pieces here again cut or stretched the answer."""

    def chunk(delta, finish=None, **extra):
        return (
            "data: "
            + json.dumps({"choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra})
            + "\n\n"
        )

    sse = chunk({"reasoning_content": "Thinking."})
    sse += chunk({"reasoning_content": " I have run out of time to think, so I will answer now."})
    sse += chunk({"content": "double need"}) + chunk({"content": " maybe"})
    sse += chunk({}, "length", qvq={"stop_reason": "max_tokens", "boxed": None}) + "data: [DONE]\n\n"
    (tmp_path / "qvq.sse").write_text(sse)
    server = replay("qvq-local", [str(tmp_path / "qvq.sse")], model="m")
    with load("m", backend="openai", base_url=server.url) as model:
        result = model.ask(sample_image, QUESTION, think_budget=4, answer_budget=3)
    body = server.bodies[0]
    assert body["thinking_budget"] == 4 and body["answer_budget"] == 3 and "max_tokens" not in body
    assert result.answer == "double need maybe"  # all the server sent: three tokens there, two pieces here
    assert result.stop_reason == "max_tokens" and result.settings["answer_budget"] == 3


# ------------------------------------------------------------------ told the truth: a vLLM-like server


@pytest.fixture
def vllm():
    from fake_vllm import FakeVllm

    made = []

    def make(**kwargs):
        made.append(FakeVllm(**kwargs))
        return made[-1]

    yield make
    for server in made:
        server.close()


def test_the_fake_refuses_what_vllm_refuses(vllm, sample_image):
    """The fake's own checks, as vLLM answered qvq's old request: max_tokens 8192 + 96 + 1024 = 9312 against
    max_model_len 2048 is a 400 naming both."""
    import urllib.error
    import urllib.request

    from serve_util import data_uri

    server = vllm(max_model_len=2048)
    body = {
        "model": server.model,
        "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri(sample_image)}}]}
        ],
        "max_tokens": 9312,
        "stream": True,
    }
    request = urllib.request.Request(
        server.url + "/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=10)
    assert err.value.code == 400
    assert (
        "max_tokens=9312 cannot be greater than max_model_len"
        in json.loads(err.value.read())["error"]["message"]
    )


def test_max_tokens_fits_the_servers_stated_context(vllm, sample_image):
    server = vllm(max_model_len=2048)
    with load(server.model, backend="openai", base_url=server.url) as model:
        assert model.loaded.context_length == 2048  # read from GET /v1/models
        result = model.ask(sample_image, QUESTION)  # no budget: it used to send 9312 and get a 400
    (request,) = server.requests
    assert request["status"] == 200
    sent = request["body"]["max_tokens"]
    assert request["prompt_tokens"] + sent <= 2048  # vLLM's own check passed...
    assert sent <= 2048 - (result.settings["remote"]["prompt_tokens_bound"])  # ...by the bound qvq counted
    assert result.settings["remote"]["context"] == 2048
    assert result.settings["remote"]["context_from"] == "GET /models max_model_len"
    assert result.settings["remote"]["max_tokens"] == sent
    assert result.answer == "The fourth bar. $$\\boxed{4}$$" and result.stop_reason == "answer"


def test_a_prompt_beyond_the_stated_context_is_refused_before_sending(vllm, sample_image):
    from qvq_local.errors import ContextOverflow

    server = vllm(max_model_len=200)
    with (
        load(server.model, backend="openai", base_url=server.url) as model,
        pytest.raises(ContextOverflow) as err,
    ):
        model.ask(sample_image, QUESTION, answer_budget=8)
    assert_error(err, "context holds 200")
    assert server.requests == []  # nothing was sent


def test_without_a_stated_context_max_tokens_is_left_out(vllm, sample_image):
    server = vllm(max_model_len=None, owned_by="someone")
    with load(server.model, backend="openai", base_url=server.url) as model:
        assert model.loaded.kind == "generic" and model.loaded.context_length == 0
        unbounded = model.ask(sample_image, QUESTION)
        bounded = model.ask(sample_image, QUESTION, think_budget=64, answer_budget=32)
    assert "max_tokens" not in server.requests[0]["body"]  # nothing known: no guess sent
    assert (
        unbounded.settings["remote"]["max_tokens"] is None and unbounded.settings["remote"]["context"] is None
    )
    # a budget the caller set is a stated cap: the server is not asked for more than the controller uses
    assert server.requests[1]["body"]["max_tokens"] == 64 + 96 + 32
    assert bounded.settings["remote"]["max_tokens"] == 64 + 96 + 32


def test_sampling_sent_is_what_settings_report(vllm, sample_image):
    server = vllm()
    with load(server.model, backend="openai", base_url=server.url) as model:
        default = model.ask(sample_image, QUESTION)
        chosen = model.ask(sample_image, QUESTION, temperature=0.7, top_k=5, repetition_penalty=1.2, seed=9)
    plain, picked = (r["body"] for r in server.requests)
    for name in ("temperature", "top_p", "top_k", "repetition_penalty", "seed"):
        assert name not in plain  # none set: none sent, so vLLM applied the checkpoint's generation_config
        assert default.settings[name] == "server default"
    assert server.requests[0]["sampling"]["temperature"] == 0.05  # ...as the fake's log says
    assert {k: picked[k] for k in ("temperature", "top_k", "repetition_penalty", "seed")} == {
        "temperature": 0.7,
        "top_k": 5,
        "repetition_penalty": 1.2,
        "seed": 9,
    }
    assert "top_p" not in picked and server.requests[1]["ignored"] == []
    reported = {
        k: chosen.settings[k] for k in ("temperature", "top_p", "top_k", "repetition_penalty", "seed")
    }
    assert reported == {
        "temperature": 0.7,
        "top_p": "server default",
        "top_k": 5,
        "repetition_penalty": 1.2,
        "seed": 9,
    }


def test_token_counts_come_from_the_servers_usage(vllm, sample_image):
    server = vllm()
    with load(server.model, backend="openai", base_url=server.url) as model:
        result = model.ask(sample_image, QUESTION)
    (request,) = server.requests
    assert request["body"]["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
    assert result.prompt_tokens == request["prompt_tokens"]  # the server's count, not the bound
    assert result.thought_tokens + result.answer_tokens == request["completion_tokens"]
    # fewer chunks than tokens (some of the fake's pieces hold two tokens, as vLLM's do at times)
    assert request["completion_tokens"] > len(request["sent"])
    assert result.settings["token_count"] == "server usage total; thought/answer split per chunk"


def test_budget_cut_and_continuation_count_the_servers_tokens(vllm, sample_image):
    server = vllm()
    with load(server.model, backend="openai", base_url=server.url) as model:
        result = model.ask(sample_image, QUESTION, think_budget=8, answer_budget=64, loop_detection=False)
    first, second = server.requests
    assert second["continuing"] and second["body"]["continue_final_message"] is True
    assert result.stop_reason == "budget" and result.answer == "The fourth bar is the highest."
    # the first stream was closed at the budget: its running usage (continuous_usage_stats) counted it, in
    # tokens (the budget counts chunks: 8 of them, then to the sentence's end)
    assert result.thought_tokens in first["running"] and result.thought_tokens > 8
    assert result.answer_tokens == second["completion_tokens"]
    assert result.settings["token_count"] == "server usage"
    # what is left of the cap is asked for, within the context after the longer prompt
    assert second["prompt_tokens"] + second["body"]["max_tokens"] <= 2048


def test_a_value_a_server_kind_does_not_take_is_refused(vllm, sample_image):
    server = vllm(owned_by="someone")
    with load(server.model, backend="openai", base_url=server.url) as model, pytest.raises(InputError) as err:
        model.ask(sample_image, QUESTION, top_k=5)
    assert_error(err, "top_k cannot be sent to a generic server")
    assert server.requests == []


def test_llama_server_context_from_props_and_its_penalty_name(replay, sample_image, tmp_path, monkeypatch):
    from qvq_local.backends import openai_remote

    server = replay("llamacpp", ["vllm_plain_stream.sse"], model="m")
    props = {"default_generation_settings": {"n_ctx": 4096}, "total_slots": 1}
    original = openai_remote._Http.get_json

    def get_json(self, path, timeout=10.0):
        if path == "/props":
            assert self.base_url == server.url[: -len("/v1")]  # llama-server's /props is at its root
            return props
        return original(self, path, timeout)

    monkeypatch.setattr(openai_remote._Http, "get_json", get_json)
    with load("m", backend="openai", base_url=server.url) as model:
        assert model.loaded.context_length == 4096
        result = model.ask(sample_image, QUESTION, repetition_penalty=1.3, answer_budget=16)
    body = server.bodies[0]
    assert body["repeat_penalty"] == 1.3 and "repetition_penalty" not in body  # llama.cpp's name
    assert result.settings["remote"]["context_from"] == "GET /props default_generation_settings.n_ctx"
    assert result.settings["repetition_penalty"] == 1.3


def test_earlier_turns_go_to_the_server_as_messages(vllm, sample_image):
    from qvq_local.conversation import Turn

    server = vllm()
    reply = "Counting them.\n\n**Final Answer**\n\nFive bars."
    history = [Turn.user("How many bars?", [sample_image]), Turn.assistant(reply)]
    with load(server.model, backend="openai", base_url=server.url) as model:
        result = model.ask([], QUESTION, history=history, answer_budget=32)
    messages = server.requests[0]["body"]["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[1]["content"][0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert messages[1]["content"][1] == {"type": "text", "text": "How many bars?"}
    assert messages[2] == {"role": "assistant", "content": "Five bars."}  # the answer alone
    assert messages[3]["content"] == [{"type": "text", "text": QUESTION}]
    assert result.answer == "The fourth bar. $$\\boxed{4}$$"
