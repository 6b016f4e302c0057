"""`qvq convert`'s manifest names the quantisation of the files it wrote, for every quantisation offered.

`qvq models`, `qvq ask --json` and every Result report the manifest's ``quantization``, so a manifest
that says Q8_0 beside a Q4_K_M file misleads the user everywhere.  The truth is read back from the
files themselves: a GGUF's ``general.file_type`` (gguf-py's reader, named by gguf-py's own
``LlamaFileType``) and its file name; an MLX folder's config.json (bits and group size) or, unquantised,
its weights' dtype.  The offered quantisations come from the converter's constants, so a newly offered
one is covered here by itself.  Each is converted once (module-scoped fixtures) from the tiny synthetic
checkpoint through the real Typer app.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from qvq_local.convert.quants import GGUF_QUANTS, MLX_BITS, MLX_GROUP_SIZES, MMPROJ_QUANTS
from typer.testing import CliRunner

from qvq_local import hub
from qvq_local.cli import app
from qvq_local.formats.manifest import MANIFEST_NAME

pytestmark = pytest.mark.slow

runner = CliRunner()

#: Every text-model quantisation with a projector type beside it, cycling through the projector types
#: so that each of those is written once too (no conversion more than the longer list needs).
GGUF_CASES = [
    (GGUF_QUANTS[i % len(GGUF_QUANTS)], MMPROJ_QUANTS[i % len(MMPROJ_QUANTS)])
    for i in range(max(len(GGUF_QUANTS), len(MMPROJ_QUANTS)))
]
#: Every --bits with every --group-size, and --bits none (the source dtype kept).
MLX_CASES = [(str(bits), size) for bits in MLX_BITS for size in MLX_GROUP_SIZES] + [("none", None)]


def _convert(tiny_checkpoint: Path, out: Path, *options: str) -> Path:
    result = runner.invoke(app, ["convert", str(tiny_checkpoint), *options, "-o", str(out), "-q"])
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1] == str(out)
    return out


def _manifest(folder: Path) -> dict:
    """The manifest as written (not through qvq_local.formats.manifest.read_manifest, which normalises old spellings)."""
    return json.loads((folder / MANIFEST_NAME).read_text())


def _gguf_file_type(path: Path) -> str:
    """The file's ``general.file_type`` as llama.cpp names it ("Q4_K_M", "F16"), from gguf-py alone."""
    from gguf import GGUFReader, LlamaFileType

    value = GGUFReader(path).fields["general.file_type"].contents()
    return re.sub(r"^(ALL|MOSTLY)_", "", LlamaFileType(value).name)


def _named(path: Path) -> str:
    """The quantisation in a GGUF file's name: ``<stem>-<QUANT>.gguf``."""
    match = re.fullmatch(r".+-([A-Za-z0-9_]+)\.gguf", path.name)
    assert match, f"no quantisation in the file name {path.name}"
    return match.group(1)


# ----------------------------------------------------------------------------------------------- GGUF
@pytest.fixture(scope="module", params=GGUF_CASES, ids=[f"{q}-mmproj-{m}" for q, m in GGUF_CASES])
def gguf_conversion(request, tiny_checkpoint, tmp_path_factory) -> tuple[str, str, Path]:
    quant, mmproj_quant = request.param
    out = tmp_path_factory.mktemp("manifest-gguf") / f"tiny-{quant}"
    _convert(tiny_checkpoint, out, "--to", "gguf", "--quant", quant, "--mmproj-quant", mmproj_quant)
    return quant, mmproj_quant, out


@pytest.mark.llama
def test_gguf_manifest_quantization_is_the_model_files_own(gguf_conversion):
    quant, _, out = gguf_conversion
    manifest = _manifest(out)
    models_written = [p for p in out.glob("*.gguf") if not p.name.startswith("mmproj-")]
    assert [p.name for p in models_written] == [manifest["model"]]
    model = models_written[0]
    in_header = _gguf_file_type(model)
    assert in_header == quant.upper()  # what --quant asked for
    assert _named(model) == in_header
    assert manifest["quantization"] == in_header, (
        f"the manifest says {manifest['quantization']} but {model.name} is {in_header} (general.file_type)"
    )
    # what `qvq models` lists and every Result reports for this model
    assert hub.resolve(out).quantization == in_header


@pytest.mark.llama
def test_gguf_manifest_mmproj_quant_is_the_projector_files_own(gguf_conversion):
    _, mmproj_quant, out = gguf_conversion
    manifest = _manifest(out)
    projectors = list(out.glob("mmproj-*.gguf"))
    assert [p.name for p in projectors] == [manifest["mmproj"]]
    in_header = _gguf_file_type(projectors[0])
    assert in_header == mmproj_quant.upper() == _named(projectors[0])
    assert manifest["mmproj_quant"].upper() == in_header


# ------------------------------------------------------------------------------------------------ MLX
@pytest.fixture(scope="module", params=MLX_CASES, ids=[f"bits{b}-g{g}" for b, g in MLX_CASES])
def mlx_conversion(request, tiny_checkpoint, tmp_path_factory) -> tuple[str, int | None, Path]:
    pytest.importorskip("mlx_vlm")
    bits, group_size = request.param
    out = tmp_path_factory.mktemp("manifest-mlx") / f"tiny-{bits}-{group_size}"
    options = ["--to", "mlx", "--bits", bits]
    if group_size is not None:
        options += ["--group-size", str(group_size)]
    _convert(tiny_checkpoint, out, *options)
    return bits, group_size, out


@pytest.mark.mlx
def test_mlx_manifest_quantization_is_the_converted_folders_own(mlx_conversion):
    bits, group_size, out = mlx_conversion
    manifest = _manifest(out)
    config = json.loads((out / "config.json").read_text())
    if bits == "none":
        from qvq_local.formats.safetensors import ShardedCheckpoint

        weights = ShardedCheckpoint(out)
        try:
            dtypes = {weights.dtype(name) for name in weights}
        finally:
            weights.close()
        assert "quantization" not in config and len(dtypes) == 1
        in_folder = dtypes.pop()  # safetensors spells dtypes as llama.cpp does: F32, BF16, F16
        assert (manifest["bits"], manifest["group_size"]) == (None, None)
    else:
        in_config = (config["quantization"]["bits"], config["quantization"]["group_size"])
        assert in_config == (int(bits), group_size)  # what --bits and --group-size asked for
        in_folder = "{}bit-g{}".format(*in_config)
        assert (manifest["bits"], manifest["group_size"]) == in_config
    assert manifest["quantization"] == in_folder, (
        f"the manifest says {manifest['quantization']} but the converted folder is {in_folder}"
    )
    # what `qvq models` lists and every Result reports for this model
    assert hub.resolve(out).quantization == in_folder
