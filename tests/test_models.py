"""Model references: files, folders, cache names, hub ids; manifests; pull without the network."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import assert_error

from qvq_local import hub, models
from qvq_local.errors import ModelError
from qvq_local.formats.manifest import (
    MANIFEST_NAME,
    build_manifest,
    normalize_quantization,
    read_manifest,
    write_manifest,
)


@pytest.fixture()
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("QVQ_HOME", str(tmp_path / "qvq-home"))
    return tmp_path / "qvq-home"


def _hf_folder(folder: Path, *, mlx_meta: bool = False, quantization: dict | None = None) -> Path:
    """A folder with a config and a (header-only, empty) safetensors file: enough for resolve()."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["Qwen2VLForConditionalGeneration"],
        "model_type": "qwen2_vl",
        "torch_dtype": "bfloat16",
    }
    if quantization:
        config["quantization"] = quantization
    (folder / "config.json").write_text(json.dumps(config))
    header = {"__metadata__": {"format": "mlx"}} if mlx_meta else {}
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    (folder / "model.safetensors").write_bytes(len(blob).to_bytes(8, "little") + blob)
    return folder


def _gguf_pair(folder: Path, model="model-q4_k_m.gguf", mmproj="mmproj-model-f16.gguf") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / model).write_bytes(b"GGUF" + b"\0" * 60)
    if mmproj:
        (folder / mmproj).write_bytes(b"GGUF" + b"\0" * 28)
    return folder / model


# ----------------------------------------------------------------------------- places and ids
def test_qvq_home_from_environment(home):
    assert models.models_dir() == home / "models"
    assert models.hub_folder("Qwen/QVQ-72B-Preview") == home / "hub" / "Qwen--QVQ-72B-Preview"


@pytest.mark.parametrize("ref", ["Qwen/QVQ-72B-Preview", "a/b", "org.x/model_1.5-b"])
def test_valid_hub_ids(ref):
    assert models.is_hub_id(ref)


@pytest.mark.parametrize("ref", ["Qwen", "a/b/c", "-a/b", "a/b-", "a--b/c", "a/..b", "a b/c", "a/", "/b"])
def test_bad_hub_ids_are_refused_before_any_network(ref, monkeypatch):
    def no_network(*a, **k):  # pragma: no cover - must not be reached
        raise AssertionError("network touched")

    monkeypatch.setattr("huggingface_hub.snapshot_download", no_network)
    monkeypatch.setattr("huggingface_hub.HfApi.list_repo_files", no_network)
    with pytest.raises(ModelError):
        hub.pull(ref, progress=False)


# ----------------------------------------------------------------------------- manifest
def test_manifest_written_atomically_and_read_back(tmp_path):
    folder = _hf_folder(tmp_path / "m")
    data = build_manifest(
        folder, source="Qwen/QVQ-72B-Preview", format="mlx", quantization="4bit-g64", extra={"bits": 4}
    )
    path = write_manifest(folder, data)
    assert path.name == MANIFEST_NAME
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]  # no temporary left
    back = read_manifest(folder)
    assert back == data
    assert back["files"] == {
        "config.json": (folder / "config.json").stat().st_size,
        "model.safetensors": (folder / "model.safetensors").stat().st_size,
    }
    assert back["total_bytes"] == sum(back["files"].values())
    assert back["tool"] == "qvq-local" and back["tool_version"] and back["created"]
    assert read_manifest(folder / "config.json") == data  # a file's folder manifest


def test_unreadable_manifest_is_a_model_error(tmp_path):
    folder = _hf_folder(tmp_path / "m")
    (folder / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(ModelError) as raised:
        read_manifest(folder)
    assert_error(raised, "manifest")
    (folder / MANIFEST_NAME).write_text('{"format": "onnx"}')
    with pytest.raises(ModelError) as raised:
        hub.resolve(folder)
    assert_error(raised, "format")


# ----------------------------------------------------------------------------- resolve
def test_resolve_gguf_file_finds_sibling_mmproj(tmp_path):
    model = _gguf_pair(tmp_path / "g")
    got = hub.resolve(model)
    assert got.format == "gguf" and got.path == model
    assert got.mmproj == tmp_path / "g" / "mmproj-model-f16.gguf"
    assert got.quantization == "Q4_K_M"


def test_resolve_gguf_folder_uses_manifest(tmp_path):
    model = _gguf_pair(tmp_path / "g", model="a.gguf", mmproj="mmproj-b.gguf")
    (tmp_path / "g" / "mmproj-other.gguf").write_bytes(b"GGUF")  # would be ambiguous without the manifest
    write_manifest(
        tmp_path / "g",
        build_manifest(
            tmp_path / "g",
            source="x",
            format="gguf",
            quantization="q8_0",
            model_file="a.gguf",
            mmproj_file="mmproj-b.gguf",
        ),
    )
    got = hub.resolve(tmp_path / "g")
    assert (got.path, got.mmproj, got.quantization) == (model, tmp_path / "g" / "mmproj-b.gguf", "Q8_0")


def test_resolve_gguf_without_mmproj_fails(tmp_path):
    model = _gguf_pair(tmp_path / "g", mmproj=None)
    with pytest.raises(ModelError) as raised:
        hub.resolve(model)
    assert_error(raised, "mmproj")
    with pytest.raises(ModelError) as raised:
        hub.resolve(tmp_path / "g")
    assert_error(raised, "mmproj")


def test_resolve_mmproj_file_itself_is_refused(tmp_path):
    _gguf_pair(tmp_path / "g")
    with pytest.raises(ModelError) as raised:
        hub.resolve(tmp_path / "g" / "mmproj-model-f16.gguf")
    assert_error(raised, "projector")


def test_resolve_mlx_and_hf_folders(tmp_path):
    mlx_q = _hf_folder(tmp_path / "mlx-q", quantization={"bits": 4, "group_size": 64})
    mlx_f = _hf_folder(tmp_path / "mlx-f", mlx_meta=True)
    hf = _hf_folder(tmp_path / "hf")
    assert hub.resolve(mlx_q).format == "mlx"
    assert hub.resolve(mlx_q).quantization == "4bit-g64"
    assert hub.resolve(mlx_f).format == "mlx"
    got = hub.resolve(hf)
    assert (got.format, got.quantization, got.mmproj) == ("hf", "BF16", None)


def test_resolve_folder_without_weights_fails(tmp_path):
    folder = tmp_path / "x"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "pytorch_model.bin").write_bytes(b"\0")
    with pytest.raises(ModelError) as raised:
        hub.resolve(folder)
    assert_error(raised, "safetensors")
    with pytest.raises(ModelError) as raised:
        hub.resolve(tmp_path)
    assert_error(raised, "config.json")


def test_resolve_name_under_qvq_home(home):
    _hf_folder(home / "models" / "tiny-mlx-4bit", quantization={"bits": 4, "group_size": 64})
    got = hub.resolve("tiny-mlx-4bit")
    assert got.name == "tiny-mlx-4bit" and got.format == "mlx"
    assert got.path == home / "models" / "tiny-mlx-4bit"


def test_unknown_name_and_missing_path_fail(home):
    with pytest.raises(ModelError) as raised:
        hub.resolve("no-such-model")
    assert_error(raised, "unknown model")
    with pytest.raises(ModelError) as raised:
        hub.resolve("./nowhere/model.gguf")
    assert_error(raised, "no such file")
    with pytest.raises(ModelError) as raised:
        hub.resolve("  ")
    assert_error(raised, "empty")


def test_bad_hub_id_fails_without_network(home, monkeypatch):
    monkeypatch.setattr(hub, "pull", lambda *a, **k: pytest.fail("pull called"))
    with pytest.raises(ModelError) as raised:
        hub.resolve("bad--owner/name")
    assert_error(raised, "not a valid hub id")


# pulls over HTTP (GGUF, MLX and full repos, errors, resume, offline): tests/test_hub.py


# ----------------------------------------------------------------------------- list
def test_list_models_rows(home):
    folder = _hf_folder(home / "models" / "tiny-mlx-4bit", quantization={"bits": 4, "group_size": 64})
    write_manifest(folder, build_manifest(folder, source="/src/tiny", format="mlx", quantization="4bit-g64"))
    _gguf_pair(home / "models" / "tiny-gguf-q4_k_m")
    (home / "models" / ".tiny-gguf-f16.partial-1-abc").mkdir()  # an unfinished conversion: hidden
    (home / "models" / "junk").mkdir()  # not a model: skipped
    (home / "hub" / "Qwen--Half").mkdir(parents=True)  # a download without manifest: unfinished
    rows = hub.list_models()
    assert [r["name"] for r in rows] == ["tiny-gguf-q4_k_m", "tiny-mlx-4bit"]
    gguf, mlx = rows
    assert (gguf["format"], gguf["quantization"], gguf["size"]) == ("gguf", "Q4_K_M", 64 + 32)
    assert (mlx["format"], mlx["quantization"], mlx["source"]) == ("mlx", "4bit-g64", "/src/tiny")
    assert mlx["size"] == read_manifest(folder)["total_bytes"]


@pytest.mark.parametrize(
    "written, shown",
    [
        ("q4_k_m", "Q4_K_M"),
        ("Q4_K_M", "Q4_K_M"),
        ("q8_0", "Q8_0"),
        ("iq4_xs", "IQ4_XS"),
        ("f16", "F16"),
        ("bfloat16", "BF16"),
        ("4bit-g64", "4bit-g64"),
        ("4BIT-G64", "4bit-g64"),
        ("", "?"),
    ],
)
def test_one_normalised_quantization_spelling(written, shown, tmp_path):
    """Old manifests (key ``quantisation``, lower-case GGUF names) read as the one spelling and format."""
    assert normalize_quantization(written) == shown
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / MANIFEST_NAME).write_text(json.dumps({"format": "gguf", "quantisation": written}))
    data = read_manifest(folder)
    assert "quantisation" not in data
    assert data.get("quantization", "?") == shown
    new = build_manifest(folder, source="x", format="gguf", quantization=written)
    assert "quantisation" not in new and new["quantization"] == shown
