"""`qvq ask`, `qvq config` and `qvq doctor` through Typer's runner: outputs, and one-line errors for bad input."""

from __future__ import annotations

import importlib.util
import json
import re

import pytest
from helpers import assert_error
from typer.testing import CliRunner

from qvq_local.cli import app

ESC = re.compile(r"\x1b|\x9b")
runner = CliRunner()


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    """Every test gets its own QVQ_HOME and no model from the environment."""
    monkeypatch.setenv("QVQ_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("QVQ_MODEL", raising=False)
    monkeypatch.delenv("QVQ_BACKEND", raising=False)


@pytest.fixture(scope="module")
def gguf_model(request):
    pytest.importorskip("llama_cpp")
    return str(request.getfixturevalue("tiny_gguf_q4").model)


def _one_line_error(result, *fragments: str, path=None) -> str:
    """One ``error:`` line on stderr naming ``path`` (when given) and holding ``fragments`` outside paths."""
    assert result.exit_code not in (0, None), result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert_error(lines[0], *(re.escape(f) for f in fragments), path=path)
    return lines[0]


# ------------------------------------------------------------------ success paths (real tiny GGUF model)


@pytest.mark.llama
@pytest.mark.slow
def test_json_output_parses_and_holds_the_fields(gguf_model, sample_image):
    result = runner.invoke(
        app,
        [
            "ask",
            str(sample_image),
            "Which bar is highest?",
            "--model",
            gguf_model,
            "--think-budget",
            "16",
            "--answer-budget",
            "8",
            "--json",
            "--seed",
            "3",
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["object"] == "chat.completion"
    message = data["choices"][0]["message"]
    assert message["role"] == "assistant" and isinstance(message["content"], str)
    assert message["reasoning_content"]  # the tiny model always thinks (randomly) for 16+ tokens
    assert data["choices"][0]["finish_reason"] in ("stop", "length")
    assert data["usage"]["reasoning_tokens"] >= 16 and data["usage"]["prompt_tokens"] > 0
    qvq = data["qvq"]
    assert qvq["backend"] == "llama" and qvq["stop_reason"] in ("budget", "loop", "max_tokens")
    assert qvq["forced"] and qvq["forced"][0]["at_token"] >= 16
    assert qvq["images"][0]["path"] == str(sample_image) and qvq["images"][0]["tokens"] > 0
    assert qvq["timings"]["prefill_s"] > 0 and "boxed" in qvq
    assert qvq["settings"]["think_budget"] == 16 and qvq["settings"]["seed"] == 3


@pytest.mark.llama
@pytest.mark.slow
def test_plain_output_has_no_escape_codes_and_splits_streams(gguf_model, sample_image, tmp_path):
    save = tmp_path / "run.md"
    result = runner.invoke(
        app,
        [
            "ask",
            "-a",
            str(sample_image),
            "What is shown?",
            "-m",
            gguf_model,
            "--think-budget",
            "16",
            "--answer-budget",
            "8",
            "--save",
            str(save),
        ],
    )
    assert result.exit_code == 0, result.output
    assert not ESC.search(result.stdout) and not ESC.search(result.stderr)
    assert "answer forced" in result.stderr and "stop:" in result.stderr  # the plain marker and summary
    assert "answer forced" not in result.stdout
    text = save.read_text(encoding="utf-8")
    assert "What is shown?" in text and sample_image.name in text and "## Thought" in text


@pytest.mark.llama
@pytest.mark.slow
def test_default_model_from_config_and_hide_thinking(gguf_model, sample_image):
    assert runner.invoke(app, ["config", "set", "model", gguf_model]).exit_code == 0
    result = runner.invoke(
        app, ["ask", str(sample_image), "q", "--think-budget", "8", "--answer-budget", "4", "--hide-thinking"]
    )
    assert result.exit_code == 0, result.output
    assert "[tiny" not in result.stderr  # no header and no thought with --hide-thinking
    assert "answer forced" in result.stderr


# ------------------------------------------------------------------ bad input: one line, non-zero, no traceback


def test_missing_image(sample_image, tmp_path):
    result = runner.invoke(app, ["ask", str(tmp_path / "nope.png"), "q", "--model", "whatever"])
    _one_line_error(result, "no such image", path=tmp_path / "nope.png")


def test_unreadable_image(tmp_path):
    fake = tmp_path / "notes.png"
    fake.write_text("this is not a picture\n")
    result = runner.invoke(app, ["ask", str(fake), "q", "--model", "whatever"])
    _one_line_error(result, "not an image", "looks like a text file", path=fake)


def test_question_missing(sample_image):
    _one_line_error(runner.invoke(app, ["ask", str(sample_image)]), "no question")
    _one_line_error(runner.invoke(app, ["ask"]), "images and a question")


def test_bad_numbers(sample_image):
    result = runner.invoke(app, ["ask", str(sample_image), "q", "--think-budget", "0"])
    _one_line_error(result, "--think-budget")


def test_unknown_model(sample_image):
    result = runner.invoke(app, ["ask", str(sample_image), "q", "--model", "no-such-model"])
    _one_line_error(result, "unknown model", "no-such-model")


def test_no_model_configured_says_how_to_get_one(sample_image):
    line = _one_line_error(runner.invoke(app, ["ask", str(sample_image), "q"]))
    assert "qvq config set model" in line and "qvq convert" in line


@pytest.mark.llama
def test_wrong_format_for_the_backend(gguf_model, sample_image):
    result = runner.invoke(app, ["ask", str(sample_image), "q", "--model", gguf_model, "--backend", "mlx"])
    _one_line_error(result, "mlx backend cannot load this model", "gguf")


def test_mlx_folder_with_llama_backend(tiny_checkpoint, sample_image):
    result = runner.invoke(
        app, ["ask", str(sample_image), "q", "--model", str(tiny_checkpoint), "--backend", "llama"]
    )
    _one_line_error(result, "llama backend cannot load this model", path=tiny_checkpoint)


@pytest.mark.llama
def test_missing_backend(gguf_model, sample_image, monkeypatch):
    real = importlib.util.find_spec

    def no_llama(name, *args, **kwargs):
        return None if name.split(".")[0] == "llama_cpp" else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", no_llama)
    result = runner.invoke(app, ["ask", str(sample_image), "q", "--model", gguf_model])
    _one_line_error(result, "no backend to run this model", "pip install 'qvq-local[llama]'")
    result = runner.invoke(app, ["ask", str(sample_image), "q", "--model", gguf_model, "--backend", "llama"])
    _one_line_error(result, "llama backend is not installed", "pip install 'qvq-local[llama]'")


def test_unknown_backend(sample_image):
    result = runner.invoke(app, ["ask", str(sample_image), "q", "--model", "x", "--backend", "cuda"])
    _one_line_error(result, "unknown backend")


def test_save_into_missing_folder(sample_image, tmp_path):
    result = runner.invoke(app, ["ask", str(sample_image), "q", "--save", str(tmp_path / "no" / "run.md")])
    _one_line_error(result, "--save")


# ------------------------------------------------------------------ config and doctor


def test_config_set_get_list_unset(monkeypatch):
    assert runner.invoke(app, ["config", "get", "model"]).exit_code == 1  # unset
    result = runner.invoke(app, ["config", "set", "model", "my-model"])
    assert result.exit_code == 0 and "my-model" in result.stdout
    assert runner.invoke(app, ["config", "get", "model"]).stdout.strip() == "my-model"
    monkeypatch.setenv("QVQ_MODEL", "from-env")
    assert runner.invoke(app, ["config", "get", "model"]).stdout.strip() == "from-env"
    listing = runner.invoke(app, ["config", "list"]).stdout
    assert "model = from-env" in listing and "$QVQ_MODEL" in listing
    monkeypatch.delenv("QVQ_MODEL")
    assert runner.invoke(app, ["config", "set", "think_budget", "512"]).exit_code == 0
    assert json.loads(runner.invoke(app, ["config", "list", "--json"]).stdout)["think_budget"] == 512
    assert runner.invoke(app, ["config", "unset", "model"]).exit_code == 0
    assert runner.invoke(app, ["config", "get", "model"]).exit_code == 1


def test_config_rejects_bad_keys_and_values():
    _one_line_error(runner.invoke(app, ["config", "set", "colour", "blue"]), "unknown setting")
    _one_line_error(runner.invoke(app, ["config", "set", "think_budget", "0"]), "above 0")
    _one_line_error(runner.invoke(app, ["config", "set", "max_pixels", "many"]), "whole number")
    _one_line_error(runner.invoke(app, ["config", "set", "backend", "tpu"]), "auto, mlx, llama or openai")


@pytest.mark.parametrize("stored", ["NaN", "-Infinity", "1e400", '"lots"', "2.5", "true", "0"])
def test_a_hand_edited_setting_is_a_one_line_error(stored, tmp_path):
    """Issue 22: a settings file holding NaN, infinity or a value `config set` would refuse crashed the
    commands that read it (a ValueError traceback from int()); now one line naming the file."""
    home = tmp_path / "home"
    home.mkdir()
    path = home / "config.json"
    text = '{"cache_max_mb": ' + stored + "}"
    path.write_text(text)
    for args in (["cache", "info"], ["config", "get", "cache_max_mb"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output
        _one_line_error(result, path=path)
    assert path.read_text() == text  # nothing rewritten


@pytest.mark.parametrize("key", ["model", "base_url"])
def test_config_set_refuses_a_lone_surrogate(key, tmp_path):
    """Issue 22's surrogate rule, found by its property test: `config set model` with a lone surrogate stored
    it and then crashed printing it (UnicodeEncodeError traceback).  Refused in one line, nothing written."""
    result = runner.invoke(app, ["config", "set", key, "my \udcff model"])
    assert result.exit_code == 2, result.output
    _one_line_error(result, "surrogate")
    assert not (tmp_path / "home" / "config.json").exists()


def test_doctor_reports_machine_and_backends():
    result = runner.invoke(app, ["doctor", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["machine"]["memory_total_bytes"] and data["machine"]["os"]
    assert {row["backend"] for row in data["backends"]} == {"mlx", "llama"}
    human = runner.invoke(app, ["doctor"])
    assert human.exit_code == 0 and "backend llama" in human.stdout and "memory" in human.stdout


@pytest.mark.llama
def test_doctor_says_whether_a_model_fits(gguf_model):
    data = json.loads(
        runner.invoke(app, ["doctor", "--model", gguf_model, "--context", "4096", "--json"]).stdout
    )
    fit = data["model"]
    assert fit["format"] == "gguf" and fit["context_tokens"] == 4096
    # tiny: 2 layers x 2 KV heads x 64 dims x 4096 tokens x (K and V) x 2 bytes
    assert fit["kv_cache_bytes"] == 2 * 2 * 4096 * 2 * 64 * 2
    assert fit["weights_bytes"] > 0 and fit["fits"] is True and fit["verdict"] == "fits"
