"""A GGUF model's vision projector named by the user (`qvq ask --mmproj FILE`, `load(..., mmproj=)`): the
model is resolved without looking for its own, and a wrong file is one line naming it."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from helpers import assert_error

from qvq_local import hub
from qvq_local.errors import InputError, ModelError


def _link(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy(src, dst)
    return dst


@pytest.fixture
def lone_model(tmp_path, tiny_gguf_q4):
    """The tiny GGUF text model alone in a folder, and its projector somewhere else."""
    model = _link(tiny_gguf_q4.model, tmp_path / "model" / "tiny-q4.gguf")
    projector = _link(tiny_gguf_q4.mmproj, tmp_path / "elsewhere" / "vision.gguf")
    return model, projector


def test_a_model_without_its_projector_needs_one_and_takes_the_one_given(lone_model):
    model, projector = lone_model
    with pytest.raises(ModelError) as err:
        hub.resolve(str(model))
    assert_error(err, "no vision projector", "--mmproj FILE names one", path=model)
    resolved = hub.resolve(str(model), mmproj=str(projector))
    assert (resolved.path, resolved.mmproj, resolved.format) == (model, projector, "gguf")
    # the folder works as the reference too
    assert hub.resolve(str(model.parent), mmproj=projector).mmproj == projector


def test_a_projector_given_as_the_model_is_told_so(lone_model):
    """A projector under another name than mmproj* (here vision.gguf) is known by its GGUF header."""
    _, projector = lone_model
    with pytest.raises(ModelError) as err:
        hub.resolve(str(projector))
    assert_error(err, "this is a vision projector", "not the model", "--mmproj", path=projector)


def test_the_given_projector_wins_over_several_beside_the_model(lone_model, tmp_path):
    model, projector = lone_model
    _link(projector, model.parent / "mmproj-a-f16.gguf")
    _link(projector, model.parent / "mmproj-b-f32.gguf")
    with pytest.raises(ModelError, match="several vision projectors"):
        hub.resolve(str(model))
    assert (
        hub.resolve(str(model), mmproj=str(model.parent / "mmproj-b-f32.gguf")).mmproj.name
        == "mmproj-b-f32.gguf"
    )


def test_a_wrong_projector_is_one_line_naming_it(lone_model, tmp_path, tiny_checkpoint):
    model, _ = lone_model
    missing = tmp_path / "nope.gguf"
    with pytest.raises(InputError) as err:
        hub.resolve(str(model), mmproj=str(missing))
    assert_error(err, "no such vision projector file", path=missing)
    text = tmp_path / "notes.gguf"
    text.write_text("hello")
    with pytest.raises(InputError) as err:
        hub.resolve(str(model), mmproj=str(text))
    assert_error(err, "not a GGUF file", path=text)
    with pytest.raises(InputError) as err:
        hub.resolve(str(model), mmproj=str(tmp_path))
    assert_error(err, "this is a folder", path=tmp_path)
    with pytest.raises(InputError) as err:  # a type chooses a projector in a hub repo, not here
        hub.resolve(str(model), mmproj="f16")
    assert_error(err, "no such vision projector file", path="f16")
    with pytest.raises(InputError) as err:  # an HF folder has its vision tower inside
        hub.resolve(str(tiny_checkpoint), mmproj=str(lone_model[1]))
    assert_error(err, "goes with a GGUF model; this model is hf", path=tiny_checkpoint)


@pytest.mark.llama
def test_qvq_ask_runs_a_model_with_the_projector_given(lone_model, sample_image, tmp_path, monkeypatch):
    pytest.importorskip("llama_cpp")
    import json

    from typer.testing import CliRunner

    from qvq_local.cli import app

    monkeypatch.setenv("QVQ_HOME", str(tmp_path / "home"))
    model, projector = lone_model
    runner = CliRunner()
    args = ["ask", str(sample_image), "What is shown?", "-m", str(model), "--think-budget", "4"]
    without = runner.invoke(app, [*args, "--answer-budget", "4"])
    assert without.exit_code == 3 and "no vision projector" in without.stderr and "--mmproj" in without.stderr
    result = runner.invoke(app, [*args, "--answer-budget", "4", "--json", "--mmproj", str(projector)])
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    image_tokens = answer["qvq"]["images"][0]["tokens"]
    assert image_tokens > 0 and answer["usage"]["prompt_tokens"] > image_tokens  # the image was encoded
    bad = runner.invoke(app, [*args, "--mmproj", str(tmp_path / "missing.gguf")])
    assert bad.exit_code == 2 and bad.stderr.strip().endswith("missing.gguf: no such vision projector file")


def test_a_remote_model_takes_no_projector():
    from qvq_local.api import load

    with pytest.raises(InputError, match="mmproj goes with a local GGUF model; the openai backend"):
        load("m", backend="openai", base_url="http://127.0.0.1:9/v1", mmproj="x.gguf")
