"""`qvq convert`, `qvq pull`, `qvq models` through the real Typer app (CliRunner)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from helpers import assert_error
from typer.testing import CliRunner

from qvq_local import hub
from qvq_local.cli import app
from qvq_local.formats.manifest import MANIFEST_NAME, build_manifest, read_manifest, write_manifest

runner = CliRunner()


@pytest.fixture()
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("QVQ_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _invoke(*args: str):
    return runner.invoke(app, list(args))


def _one_line_error(result, code: int, *needles: str) -> None:
    assert result.exit_code == code, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    assert_error(lines[0], *(re.escape(n) for n in needles))


# ----------------------------------------------------------------------------- convert
@pytest.mark.mlx
@pytest.mark.slow
def test_convert_to_mlx_default_location_manifest_and_listing(tiny_checkpoint, home):
    pytest.importorskip("mlx_vlm")
    result = _invoke("convert", str(tiny_checkpoint), "--to", "mlx", "--quiet")
    assert result.exit_code == 0, result.output
    out = home / "models" / f"{tiny_checkpoint.name}-mlx-4bit"
    assert result.output.strip().splitlines()[-1] == str(out)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["format"] == "mlx" and manifest["quantization"] == "4bit-g64"
    assert manifest["name"] == out.name
    assert manifest["bits"] == 4 and manifest["group_size"] == 64
    assert manifest["source"] == str(tiny_checkpoint.resolve())
    assert manifest["files"]["config.json"] == (out / "config.json").stat().st_size
    assert manifest["total_bytes"] == sum(manifest["files"].values())
    assert manifest["tool_version"]

    got = hub.resolve(out.name)  # the name `qvq models` lists is what --model accepts
    assert (got.format, got.path, got.quantization) == ("mlx", out, "4bit-g64")

    listed = _invoke("models", "--json")
    assert listed.exit_code == 0, listed.output
    rows = json.loads(listed.output)
    assert [(r["name"], r["format"], r["quantization"]) for r in rows] == [(out.name, "mlx", "4bit-g64")]
    table = _invoke("models")
    assert table.exit_code == 0 and out.name in table.output and "4bit-g64" in table.output

    # an existing output is refused without --force, and left untouched
    before = (out / MANIFEST_NAME).read_text()
    again = _invoke("convert", str(tiny_checkpoint), "--to", "mlx", "--quiet")
    _one_line_error(again, 2, "exists", "--force")
    assert (out / MANIFEST_NAME).read_text() == before
    forced = _invoke("convert", str(tiny_checkpoint), "--to", "mlx", "--quiet", "--force")
    assert forced.exit_code == 0, forced.output
    assert json.loads((out / MANIFEST_NAME).read_text())["created"] >= json.loads(before)["created"]
    assert sorted(p.name for p in (home / "models").iterdir()) == [out.name]  # no partial/old folders


@pytest.mark.llama
@pytest.mark.slow
def test_convert_to_gguf_with_output_folder(tiny_checkpoint, home, tmp_path):
    pytest.importorskip("gguf")
    out = tmp_path / "tiny-gguf"
    result = _invoke("convert", str(tiny_checkpoint), "--to", "gguf", "--quant", "f16", "-o", str(out), "-q")
    assert result.exit_code == 0, result.output
    manifest = read_manifest(out)
    assert (manifest["format"], manifest["quantization"], manifest["mmproj_quant"]) == ("gguf", "F16", "f16")
    assert (out / manifest["model"]).is_file() and (out / manifest["mmproj"]).is_file()
    got = hub.resolve(out)
    assert got.format == "gguf" and got.path == out / manifest["model"]
    assert got.mmproj == out / manifest["mmproj"]
    assert hub.resolve(got.path).mmproj == got.mmproj  # the .gguf file itself finds its projector
    # The model's generation_config travels beside the GGUF too (its sampling values are also in the GGUF),
    # and the llama backend reads it there.
    shipped = json.loads((tiny_checkpoint / "generation_config.json").read_text())
    assert json.loads((out / "generation_config.json").read_text()) == shipped
    from qvq_local.backends import llamacpp

    assert (
        llamacpp._sidecar_generation_config(got.path)["repetition_penalty"] == shipped["repetition_penalty"]
    )

    again = _invoke("convert", str(tiny_checkpoint), "--to", "gguf", "--quant", "f16", "-o", str(out), "-q")
    _one_line_error(again, 2, "exists")


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--to", "mlx", "--quant", "q4_k_m"], "--quant"),
        (["--to", "mlx", "--mmproj-quant", "f16"], "--mmproj-quant"),
        (["--to", "gguf", "--bits", "4"], "--bits"),
        (["--to", "gguf", "--group-size", "32"], "--group-size"),
        (["--to", "gguf", "--quant", "q3_k"], "--quant"),
        (["--to", "gguf", "--mmproj-quant", "q4_k_m"], "--mmproj-quant"),
        (["--to", "mlx", "--bits", "3"], "--bits"),
        (["--to", "onnx"], "--to"),
    ],
)
def test_bad_option_combinations_are_one_line_errors(tiny_checkpoint, home, args, needle):
    result = _invoke("convert", str(tiny_checkpoint), *args, "-q")
    _one_line_error(result, 2, needle)
    assert not (home / "models").exists()


def test_bad_sources_are_one_line_errors(home, tmp_path):
    _one_line_error(_invoke("convert", str(tmp_path / "nowhere"), "--to", "mlx"), 3, "no such folder")
    _one_line_error(_invoke("convert", "not a hub id/x", "--to", "mlx"), 3)
    empty = tmp_path / "empty"
    empty.mkdir()
    _one_line_error(_invoke("convert", str(empty), "--to", "mlx"), 3, "config.json")
    assert not (home / "models").exists() or list((home / "models").iterdir()) == []


@pytest.mark.parametrize("fmt", ["mlx", "gguf"])
def test_interrupted_convert_leaves_no_complete_looking_output(tiny_checkpoint, home, monkeypatch, fmt):
    """Ctrl-C after the converter wrote its files but before the manifest: nothing is left behind."""
    from qvq_local.convert import to_gguf, to_mlx

    def fake_converter(src, out_dir, *args, **kwargs):
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True)
        (out_dir / "config.json").write_text("{}")
        (out_dir / "model.safetensors").write_bytes(b"\0" * 16)
        raise KeyboardInterrupt

    monkeypatch.setattr(to_mlx, "convert_to_mlx", fake_converter)
    monkeypatch.setattr(to_gguf, "convert_to_gguf", fake_converter)
    from qvq_local.convert.pipeline import convert

    with pytest.raises(KeyboardInterrupt):
        convert(tiny_checkpoint, to=fmt, progress=False)
    assert list((home / "models").iterdir()) == []
    assert hub.list_models() == []


def test_convert_hub_id_pulls_first(tiny_checkpoint, home, hub_server, monkeypatch, tmp_path):
    """A hub id source is downloaded into the shared cache (from the local test hub), then converted;
    the second time the cached download is reused with no network call."""
    hub_server.add("Qwen/Tiny-VL", {p.name: p for p in tiny_checkpoint.iterdir() if p.is_file()})
    seen: dict = {}

    def fake_converter(src, out_dir, *args, **kwargs):
        seen["src"] = Path(src)
        Path(out_dir).mkdir(parents=True)
        (Path(out_dir) / "config.json").write_text('{"quantization": {"bits": 4, "group_size": 64}}')
        (Path(out_dir) / "model.safetensors").write_bytes(b"\0" * 8)
        return Path(out_dir)

    resolved: list[str] = []
    real_resolve = hub.resolve

    def spy_resolve(ref, **kwargs):
        resolved.append(str(ref))
        return real_resolve(ref, **kwargs)

    monkeypatch.setattr(hub, "resolve", spy_resolve)
    monkeypatch.setattr("qvq_local.convert.to_mlx.convert_to_mlx", fake_converter)
    result = _invoke("convert", "Qwen/Tiny-VL", "--to", "mlx", "-q")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "hf-cache") in seen["src"].parents
    assert (seen["src"] / "config.json").read_bytes() == (tiny_checkpoint / "config.json").read_bytes()
    assert resolved == ["Qwen/Tiny-VL"]  # a hub id goes through the one resolver, not a copy of it
    out = home / "models" / "Tiny-VL-mlx-4bit"
    assert read_manifest(out)["source"] == "Qwen/Tiny-VL"
    # the second time the download is reused
    before = hub_server.count()
    result = _invoke("convert", "Qwen/Tiny-VL", "--to", "mlx", "-q", "-o", str(home / "other"))
    assert result.exit_code == 0 and hub_server.count() == before


def test_convert_refuses_a_quantised_hub_repo(home, hub_server, tiny_gguf_q4):
    hub_server.add("acme/Q", {"m-Q4_K_M.gguf": tiny_gguf_q4.model, "mmproj-m-f16.gguf": tiny_gguf_q4.mmproj})
    result = _invoke("convert", "acme/Q", "--to", "gguf", "-q")
    _one_line_error(result, 2, "already a quantised gguf model", "run it as it is")


def test_convert_refuses_a_converted_model_as_source(home, tmp_path):
    folder = tmp_path / "done"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    manifest = build_manifest(folder, source="x", format="mlx", quantization="4bit")
    write_manifest(folder, manifest)
    _one_line_error(_invoke("convert", str(folder), "--to", "gguf"), 2, "already a converted mlx model")


# ----------------------------------------------------------------------------- pull, models
def test_pull_command_bad_id_and_offline(home, monkeypatch):
    _one_line_error(_invoke("pull", "no-slash"), 3, "neither a hub id (owner/repo[:QUANT]) nor a short name")
    _one_line_error(_invoke("pull", "bad--owner/name"), 3, "not a valid hub id")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _one_line_error(
        _invoke("pull", "Qwen/QVQ-72B-Preview", "-q"), 3, "not in the Hugging Face cache", "HF_HUB_OFFLINE"
    )


def test_models_command_when_empty(home):
    result = _invoke("models")
    assert result.exit_code == 0 and "qvq convert" in result.output
    assert json.loads(_invoke("models", "--json").output) == []


def test_help_texts_teach_with_examples():
    for command in ("convert", "pull", "models"):
        result = _invoke(command, "--help")
        assert result.exit_code == 0 and "Examples" in result.output
