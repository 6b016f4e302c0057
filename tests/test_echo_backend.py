"""A backend plugs in from one file: this one, which is both the ``echo`` backend and its test.

The backend: sessions that "think" deterministic tokens drawn from a tiny vocabulary (never ending by
themselves, so a thinking budget must force the answer), then answer ``\\boxed{42}`` after the forced text.
It declares everything it is in its registry entry: the formats it loads (any model qvq-local resolves:
it reads no weights), the format bench would convert to for it, its capabilities (it counts a prompt's
tokens) and its own load-options type.  It is registered through ``QVQ_PLUGINS`` only, in child processes
(``qvq ask``, ``qvq serve``, ``qvq bench``, the Python API), so no other file in the package or the tests
names it and the test process's own registry stays as it was.

Why a child process each time: that is how a user's plugin is found (an environment variable every qvq
process reads), and it proves that ``qvq serve`` (a process of its own) sees it too.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from qvq_local.backends import registry
from qvq_local.backends.base import PrefillStats, Prompt, SamplingParams, Token
from qvq_local.backends.options import LoadOptions
from qvq_local.errors import InputError

NAME = "echo"
#: The whole vocabulary of its thoughts (token id = index + 1; 0 is the end of the turn).
VOCABULARY = (
    " Looking",
    " at",
    " the",
    " bars",
    " and",
    " their",
    " heights",
    ",",
    " counting",
    " again",
    ".",
)
ANSWER = (" The", " tallest", " is", " \\boxed{42}", ".")
_PIECE = re.compile(r"\s+|\w+|[^\w\s]")


def _pieces(text: str) -> list[str]:
    return _PIECE.findall(text)


# ---------------------------------------------------------------- the backend


@dataclass(frozen=True)
class EchoOptions(LoadOptions):
    """Its one load option: ``think_tokens``, thought tokens after which a session ends its thought by
    itself (None: never, so only a budget ends it).  Checked here, once, like any backend's options."""

    think_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.think_tokens is not None:
            value = self.think_tokens
            if isinstance(value, str) and value.strip().isdigit():
                value = int(value)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(
                    f"{self.label('think_tokens')} must be a whole number above 0, got {value!r}"
                )
            self._set("think_tokens", value)


class EchoModel:
    """A loaded echo "model": the reference it was opened from, and no weights."""

    backend = NAME
    quantization = "none"
    chat_template = None  # the built-in Qwen2-VL template renders its prompts
    context_length = 4096

    def __init__(self, name: str, options: EchoOptions):
        self.name = name
        self.options = options
        self.generation_config: dict = {}

    def image_token_estimate(self, width: int, height: int) -> int:
        return 4

    def tokenize(self, text: str, *, special: bool = False) -> list[int]:
        """The registry's ``tokenizer`` capability: one id per word, space run or symbol."""
        return [len(piece) for piece in _pieces(text)]

    def new_session(self, sampling: SamplingParams, *, n_ctx: int | None = None) -> EchoSession:
        return EchoSession(self, sampling, n_ctx or self.context_length)

    def close(self) -> None:
        pass


class EchoSession:
    """Deterministic thoughts from the vocabulary (seeded by the sampling seed), then the answer once the
    controller feeds its forced text (the Session protocol, nothing more)."""

    backend = NAME

    def __init__(self, model: EchoModel, sampling: SamplingParams, n_ctx: int):
        self.model = model
        self.n_ctx = n_ctx
        self.n_past = 0
        self.images_encoded = 0
        self._draw = random.Random(int(sampling.seed or 0))
        self._thought = 0
        self._answer: list[str] | None = None

    def prefill(self, prompt: Prompt) -> PrefillStats:
        image_tokens = [4] * len(prompt.images)
        self.images_encoded += len(prompt.images)
        self.n_past = len(_pieces(prompt.text)) + sum(image_tokens)
        return PrefillStats(self.n_past, sum(image_tokens), 0.0, 0.0, image_tokens)

    def step(self, banned=None) -> Token:
        if self._answer is not None:
            if not self._answer:
                return Token(0, "", is_eos=True)
            piece = self._answer.pop(0)
        else:
            limit = self.model.options.think_tokens
            if limit is not None and self._thought >= limit:
                self._answer = list(ANSWER)
                piece = "\n\n**Final Answer**\n\n"
            else:
                piece = self._draw.choice(VOCABULARY)
                self._thought += 1
        self.n_past += 1
        return Token(1 + (VOCABULARY.index(piece) if piece in VOCABULARY else len(VOCABULARY)), piece)

    def feed(self, text: str) -> int:
        self._answer = list(ANSWER)
        n = self.count_tokens(text)
        self.n_past += n
        return n

    def count_tokens(self, text: str) -> int:
        return len(_pieces(text))

    def close(self) -> None:
        pass


def open_model(resolved, options: EchoOptions) -> EchoModel:
    """The registry's ``open_model``: any resolved model reference will do (no weights are read)."""
    return EchoModel(resolved.name, options)


SPEC = registry.BackendSpec(
    name=NAME,
    module=__name__,
    options=EchoOptions,
    title="echo (a test backend)",
    formats=frozenset({"gguf", "mlx", "hf"}),
    convert_to="gguf",
    capabilities=frozenset({registry.LOCAL_KV_CACHE, registry.TOKENIZER}),
)


def qvq_plugin() -> None:
    """What ``QVQ_PLUGINS=test_echo_backend`` runs in a qvq process."""
    registry.register(SPEC)


# ---------------------------------------------------------------- the tests (each qvq run a child process)

QUESTION = "Which bar is the tallest?"


def _env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["QVQ_PLUGINS"] = __name__
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parent), env.get("PYTHONPATH")]))
    env["QVQ_HOME"] = str(tmp_path / "home")
    for name in ("QVQ_MODEL", "QVQ_BACKEND"):
        env.pop(name, None)
    return env


def _qvq(tmp_path: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "qvq_local.cli", *args],
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_the_plugin_is_not_registered_here():
    """Only processes that name it in QVQ_PLUGINS have it: importing this file registers nothing."""
    assert NAME not in registry.BACKENDS


def test_qvq_ask_with_a_budget_forces_the_answer(tiny_checkpoint, sample_image, tmp_path):
    result = _qvq(
        tmp_path,
        "ask", str(sample_image), QUESTION, "--model", str(tiny_checkpoint), "--backend", NAME,
        "--think-budget", "24", "--answer-budget", "16", "--seed", "5", "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    qvq = data["qvq"]
    assert qvq["backend"] == NAME and qvq["stop_reason"] == "budget"
    assert qvq["forced"] and qvq["forced"][0]["reason"] == "budget" and qvq["forced"][0]["at_token"] >= 24
    assert "**Final Answer**" in qvq["forced"][0]["text"]  # the forced text, fed into the same session
    thought = data["choices"][0]["message"]["reasoning_content"]
    own, _, cut = thought.partition("\n\n")  # its thought, then the forced text's sentence
    assert own and set(_pieces(own)) <= {p for v in VOCABULARY for p in _pieces(v)}  # its vocabulary only
    assert cut.strip() and cut.strip() in qvq["forced"][0]["text"]
    assert qvq["boxed"] == "42" and "\\boxed{42}" in data["choices"][0]["message"]["content"]
    assert qvq["images"][0]["tokens"] == 4  # the backend's own count (image_token_estimate)
    assert qvq["settings"]["think_budget"] == 24 and qvq["settings"]["seed"] == 5
    # the same run again: the thought is the backend's deterministic one
    again = json.loads(
        _qvq(
            tmp_path,
            "ask",
            str(sample_image),
            QUESTION,
            "-m",
            str(tiny_checkpoint),
            "--backend",
            NAME,
            "--think-budget",
            "24",
            "--answer-budget",
            "16",
            "--seed",
            "5",
            "--json",
        ).stdout  # fmt: skip
    )
    assert again["choices"][0]["message"]["reasoning_content"] == thought


def test_the_backends_own_options_go_through_the_api_and_others_are_refused(
    tiny_checkpoint, sample_image, tmp_path
):
    """``api.load(backend="echo", think_tokens=3)`` reaches EchoOptions; an option it does not take
    (``--gpu-layers``, the llama backend's) is refused by name, on the command line too."""
    code = (
        "import json, sys, qvq_local\n"
        f"with qvq_local.load(sys.argv[1], backend={NAME!r}, think_tokens='3') as m:\n"
        "    r = m.ask(sys.argv[2], 'q', think_budget=50, answer_budget=16)\n"
        "    print(json.dumps({'options': m.loaded.options.think_tokens, 'stop': r.stop_reason,"
        " 'thought': r.thought_tokens, 'boxed': r.boxed}))\n"
    )
    image = sample_image
    out = subprocess.run(
        [sys.executable, "-c", code, str(tiny_checkpoint), str(image)],
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got == {"options": 3, "stop": "answer", "thought": 3, "boxed": "42"}  # it ended its thought itself
    bad = _qvq(
        tmp_path, "ask", str(image), "q", "-m", str(tiny_checkpoint), "--backend", NAME, "--gpu-layers", "2"
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert (
        bad.stderr.strip()
        == f"error: the {NAME} backend has no option --gpu-layers (its options: think_tokens)"
    )
    stored = _qvq(tmp_path, "config", "set", "backend", NAME.upper())  # a name qvq config accepts too
    assert stored.returncode == 0 and stored.stdout.strip() == f"backend = {NAME}", stored.stderr


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_qvq_serve_answers_a_real_http_request(tiny_checkpoint, sample_image, tmp_path):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    import base64

    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "qvq_local.cli", "serve", "-m", str(tiny_checkpoint), "--backend", NAME,
         "--port", str(port)],
        env=_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"qvq serve did not start: {server.communicate()[1]}") from None
                time.sleep(0.2)
        with urllib.request.urlopen(base + "/v1/models", timeout=10) as response:
            assert json.load(response)["data"][0]["id"] == Path(tiny_checkpoint).name
        image = "data:image/png;base64," + base64.b64encode(Path(sample_image).read_bytes()).decode()
        body = {
            "model": Path(tiny_checkpoint).name,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": image}},
                        {"type": "text", "text": QUESTION},
                    ],
                }
            ],
            "thinking_budget": 20,
            "seed": 2,
        }
        request = urllib.request.Request(
            base + "/v1/chat/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            data = json.load(response)
        message = data["choices"][0]["message"]
        assert "\\boxed{42}" in message["content"] and message["reasoning_content"]
        assert data["qvq"]["backend"] == NAME and data["qvq"]["stop_reason"] == "budget"
        assert data["qvq"]["forced"][0]["at_token"] >= 20
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.communicate()


def test_qvq_bench_measures_it_on_the_format_it_declares(tmp_path):
    """Bench converts its synthetic model to the backend's ``convert_to`` format, loads it through the API
    with ``backend="echo"`` in its worker processes (they inherit QVQ_PLUGINS) and reports qvq-local's
    figures alone: bench has no raw library to compare this backend with, and it runs one chain at a time
    (no ``chains`` capability), so ``--samples`` is reported as not measured."""
    out = tmp_path / "bench.json"
    result = _qvq(
        tmp_path,
        "bench", "--backend", NAME, "--shape", "tiny", "--runs", "1", "--decode-tokens", "8",
        "--image-sizes", "224", "--json", str(out),
        timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    echo = json.loads(out.read_text())["backends"][NAME]
    assert echo["available"] and echo["format"] == SPEC.convert_to
    assert echo["qvq"]["ok"] and echo["qvq"]["backend"] == NAME
    figures = echo["qvq"]["sizes"]["224"]
    assert figures["image_tokens"] == 4 and figures["decode_tok_s"] > 0  # its own image count, measured
    assert (
        echo["order"] == "qvq only"
        and echo["raw"]["ok"] is False
        and "no raw-library comparison" in echo["raw"]["reason"]
    )
    assert echo["chains"] == {
        "ok": False,
        "reason": f"the {NAME} backend runs one chain at a time (it has no chains capability)",
    }
    assert f"{NAME}: --samples not measured: the {NAME} backend runs one chain at a time" in result.stdout
