"""`qvq doctor --model REF` runs the integrity checks: a complete model passes (exit 0, ok findings); a
missing shard, a truncated GGUF or a projector from a model of another width fails (exit 3) with a line
naming the file and the problem, in the human report and in ``--json``."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qvq_local.cli import app

runner = CliRunner()


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("QVQ_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("QVQ_MODEL", raising=False)
    monkeypatch.delenv("QVQ_BACKEND", raising=False)


def _doctor(ref: Path | str, *extra: str):
    return runner.invoke(app, ["doctor", "--model", str(ref), *extra])


def _gguf_copy(pair, tmp_path: Path) -> Path:
    folder = tmp_path / "gguf"
    folder.mkdir()
    shutil.copy(pair.model, folder)
    shutil.copy(pair.mmproj, folder)
    return folder


def _finding_lines(stdout: str, level: str) -> list[str]:
    return [ln.strip() for ln in stdout.splitlines() if ln.strip().startswith(f"{level} ")]


def test_complete_checkpoint_passes(tiny_checkpoint):
    result = _doctor(tiny_checkpoint)
    assert result.exit_code == 0, result.output
    assert _finding_lines(result.stdout, "ok"), result.stdout
    assert not _finding_lines(result.stdout, "error"), result.stdout
    data = json.loads(_doctor(tiny_checkpoint, "--json").stdout)
    assert data["integrity_errors"] == 0
    assert {f["level"] for f in data["integrity"]} == {"ok"}
    assert all(set(f) == {"level", "path", "message"} for f in data["integrity"])


def test_complete_gguf_pair_passes(tiny_gguf_f32):
    result = _doctor(tiny_gguf_f32.model, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    ok_paths = {Path(f["path"]).name for f in data["integrity"] if f["level"] == "ok"}
    assert {Path(tiny_gguf_f32.model).name, Path(tiny_gguf_f32.mmproj).name} <= ok_paths, data["integrity"]


def test_missing_shard_fails_naming_the_shard(tiny_checkpoint, tmp_path):
    folder = tmp_path / "partial"
    shutil.copytree(tiny_checkpoint, folder)
    (folder / "model-00003-of-00004.safetensors").unlink()
    result = _doctor(folder)
    assert result.exit_code == 3, result.output
    errors = _finding_lines(result.stdout, "error")
    shard = "model-00003-of-00004.safetensors"
    assert any(shard in ln and "missing shard" in ln for ln in errors), result.stdout
    stderr = result.stderr.strip().splitlines()
    assert len(stderr) == 1 and stderr[0].startswith("error: ") and "model-00003-of-00004" in stderr[0]
    data = json.loads(_doctor(folder, "--json").stdout)
    assert data["integrity_errors"] >= 1
    assert any(
        f["level"] == "error" and f["path"].endswith("model-00003-of-00004.safetensors")
        for f in data["integrity"]
    ), data["integrity"]


def test_truncated_gguf_fails_naming_the_file(tiny_gguf_f32, tmp_path):
    folder = _gguf_copy(tiny_gguf_f32, tmp_path)
    model = folder / Path(tiny_gguf_f32.model).name
    size = model.stat().st_size
    with open(model, "r+b") as fh:
        fh.truncate(size - size // 3)
    result = _doctor(model)
    assert result.exit_code == 3, result.output
    errors = _finding_lines(result.stdout, "error")
    assert any(model.name in ln and "truncated" in ln for ln in errors), result.stdout
    assert "Traceback" not in result.output


def test_mmproj_of_another_width_fails_naming_both_widths(tiny_gguf_f32, tmp_path):
    import numpy as np
    from gguf import GGUFWriter

    folder = tmp_path / "mismatch"
    folder.mkdir()
    shutil.copy(tiny_gguf_f32.model, folder)
    writer = GGUFWriter(str(folder / "mmproj-other.gguf"), "clip")
    writer.add_string("clip.projector_type", "qwen2vl_merger")
    writer.add_uint32("clip.vision.projection_dim", 512)
    writer.add_tensor("mm.2.weight", np.zeros((512, 64), dtype=np.float32))
    writer.add_tensor("mm.2.bias", np.zeros(512, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    result = _doctor(folder)
    assert result.exit_code == 3, result.output
    errors = _finding_lines(result.stdout, "error")
    named = [ln for ln in errors if "mmproj-other.gguf" in ln]
    assert any("width 512" in ln and "256 wide" in ln for ln in named), result.stdout
    data = json.loads(_doctor(folder, "--json").stdout)
    assert [Path(f["path"]).name for f in data["integrity"] if f["level"] == "error"] == ["mmproj-other.gguf"]


def test_unknown_model_is_a_one_line_problem():
    result = _doctor("no-such-model-anywhere")
    assert result.exit_code == 3, result.output
    assert "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------- the GGUF header reader behind the checks


def test_gguf_header_matches_gguf_reader(tiny_gguf_q4, tiny_gguf_f32):
    """Tensor offsets, byte sizes and shapes, and the short fields, agree with gguf-py's GGUFReader."""
    import warnings

    from gguf import GGUFReader

    from qvq_local.formats.gguf import GGUF_SMALL_ARRAY, read_gguf_header

    for path in (tiny_gguf_q4.model, tiny_gguf_q4.mmproj, tiny_gguf_f32.model):
        header = read_gguf_header(path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reader = GGUFReader(str(path))
        assert len(header.tensors) == len(reader.tensors) == header.n_tensors
        for t in reader.tensors:
            mine = header.tensors[t.name]
            assert (mine.offset, mine.n_bytes, list(mine.shape)) == (
                int(t.data_offset),
                int(t.n_bytes),
                [int(x) for x in t.shape],
            ), t.name
        assert header.data_end() == Path(path).stat().st_size
        for key, field in reader.fields.items():
            if key.startswith("GGUF."):
                continue
            if len(field.data) > GGUF_SMALL_ARRAY:
                assert key not in header.fields, key  # the vocabulary is stepped over, not materialised
            else:
                want = field.contents()
                got = header.fields[key]
                assert got == pytest.approx(want) if isinstance(want, float) else got == want, key


def _gguf_with_long_arrays(path: Path) -> Path:
    import numpy as np
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), "qwen2vl")
    writer.add_array("tokenizer.ggml.tokens", [f"tok{i}" for i in range(1000)])
    writer.add_array("tokenizer.ggml.token_type", list(range(1000)))
    writer.add_array("clip.vision.image_mean", [0.5, 0.25, 0.125])
    writer.add_array("small.strings", ["a", "bc"])
    writer.add_uint32("qwen2vl.embedding_length", 64)
    writer.add_tensor("a.weight", np.ones((3, 5), dtype=np.float32))
    writer.add_tensor("b.weight", np.ones((7,), dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_header_steps_over_long_arrays_and_finds_cuts(tmp_path):
    from qvq_local.formats.gguf import GgufHeaderError, read_gguf_header
    from qvq_local.integrity import check_gguf_file

    path = _gguf_with_long_arrays(tmp_path / "arrays.gguf")
    header = read_gguf_header(path)
    assert "tokenizer.ggml.tokens" not in header.fields and "tokenizer.ggml.token_type" not in header.fields
    assert header.fields["clip.vision.image_mean"] == [0.5, 0.25, 0.125]
    assert header.fields["small.strings"] == ["a", "bc"]
    assert header.fields["qwen2vl.embedding_length"] == 64  # a key after the long arrays is still read
    assert header.tensors["a.weight"].shape == (5, 3) and header.tensors["a.weight"].n_bytes == 60
    assert header.tensors["b.weight"].n_bytes == 14
    assert [f.level for f in check_gguf_file(path)] == ["ok"]
    early = read_gguf_header(path, wanted={"general.architecture"}, tensors=False)
    assert early.fields == {"general.architecture": "qwen2vl"} and early.tensors == {}

    data = path.read_bytes()
    cut_in_vocab = tmp_path / "cut-vocab.gguf"
    cut_in_vocab.write_bytes(data[:2000])  # inside the 1000-string array
    with pytest.raises(GgufHeaderError, match="truncated"):
        read_gguf_header(cut_in_vocab)
    cut_late_in_vocab = tmp_path / "cut-vocab-late.gguf"
    cut_late_in_vocab.write_bytes(data[:9000])
    with pytest.raises(GgufHeaderError, match="header ends early"):
        read_gguf_header(cut_late_in_vocab)
    cut_in_data = tmp_path / "cut-data.gguf"
    last = header.tensors["b.weight"]
    # the last tensor's bytes run past the end of the file
    cut_in_data.write_bytes(data[: last.offset + last.n_bytes - 4])
    (finding,) = check_gguf_file(cut_in_data)
    assert finding.level == "error" and finding.path == str(cut_in_data)
    assert finding.message.startswith("truncated: tensor data needs")

    tokens_at = data.index(b"tokenizer.ggml.tokens") + len(b"tokenizer.ggml.tokens") + 4 + 4 + 8
    lying = bytearray(data)
    lying[tokens_at : tokens_at + 8] = struct.pack("<Q", 1 << 40)  # first string "longer" than the file
    bad = tmp_path / "lying.gguf"
    bad.write_bytes(bytes(lying))
    (finding,) = check_gguf_file(bad)
    assert finding.level == "error" and "impossible string length" in finding.message


def test_gguf_tensor_sizes_come_from_ggufs_own_table():
    """Every ggml type gguf-py knows is sized by its GGML_QUANT_SIZES (no second, hand-written table)."""
    from gguf.constants import GGML_QUANT_SIZES

    from qvq_local.formats.gguf import _tensor_bytes

    for qtype, (block, type_size) in GGML_QUANT_SIZES.items():
        assert _tensor_bytes((block * 3, 2), int(qtype)) == 6 * type_size, qtype.name
    assert _tensor_bytes((32,), 9999) is None  # a type from a newer ggml: left unsized, not guessed
