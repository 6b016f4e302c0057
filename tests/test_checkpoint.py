"""Checkpoint validation: both tensor namings, and every way a source folder can be broken.

Each broken folder must raise ``ModelError`` naming the offending file, and ``convert_to_gguf`` must fail
with it before writing anything.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import assert_error
from qvq_local.convert.checkpoint import open_checkpoint

from qvq_local.errors import ModelError


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _to_transformers5(src: Path, dst: Path) -> Path:
    """A copy of ``src`` with transformers 5's tensor names and a nested ``text_config``."""
    from qvq_local.formats.safetensors import ShardedCheckpoint, ShardedWriter

    dst.mkdir()
    for f in src.iterdir():
        if not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
            shutil.copy(f, dst / f.name)
    store = ShardedCheckpoint(src)
    with ShardedWriter(dst, max_shard_bytes=8 * 1024**2) as w:
        for name in store:
            new = name
            if name.startswith("model."):
                new = "model.language_model." + name[len("model.") :]
            elif name.startswith("visual."):
                new = "model." + name
            w.add(new, store.raw(name), dtype=store.dtype(name))
    store.close()
    cfg = json.loads((dst / "config.json").read_text())
    text_keys = [
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "rms_norm_eps",
        "rope_theta",
        "vocab_size",
        "rope_scaling",
    ]
    cfg["text_config"] = {k: cfg.pop(k) for k in text_keys}
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _assert_no_output(out: Path) -> None:
    assert not out.exists() or not any(out.iterdir()), f"files were written: {list(out.iterdir())}"


def _convert_fails(src: Path, tmp_path: Path, match: str) -> ModelError:
    from qvq_local.convert.to_gguf import convert_to_gguf

    out = tmp_path / "out"
    with pytest.raises(ModelError) as info:
        convert_to_gguf(src, out, quant="f16", mmproj_quant="f16")
    assert_error(info, match)
    _assert_no_output(out)
    return info.value


def test_original_tensor_name_maps_both_namings():
    from qvq_local.families import DEFAULT_FAMILY

    original_tensor_name = DEFAULT_FAMILY.original_tensor_name
    assert (
        original_tensor_name("model.language_model.layers.3.mlp.up_proj.weight")
        == "model.layers.3.mlp.up_proj.weight"
    )
    assert original_tensor_name("model.visual.blocks.0.attn.qkv.bias") == "visual.blocks.0.attn.qkv.bias"
    assert (
        original_tensor_name("model.layers.0.input_layernorm.weight")
        == "model.layers.0.input_layernorm.weight"
    )
    assert original_tensor_name("visual.merger.mlp.0.weight") == "visual.merger.mlp.0.weight"
    assert original_tensor_name("lm_head.weight") == "lm_head.weight"


def test_open_tiny_checkpoint(tiny_checkpoint):
    ckpt = open_checkpoint(tiny_checkpoint)
    assert ckpt.naming == "original"
    assert ckpt.text.hidden_size == 256 and ckpt.text.num_layers == 2 and ckpt.text.head_dim == 64
    assert ckpt.text.mrope_section == (8, 12, 12)
    assert ckpt.vision.embed_dim == 256 and ckpt.vision.merged_dim == 1024
    assert ckpt.vision.out_hidden_size == ckpt.text.hidden_size
    assert "model.embed_tokens.weight" in ckpt and "visual.patch_embed.proj.weight" in ckpt
    assert ckpt.shape("model.embed_tokens.weight") == (1280, 256)
    assert ckpt.total_bytes == sum(ckpt.nbytes(n) for n in ckpt.names) > 0
    assert ckpt.files["tokenizer.json"].is_file()
    # lazy reads: row blocks concatenate to the whole tensor
    whole = ckpt.read_f32("model.embed_tokens.weight")
    blocks = list(ckpt.iter_rows_f32("model.embed_tokens.weight", max_chunk_bytes=100 * 256 * 4))
    assert len(blocks) == 13 and all(b.shape[0] <= 100 for b in blocks)
    np.testing.assert_array_equal(np.concatenate(blocks), whole)
    ckpt.release()


def test_both_namings_load_to_the_same_names(tiny_checkpoint, tmp_path):
    renamed = _to_transformers5(tiny_checkpoint, tmp_path / "t5")
    a, b = open_checkpoint(tiny_checkpoint), open_checkpoint(renamed)
    assert b.naming == "transformers5"
    assert a.names == b.names
    assert (
        b.stored_name("model.layers.1.mlp.down_proj.weight")
        == "model.language_model.layers.1.mlp.down_proj.weight"
    )
    assert b.stored_name("visual.merger.ln_q.bias") == "model.visual.merger.ln_q.bias"
    assert b.stored_name("lm_head.weight") == "lm_head.weight"
    assert a.text == b.text and a.vision == b.vision
    for name in ("model.embed_tokens.weight", "visual.blocks.1.attn.qkv.weight", "lm_head.weight"):
        np.testing.assert_array_equal(a.read_f32(name), b.read_f32(name))


def test_bf16_checkpoint_reads_as_exact_f32(tiny_checkpoint, tiny_checkpoint_bf16):
    from qvq_local.formats.safetensors import f32_to_bf16_bits

    a, b = open_checkpoint(tiny_checkpoint), open_checkpoint(tiny_checkpoint_bf16)
    assert b.dtype("model.norm.weight") == "BF16"
    raw = b.read_raw("model.layers.0.mlp.up_proj.weight")
    assert raw.dtype == np.uint16
    # same seed: the bf16 checkpoint is the f32 one rounded to bf16
    np.testing.assert_array_equal(raw, f32_to_bf16_bits(a.read_f32("model.layers.0.mlp.up_proj.weight")))


def test_unsupported_architecture(tiny_checkpoint, tmp_path):
    bad = _copy(tiny_checkpoint, tmp_path / "llava")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["architectures"] = ["LlavaForConditionalGeneration"]
    cfg["model_type"] = "llava"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError) as info:
        open_checkpoint(bad)
    assert_error(info, "unsupported architecture LlavaForConditionalGeneration")
    assert "config.json" in str(info.value) and "Qwen2VLForConditionalGeneration" in str(info.value)
    _convert_fails(bad, tmp_path, "unsupported architecture")


def test_missing_shard(tiny_checkpoint, tmp_path):
    bad = _copy(tiny_checkpoint, tmp_path / "missing")
    shard = sorted(bad.glob("model-*.safetensors"))[1]
    shard.unlink()
    err = _convert_fails(bad, tmp_path, "missing shard")
    assert shard.name in str(err)


def test_truncated_shard(tiny_checkpoint, tmp_path):
    bad = _copy(tiny_checkpoint, tmp_path / "truncated")
    shard = max(bad.glob("model-*.safetensors"))
    size = shard.stat().st_size
    with open(shard, "r+b") as fh:
        fh.truncate(size - 1000)
    err = _convert_fails(bad, tmp_path, "truncated")
    assert shard.name in str(err)


def test_dimension_mismatch(tiny_checkpoint, tmp_path):
    bad = _copy(tiny_checkpoint, tmp_path / "dims")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["intermediate_size"] = 512  # the weights are 768 wide
    (bad / "config.json").write_text(json.dumps(cfg))
    err = _convert_fails(bad, tmp_path, r"has shape \[\d+, \d+\] but config.json implies")
    assert ".safetensors" in str(err) and "768" in str(err) and "512" in str(err)


def test_embedding_rows_must_match_vocab_size(tiny_checkpoint, tmp_path):
    bad = _copy(tiny_checkpoint, tmp_path / "vocab")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["vocab_size"] = 1024
    (bad / "config.json").write_text(json.dumps(cfg))
    _convert_fails(bad, tmp_path, r"has shape \[1280, 256\] but config.json implies \[1024, 256\]")


def test_merger_width_must_equal_text_hidden(tiny_checkpoint, tmp_path):
    bad = _copy(tiny_checkpoint, tmp_path / "merger")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["vision_config"]["hidden_size"] = 512
    (bad / "config.json").write_text(json.dumps(cfg))
    _convert_fails(bad, tmp_path, "must equal the text hidden_size")


def test_pickle_only_folder_is_refused_unopened(tiny_checkpoint, tmp_path):
    bad = tmp_path / "pickle"
    bad.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_checkpoint / name, bad / name)
    # A file that would fail loudly if anything tried to unpickle it.
    (bad / "pytorch_model.bin").write_bytes(b"\x80\x04this is not a pickle and must never be opened")
    err = _convert_fails(bad, tmp_path, "only pickle weights")
    assert "pytorch_model.bin" in str(err)


def test_no_weights_at_all(tiny_checkpoint, tmp_path):
    bad = tmp_path / "empty"
    bad.mkdir()
    shutil.copy(tiny_checkpoint / "config.json", bad / "config.json")
    _convert_fails(bad, tmp_path, "no safetensors weights")


def test_not_a_checkpoint_folder(tmp_path):
    with pytest.raises(ModelError) as raised:
        open_checkpoint(tmp_path)
    assert_error(raised, "no config.json")
    with pytest.raises(ModelError) as raised:
        open_checkpoint(tmp_path / "nope")
    assert_error(raised, "no such folder")
