"""A model family from one file: registered through the three hooks, it is synthesised, converted to GGUF
and to MLX, and answers ``qvq ask`` with a thinking budget on both local backends, like the built-in
families, while no file of the package knows its name.

The family, "Plugin-VL", is a renamed Qwen2-VL: its own architecture name, model_type, aliases and
system prompt, Qwen2-VL's tensors and GGUF identities (llama.cpp runs no other architecture for it).
What a plugin's function does, :func:`register_plugin` does, in this process (``families.register``, and
the ``register`` decorators of the GGUF converter and of the synthesiser); the module's fixture undoes it
afterwards, so the rest of the suite sees only the built-in families.  Named in ``QVQ_PLUGINS``, this file
is the plugin of a child process too (:func:`qvq_plugin`).
The plugin's converter and writer subclass Qwen2-VL's and override with ``super()`` first; each leaves a
mark in the files (a GGUF key, the config's transformers version) that shows it was the one used.

mlx-vlm runs a model by its ``model_type``: for MLX the fixture also tells mlx-vlm that ``plugin_vl`` is
its ``qwen2_vl`` (a plugin for a new architecture brings the mlx-vlm model that runs it).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, ClassVar

import pytest
from qvq_local.convert import gguf_converter, synth_writer
from qvq_local.convert.gguf_qwen2vl import Qwen2VLConverter
from qvq_local.convert.synth_qwen2vl import Qwen2VLWriter

from qvq_local import families
from qvq_local.families.qwen2vl import Qwen2VLFamily

QUESTION = "Which bar is the tallest?"


class PluginFamily(Qwen2VLFamily):
    """The facts: Qwen2-VL's, under another name."""

    name: ClassVar[str] = "Plugin-VL"
    models: ClassVar[str] = "Plugin-VL (a renamed Qwen2-VL)"
    aliases: ClassVar[tuple[str, ...]] = ("plugin-vl",)
    hf_architectures: ClassVar[tuple[str, ...]] = ("PluginVLForConditionalGeneration",)
    hf_model_types: ClassVar[tuple[str, ...]] = ("plugin_vl",)
    system_prompt: ClassVar[str] = "You are the plugin family's careful assistant."
    synth_shapes: ClassVar[dict[str, Any]] = {
        "tiny": dataclasses.replace(Qwen2VLFamily.synth_shapes["tiny"], family="Plugin-VL")
    }


FAMILY = PluginFamily()


class PluginConverter(Qwen2VLConverter):
    """Qwen2-VL's GGUF pair, with one key of the plugin's own after the generic ones."""

    def add_text_keys(self, w: Any, vocab: Any, file_type: int, name: str) -> None:
        super().add_text_keys(w, vocab, file_type, name)
        w.add_string("plugin.converted_by", type(self).__name__)


class PluginWriter(Qwen2VLWriter):
    """Qwen2-VL's checkpoint files, stamped with the plugin's transformers version."""

    transformers_version: ClassVar[str] = "4.47.0+plugin"


def register_plugin() -> None:
    """What the plugin registers: one family, one converter class, one writer class."""
    families.register(FAMILY)
    gguf_converter.register(FAMILY.name)(PluginConverter)
    synth_writer.register(FAMILY.name)(PluginWriter)


def qvq_plugin() -> None:
    """What ``QVQ_PLUGINS=test_family_plugin`` runs in a qvq process (importing this file registers nothing)."""
    register_plugin()


@pytest.fixture(scope="module")
def plugin():
    register_plugin()
    try:
        yield FAMILY
    finally:
        del families.FAMILIES[FAMILY.name]
        del gguf_converter.CONVERTERS[FAMILY.name]
        del synth_writer.WRITERS[FAMILY.name]


def _qvq(*args: str) -> str:
    """Run ``qvq ARGS`` in this process (the plugin is registered here); its stdout."""
    from typer.testing import CliRunner

    from qvq_local.cli import app

    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.fixture(scope="module")
def plugin_checkpoint(plugin, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("plugin") / "plugin-tiny"
    said = _qvq("synth", str(out), "--family", "plugin-vl", "--dtype", "f32")
    assert "Plugin-VL tiny" in said
    return out


@pytest.fixture(scope="module")
def plugin_gguf(plugin_checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("plugin") / "gguf"
    _qvq(
        "convert", str(plugin_checkpoint), "--to", "gguf", "--quant", "f32", "--mmproj-quant", "f32",
        "-o", str(out), "--force", "-q",
    )  # fmt: skip
    return next(p for p in out.glob("*.gguf") if not p.name.startswith("mmproj-"))


@pytest.fixture(scope="module")
def mlx_knows_plugin_vl(plugin):
    """mlx-vlm runs ``plugin_vl`` as its ``qwen2_vl`` while the module's tests run."""
    pytest.importorskip("mlx_vlm")
    import mlx_vlm.utils
    from mlx_vlm.models.base import install_auto_processor_patch
    from mlx_vlm.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor
    from transformers import AutoProcessor

    saved = vars(AutoProcessor).get("from_pretrained")
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(mlx_vlm.utils.MODEL_REMAPPING, "plugin_vl", "qwen2_vl")
        install_auto_processor_patch("plugin_vl", Qwen2VLProcessor)
        try:
            yield
        finally:  # the patch wraps AutoProcessor.from_pretrained: put back what was there
            if saved is None:
                del AutoProcessor.from_pretrained
            else:
                AutoProcessor.from_pretrained = saved


@pytest.fixture(scope="module")
def plugin_mlx(plugin_checkpoint, mlx_knows_plugin_vl, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("plugin") / "mlx"
    _qvq("convert", str(plugin_checkpoint), "--to", "mlx", "--bits", "none", "-o", str(out), "--force", "-q")
    return out


def test_the_plugin_is_found_from_every_side_and_leaves_the_built_ins_alone(plugin):
    from qvq_local.convert.synthetic import get_family

    assert families.family_for_config({"architectures": ["PluginVLForConditionalGeneration"]}) is plugin
    assert families.family_for_model_type("plugin_vl") is plugin
    assert get_family("plugin-vl") is plugin and get_family("Plugin-VL") is plugin
    assert (
        "PluginVLForConditionalGeneration (Plugin-VL (a renamed Qwen2-VL))" in families.describe_supported()
    )
    # the built-in families registered first keep the GGUF identities it shares with Qwen2-VL
    assert families.family_for_gguf_arch(plugin.gguf_text_arch) is families.DEFAULT_FAMILY
    assert families.family_for_projector(plugin.gguf_projector) is families.DEFAULT_FAMILY
    assert isinstance(synth_writer.writer_for(plugin), PluginWriter)
    assert gguf_converter.converter_class(plugin) is PluginConverter


def test_a_child_process_finds_the_family_through_qvq_plugins(tmp_path):
    """Named in ``QVQ_PLUGINS``, the plugin's family and writer are registered in any qvq process, even one
    that never reads the backend registry: a bench worker's synth job (what ``qvq bench --family
    plugin-vl`` starts) writes the plugin's checkpoint with the plugin's writer."""
    import os
    import subprocess
    import sys

    out = tmp_path / "ckpt"
    spec = {"job": "synth", "out": str(out), "shape": "tiny", "dtype": "f32", "family": "plugin-vl"}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    env = {
        **os.environ,
        "QVQ_PLUGINS": Path(__file__).stem,
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")])
        ),
        "QVQ_HOME": str(tmp_path / "home"),
    }
    ran = subprocess.run(
        [
            sys.executable,
            "-m",
            "qvq_local.bench.worker",
            str(tmp_path / "spec.json"),
            str(tmp_path / "out.json"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ran.returncode == 0, ran.stderr + (tmp_path / "out.json").read_text()
    assert "warning" not in ran.stderr  # the plugin loaded
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["PluginVLForConditionalGeneration"]
    assert config["transformers_version"] == "4.47.0+plugin"  # its own writer's


def test_synth_writes_the_plugin_layout_with_its_writer(plugin, plugin_checkpoint):
    from qvq_local.convert.checkpoint import open_checkpoint

    config = json.loads((plugin_checkpoint / "config.json").read_text())
    assert config["architectures"] == ["PluginVLForConditionalGeneration"]
    assert config["model_type"] == "plugin_vl" and config["transformers_version"] == "4.47.0+plugin"
    generation = json.loads((plugin_checkpoint / "generation_config.json").read_text())
    assert generation["transformers_version"] == "4.47.0+plugin"
    template = json.loads((plugin_checkpoint / "chat_template.json").read_text())["chat_template"]
    assert plugin.system_prompt in template  # the writer asks the family, not Qwen2-VL
    ckpt = open_checkpoint(plugin_checkpoint)
    try:
        assert ckpt.family is plugin
        assert isinstance(gguf_converter.converter_for(ckpt), PluginConverter)
    finally:
        ckpt.release()


@pytest.mark.llama
@pytest.mark.slow
def test_gguf_pair_comes_from_the_plugin_converter_and_answers_with_a_budget(
    plugin, plugin_gguf, sample_image, tmp_path, monkeypatch
):
    import gguf

    pytest.importorskip("llama_cpp")
    reader = gguf.GGUFReader(plugin_gguf)
    keys = {f.name: f.contents() for f in reader.fields.values()}
    assert keys["plugin.converted_by"] == "PluginConverter"
    assert keys["general.architecture"] == plugin.gguf_text_arch  # llama.cpp runs it as Qwen2-VL's
    monkeypatch.setenv("QVQ_HOME", str(tmp_path / "home"))
    data = _ask(str(plugin_gguf), sample_image, "llama")
    # a GGUF pair names its family by its projector, which the plugin shares with Qwen2-VL (registered
    # first), so the pair is prompted as Qwen2-VL's
    assert data["qvq"]["settings"]["system"] == families.DEFAULT_FAMILY.system_prompt


@pytest.mark.mlx
@pytest.mark.slow
def test_mlx_conversion_answers_with_a_budget_as_the_plugin_family(
    plugin, plugin_mlx, sample_image, tmp_path, monkeypatch
):
    config = json.loads((plugin_mlx / "config.json").read_text())
    assert config["model_type"] == "plugin_vl"
    monkeypatch.setenv("QVQ_HOME", str(tmp_path / "home"))
    data = _ask(str(plugin_mlx), sample_image, "mlx")
    # an MLX folder names its family by its model_type: the plugin's own facts are the defaults
    assert data["qvq"]["settings"]["system"] == plugin.system_prompt


def _ask(model: str, image: Path, backend: str) -> dict:
    """``qvq ask`` with a thinking budget, as JSON; the budget cut the thought and the answer followed."""
    out = _qvq(
        "ask", str(image), QUESTION, "--model", model, "--backend", backend,
        "--think-budget", "12", "--answer-budget", "6", "--json", "--seed", "1",
    )  # fmt: skip
    data = json.loads(out)
    qvq = data["qvq"]
    assert qvq["backend"] == backend and qvq["images"][0]["tokens"] == 48  # 224x168: 8x6 merged tokens
    assert qvq["forced"] and qvq["forced"][0]["reason"] == "budget" and qvq["forced"][0]["at_token"] >= 12
    assert data["usage"]["reasoning_tokens"] >= 12 and data["usage"]["completion_tokens"] > 0
    assert qvq["stop_reason"] in ("budget", "loop", "max_tokens", "eos")
    return data
