"""One settings object per question: the same rules for `qvq ask` and the API, checked once, passed down whole."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
from fakes import FAKE_BACKEND, ScriptedSession, chop
from helpers import assert_error
from typer.testing import CliRunner

from qvq_local import api
from qvq_local.ask_cmd import AskRequest, build_settings, load_request
from qvq_local.backends import registry
from qvq_local.backends.base import SamplingParams
from qvq_local.backends.llama_buffers import LlamaOptions
from qvq_local.budgets import DEFAULT_ANSWER_BUDGET
from qvq_local.cli import app
from qvq_local.errors import InputError
from qvq_local.model import Model
from qvq_local.settings import CLI_LABELS, AskSettings

runner = CliRunner()


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("QVQ_HOME", str(tmp_path / "home"))
    for name in ("QVQ_MODEL", "QVQ_BACKEND", "QVQ_LLAMA_CPU_BUFFERS"):
        monkeypatch.delenv(name, raising=False)


# (keyword arguments, the command line's message, the API's message)
BAD = [
    ({"think_budget": 0}, "--think-budget must be above 0, got 0", "the think budget must be above 0, got 0"),
    (
        {"answer_budget": -3},
        "--answer-budget must be above 0, got -3",
        "the answer budget must be above 0, got -3",
    ),
    ({"max_pixels": 0}, "--max-pixels must be above 0, got 0", "max_pixels must be above 0, got 0"),
    (
        {"sampling": SamplingParams(temperature=-0.5)},
        "--temperature must be 0 or more, got -0.5",
        "temperature must be 0 or more, got -0.5",
    ),
    (
        {"sampling": SamplingParams(top_p=1.5)},
        "--top-p must be in (0, 1], got 1.5",
        "top_p must be in (0, 1], got 1.5",
    ),
    (
        {"sampling": SamplingParams(top_p=0.0)},
        "--top-p must be in (0, 1], got 0.0",
        "top_p must be in (0, 1], got 0.0",
    ),
    (
        {"sampling": SamplingParams(top_k=-1)},
        "--top-k must be 0 or more, got -1",
        "top_k must be 0 or more, got -1",
    ),
    (
        {"sampling": SamplingParams(repetition_penalty=0.0)},
        "--repetition-penalty must be above 0, got 0.0",
        "repetition_penalty must be above 0, got 0.0",
    ),
    # NaN passes every comparison and infinity every lower bound: refused by name (issue 22)
    (
        {"sampling": SamplingParams(temperature=float("nan"))},
        "--temperature must be a finite number, got nan",
        "temperature must be a finite number, got nan",
    ),
    (
        {"sampling": SamplingParams(temperature=float("inf"))},
        "--temperature must be a finite number, got inf",
        "temperature must be a finite number, got inf",
    ),
    (
        {"sampling": SamplingParams(repetition_penalty=float("nan"))},
        "--repetition-penalty must be a finite number, got nan",
        "repetition_penalty must be a finite number, got nan",
    ),
    (
        {"sampling": SamplingParams(top_p=float("nan"))},
        "--top-p must be a finite number, got nan",
        "top_p must be a finite number, got nan",
    ),
    (
        {"sampling": SamplingParams(top_k=2**70)},
        f"--top-k must be at most {2**31 - 1}, got {2**70}",
        f"top_k must be at most {2**31 - 1}, got {2**70}",
    ),
    (
        {"sampling": SamplingParams(seed=-1)},
        "--seed must be a whole number from 0 to 4294967295, got -1",
        "seed must be a whole number from 0 to 4294967295, got -1",
    ),
    (
        {"think_budget": float("nan")},
        "--think-budget must be a whole number, got nan",
        "the think budget must be a whole number, got nan",
    ),
    (
        {"answer_budget": float("inf")},
        "--answer-budget must be a whole number, got inf",
        "the answer budget must be a whole number, got inf",
    ),
    (
        {"max_pixels": 2.5},
        "--max-pixels must be a whole number, got 2.5",
        "max_pixels must be a whole number, got 2.5",
    ),
    (
        {"lang_lock": "sometimes"},
        "--lang-lock must be one of auto, on, off, got 'sometimes'",
        "unknown language lock 'sometimes'; choose one of auto, on, off",
    ),
]
# the llama backend's load options: the same rule, checked once, by the backend's own options type
BAD_LOAD = [
    (
        {"cpu_buffers": "amx"},
        "--cpu-buffers must be one of auto, all, no-amx, none, got 'amx'",
        "cpu_buffers must be one of auto, all, no-amx, none, got 'amx'",
    ),
    (
        {"gpu_layers": "half"},
        "--gpu-layers must be a whole number of layers (0 or more), or all (-1), got 'half'",
        "gpu_layers must be a whole number of layers (0 or more), or all (-1), got 'half'",
    ),
]


@pytest.mark.parametrize("kwargs, cli_message, api_message", BAD)
def test_one_rule_two_spellings(kwargs, cli_message, api_message):
    with pytest.raises(InputError) as cli:
        AskSettings(**kwargs, labels=CLI_LABELS)
    assert str(cli.value) == cli_message
    with pytest.raises(InputError) as py:
        AskSettings(**kwargs)
    assert str(py.value) == api_message


@pytest.mark.parametrize("kwargs, cli_message, api_message", BAD_LOAD)
def test_one_load_rule_two_spellings(kwargs, cli_message, api_message):
    llama = registry.get("llama")
    with pytest.raises(InputError) as cli:
        llama.build_options(kwargs, {name: "--" + name.replace("_", "-") for name in kwargs})
    assert str(cli.value) == cli_message
    with pytest.raises(InputError) as py:
        llama.build_options(kwargs)
    assert str(py.value) == api_message


def test_values_are_normalised_once_and_the_object_is_frozen():
    s = AskSettings(lang_lock=" ON ")
    assert s.lang_lock == "on" and AskSettings().answer_budget == DEFAULT_ANSWER_BUDGET
    options = LlamaOptions(cpu_buffers="No-AMX", gpu_layers=" 12 ")
    assert (options.cpu_buffers, options.gpu_layers) == ("no-amx", 12)
    assert registry.canonical("GGUF") == "llama" and load_request(AskRequest()).backend == "auto"
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.think_budget = 5  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.gpu_layers = 5  # type: ignore[misc]
    with pytest.raises(InputError, match="the think budget must be above 0"):
        dataclasses.replace(s, think_budget=-1)  # a copy is checked like the original
    with pytest.raises(InputError, match="^gpu_layers must be a whole number"):
        dataclasses.replace(options, gpu_layers=-2)


# ------------------------------------------------------------------ qvq ask: options, then qvq config


def test_cli_options_beat_the_stored_defaults_which_fill_the_rest():
    assert runner.invoke(app, ["config", "set", "think_budget", "300"]).exit_code == 0
    assert runner.invoke(app, ["config", "set", "max_pixels", "50000"]).exit_code == 0
    assert runner.invoke(app, ["config", "set", "backend", "gguf"]).exit_code == 0
    request = AskRequest(
        options={"think_budget": 40, "top_k": 3, "seed": 7, "lang_lock": "OFF", "loop_detection": False}
    )
    s = build_settings(request)
    assert s.think_budget == 40  # the option
    assert s.max_pixels == 50000 and load_request(request).backend == "llama"  # the stored defaults
    assert s.answer_budget == DEFAULT_ANSWER_BUDGET  # neither: the built-in default
    assert s.sampling == SamplingParams(top_k=3, seed=7)
    assert (s.lang_lock, s.loop_detection) == ("off", False)


def test_a_bad_option_names_its_flag_and_a_bad_stored_value_names_the_setting(tmp_path):
    with pytest.raises(InputError) as err:
        build_settings(AskRequest(options={"answer_budget": 0}))  # 0 is refused, not taken for "unset"
    assert str(err.value) == "--answer-budget must be above 0, got 0"
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.json").write_text(json.dumps({"think_budget": 0}))  # hand-edited: `config set` refuses 0
    with pytest.raises(InputError) as err:
        build_settings(AskRequest())
    assert str(err.value) == "the think_budget setting must be above 0, got 0"
    assert build_settings(AskRequest(options={"think_budget": 9})).think_budget == 9  # it hides the bad value


# ------------------------------------------------------------------ passed down whole


class _Loaded:
    backend = name = "fake"
    quantization = "none"
    chat_template = None
    context_length = 4096

    def __init__(self):
        self.generation_config: dict = {}
        self.sessions: list[ScriptedSession] = []
        self.samplings: list[SamplingParams] = []

    def image_token_estimate(self, width, height):
        return 16

    def tokenize(self, text, *, special=False):
        return chop(text)

    def new_session(self, sampling, *, n_ctx=None):
        self.samplings.append(sampling)
        session = ScriptedSession("thinking " * 40, "It is \\boxed{5}.")
        self.sessions.append(session)
        return session

    def close(self):
        pass


def test_api_checks_every_option_before_a_session_opens(sample_image):
    loaded = _Loaded()
    model = Model(loaded, name="fake", spec=FAKE_BACKEND, quantization="none")
    for kwargs, _, message in BAD:
        if "sampling" in kwargs:
            kwargs = {k: v for k, v in dataclasses.asdict(kwargs["sampling"]).items() if v is not None}
        with pytest.raises(InputError) as err:
            model.stream(sample_image, "q", **kwargs)
        assert_error(err, re.escape(message))
    assert not loaded.sessions


def test_every_cli_option_reaches_the_session_and_the_result(sample_image, monkeypatch):
    loaded = _Loaded()
    seen: dict = {}

    def fake_load(ref, **kw):
        seen.update(kw)
        return Model(loaded, name="fake", spec=FAKE_BACKEND, quantization="none")

    monkeypatch.setattr(api, "load", fake_load)
    result = runner.invoke(
        app,
        [
            "ask", str(sample_image), "q", "-m", "x", "--json",
            "--think-budget", "12", "--answer-budget", "6", "--max-pixels", "40000", "--detail", "high",
            "--temperature", "0.7", "--top-p", "0.9", "--top-k", "5", "--repetition-penalty", "1.1",
            "--seed", "4", "--system", "Be brief.", "--no-loop-stop", "--lang-lock", "off",
            "--backend", "llamacpp", "--cpu-buffers", "NONE", "--gpu-layers", "ALL",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    labels = {"cpu_buffers": "--cpu-buffers", "gpu_layers": "--gpu-layers"}
    # the image bound is the question's (its settings below), not the model's
    assert seen == {
        "backend": "llamacpp", "cpu_buffers": "NONE", "gpu_layers": "ALL", "labels": labels, "progress": False,
    }  # fmt: skip
    # api.load maps the backend once and hands its options to that backend's own type, checked there
    llama = registry.get(seen["backend"])
    assert llama.name == "llama"
    assert llama.build_options({"cpu_buffers": "NONE", "gpu_layers": "ALL"}, labels) == LlamaOptions(
        cpu_buffers="none", gpu_layers=-1
    )
    assert loaded.samplings == [
        SamplingParams(temperature=0.7, top_p=0.9, top_k=5, repetition_penalty=1.1, seed=4)
    ]
    settings = json.loads(result.stdout)["qvq"]["settings"]
    assert {
        k: settings[k] for k in ("think_budget", "answer_budget", "max_pixels", "loop_detection", "system")
    } == {
        "think_budget": 12,
        "answer_budget": 6,
        "max_pixels": 40000,
        "loop_detection": False,
        "system": "Be brief.",
    }
    assert settings["lang_lock"]["mode"] == "off" and settings["top_k"] == 5
    # --max-pixels wins over --detail given beside it, and the settings say so
    assert settings["detail"] == {
        "level": None, "source": "--max-pixels", "reason": "", "max_pixels": 40000, "min_pixels": 3136,
        "max_image_tokens": 51,
    }  # fmt: skip
    assert "Be brief." in loaded.sessions[0].prefill_calls[0].text


@pytest.mark.parametrize(
    "option, value",
    [("--temperature", "nan"), ("--temperature", "inf"), ("--repetition-penalty", "nan"), ("--top-p", "nan")],
)
def test_ask_refuses_nan_and_infinity_before_loading(option, value, sample_image, monkeypatch):
    """Issue 22: `qvq ask --temperature nan` ran and exited 0 (and --json printed NaN, which is not JSON)."""
    loaded = _Loaded()
    monkeypatch.setattr(
        api, "load", lambda ref, **kw: Model(loaded, name="f", spec=FAKE_BACKEND, quantization="x")
    )
    result = runner.invoke(app, ["ask", str(sample_image), "q", "-m", "x", "--json", option, value])
    assert result.exit_code == 2, result.output
    assert_error(
        result.stderr.strip().removeprefix("error: "), re.escape(f"{option} must be a finite number")
    )
    assert result.stdout == "" and not loaded.sessions


def test_a_lone_surrogate_in_any_text_is_refused_by_name(sample_image, monkeypatch, tmp_path):
    """Issue 22, defect 2's rule outside the server: a lone surrogate (what Python makes of bytes that are not
    UTF-8 on the command line) in the question or the system prompt is one line naming it, not a
    UnicodeEncodeError traceback from the tokenizer."""
    with pytest.raises(InputError) as err:
        AskSettings(system="be \ud800 brief", labels=CLI_LABELS)
    assert_error(err, "--system", "surrogate", "U\\+D800")
    with pytest.raises(InputError) as err:
        AskSettings(forced_text="\udfff")
    assert_error(err, "forced_text", "surrogate")

    class _Utf8Only(_Loaded):  # a real tokenizer encodes the text first
        def tokenize(self, text, *, special=False):
            text.encode("utf-8")
            return chop(text)

    loaded = _Utf8Only()
    model = Model(loaded, name="fake", spec=FAKE_BACKEND, quantization="none")
    with pytest.raises(InputError) as err:
        list(model.stream(sample_image, "which \udcff bar?"))
    assert_error(err, "question", "surrogate", "U\\+DCFF")
    monkeypatch.setattr(
        api, "load", lambda ref, **kw: Model(loaded, name="f", spec=FAKE_BACKEND, quantization="x")
    )
    save = tmp_path / "run.md"
    result = runner.invoke(app, ["ask", str(sample_image), "\udcff?", "-m", "x", "--save", str(save)])
    assert result.exit_code == 2, result.output
    assert_error(result.stderr.strip().removeprefix("error: "), "question", "surrogate")
    assert not save.exists() and not loaded.sessions
