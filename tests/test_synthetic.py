"""Synthetic QVQ-layout checkpoints (convert/synthetic.py, convert/tokenizer_synth.py, `qvq synth`).

The published numbers below are typed in from the model repositories' config.json files
(Qwen/Qwen2-VL-2B-Instruct, Qwen/Qwen2-VL-7B-Instruct, Qwen/QVQ-72B-Preview) and model cards; they are not
derived from our code.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
from helpers import assert_error
from qvq_local.convert import synthetic
from qvq_local.convert.synthetic import build_config, write_checkpoint

from qvq_local.errors import DiskFull, InputError
from qvq_local.families import DEFAULT_FAMILY
from qvq_local.families.qwen2vl import SynthShape
from qvq_local.formats.safetensors import ShardedCheckpoint, bf16_bits_to_f32, f32_to_bf16_bits

PUBLISHED = {
    "2b": {
        "hidden_size": 1536,
        "intermediate_size": 8960,
        "num_hidden_layers": 28,
        "num_attention_heads": 12,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
        "vision_hidden_size": 1536,
        "max_position_embeddings": 32768,
        "params_b": 2.21,
    },
    "7b": {
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "vocab_size": 152064,
        "tie_word_embeddings": False,
        "vision_hidden_size": 3584,
        "max_position_embeddings": 32768,
        "params_b": 8.29,
    },
    "72b": {
        "hidden_size": 8192,
        "intermediate_size": 29568,
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "vocab_size": 152064,
        "tie_word_embeddings": False,
        "vision_hidden_size": 8192,
        "params_b": 73.4,
    },
}
QWEN_IDS = {
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "vision_token_id": 151654,
    "image_token_id": 151655,
    "video_token_id": 151656,
}
SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
EXPECTED_FILES = {
    "config.json",
    "generation_config.json",
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "chat_template.json",
    "model.safetensors.index.json",
}


def _hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


# ------------------------------------------------------------------------------------------ configs
@pytest.mark.parametrize("shape", ["2b", "7b", "72b"])
def test_configs_match_published_dimensions(shape):
    cfg = build_config(shape)
    pub = PUBLISHED[shape]
    for key in (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "vocab_size",
        "tie_word_embeddings",
    ):
        assert cfg[key] == pub[key], key
    if "max_position_embeddings" in pub:
        assert cfg["max_position_embeddings"] == pub["max_position_embeddings"]
    assert cfg["architectures"] == ["Qwen2VLForConditionalGeneration"] and cfg["model_type"] == "qwen2_vl"
    assert cfg["rope_scaling"] == {"type": "mrope", "mrope_section": [16, 24, 24]}
    assert cfg["rope_theta"] == 1000000.0 and cfg["rms_norm_eps"] == 1e-6 and cfg["hidden_act"] == "silu"
    for key, value in QWEN_IDS.items():
        assert cfg[key] == value, key
    vc = cfg["vision_config"]
    assert "model_type" not in vc  # mlx-vlm rejects anything but its default
    assert vc == {
        "depth": 32,
        "embed_dim": 1280,
        "mlp_ratio": 4,
        "num_heads": 16,
        "in_chans": 3,
        "hidden_size": pub["vision_hidden_size"],
        "patch_size": 14,
        "spatial_merge_size": 2,
        "spatial_patch_size": 14,
        "temporal_patch_size": 2,
    }
    # The tensor list reproduces the published parameter count (to the reported precision).
    assert round(synthetic.parameter_count(shape) / 1e9, 2 if shape != "72b" else 1) == pub["params_b"]


def test_tensor_names_are_the_original_qwen2_vl_ones():
    names = {s.name for s in synthetic.tensor_specs("2b")}
    assert "lm_head.weight" not in names  # tied, like the real 2B
    names7 = {s.name: s.shape for s in synthetic.tensor_specs("7b")}
    assert names7["lm_head.weight"] == (152064, 3584)
    assert names7["model.embed_tokens.weight"] == (152064, 3584)
    assert names7["model.layers.27.self_attn.q_proj.bias"] == (3584,)
    assert names7["model.layers.0.self_attn.k_proj.weight"] == (512, 3584)
    assert "model.layers.0.self_attn.o_proj.bias" not in names7
    assert names7["model.layers.3.mlp.down_proj.weight"] == (3584, 18944)
    assert names7["visual.patch_embed.proj.weight"] == (1280, 3, 2, 14, 14)
    assert "visual.patch_embed.proj.bias" not in names7
    assert names7["visual.blocks.31.attn.qkv.weight"] == (3840, 1280)
    assert names7["visual.blocks.0.mlp.fc1.bias"] == (5120,)
    assert names7["visual.merger.mlp.0.weight"] == (5120, 5120)
    assert names7["visual.merger.mlp.2.weight"] == (3584, 5120)
    assert names7["visual.merger.ln_q.bias"] == (1280,)
    assert not any(n.startswith("model.language_model") for n in names7)


def test_tiny_shape_widths_are_k_quant_friendly():
    s = DEFAULT_FAMILY.synth_shapes["tiny"]
    for spec in synthetic.tensor_specs("tiny"):
        if (spec.name.startswith("model.") or spec.name == "lm_head.weight") and len(spec.shape) == 2:
            assert spec.shape[1] % 256 == 0, spec.name
    assert s.vocab_size % 256 == 0 and s.intermediate_size % 256 == 0 and s.hidden_size % 256 == 0
    assert sum(s.mrope_section) * 2 == s.head_dim
    assert s.vision_hidden_size == s.hidden_size
    assert synthetic.checkpoint_bytes("tiny", "bf16") < 16 * 1024**2


def test_generation_and_preprocessor_configs_are_qvqs():
    gen = synthetic.build_generation_config("72b")
    # QVQ's layout, but sampling values unlike every fallback value, so backend tests can see them used
    assert {k: gen[k] for k in DEFAULT_FAMILY.sampling} == synthetic.SYNTH_SAMPLING
    assert all(gen[k] != v for k, v in DEFAULT_FAMILY.sampling.items())
    assert gen["top_k"] > 1 and gen["temperature"] > 0 and gen["do_sample"] is True
    assert gen["bos_token_id"] == 151643 and gen["pad_token_id"] == 151643
    assert gen["eos_token_id"] == [151645, 151643]
    pre = synthetic.build_preprocessor_config("72b")
    assert pre["min_pixels"] == 3136 and pre["max_pixels"] == 12845056
    assert pre["patch_size"] == 14 and pre["temporal_patch_size"] == 2 and pre["merge_size"] == 2
    assert pre["image_mean"] == [0.48145466, 0.4578275, 0.40821073]
    assert pre["image_std"] == [0.26862954, 0.26130258, 0.27577711]
    assert pre["image_processor_type"] == "Qwen2VLImageProcessor"


def test_invalid_shape_and_dtype_name_the_choices(tmp_path):
    with pytest.raises(InputError) as raised:
        write_checkpoint(tmp_path / "x", shape="3b")
    assert_error(raised, "tiny, 2b, 7b, 72b")
    with pytest.raises(InputError) as raised:
        write_checkpoint(tmp_path / "x", dtype="f16")
    assert_error(raised, "bf16, f32")
    assert not (tmp_path / "x").exists()


# -------------------------------------------------------------------------------------- the tiny checkpoint
def test_tiny_checkpoint_layout(tiny_checkpoint):
    names = {p.name for p in tiny_checkpoint.iterdir()}
    assert names >= EXPECTED_FILES
    shards = sorted(n for n in names if n.endswith(".safetensors"))
    assert len(shards) >= 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not any(n.startswith(".") for n in names)

    ckpt = ShardedCheckpoint(tiny_checkpoint)
    specs = synthetic.tensor_specs("tiny")
    assert sorted(ckpt.keys()) == sorted(s.name for s in specs)
    for spec in specs:
        assert ckpt.shape(spec.name) == spec.shape
        assert ckpt.dtype(spec.name) == "F32"
    cfg = json.loads((tiny_checkpoint / "config.json").read_text())
    assert cfg == build_config("tiny", "f32")


def test_tiny_tokenizer_ids_match_config(tiny_checkpoint):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tiny_checkpoint / "tokenizer.json"))
    cfg = json.loads((tiny_checkpoint / "config.json").read_text())
    base = tok.token_to_id("<|endoftext|>")
    assert [tok.token_to_id(t) for t in SPECIALS] == list(range(base, base + 14))
    assert cfg["bos_token_id"] == base
    assert cfg["eos_token_id"] == tok.token_to_id("<|im_end|>")
    assert cfg["image_token_id"] == tok.token_to_id("<|image_pad|>")
    assert cfg["video_token_id"] == tok.token_to_id("<|video_pad|>")
    assert cfg["vision_start_token_id"] == tok.token_to_id("<|vision_start|>")
    assert cfg["vision_end_token_id"] == tok.token_to_id("<|vision_end|>")
    assert cfg["vision_token_id"] == tok.token_to_id("<|vision_pad|>")
    assert tok.get_vocab_size() <= cfg["vocab_size"]  # embedding rows may outnumber tokens
    # byte-level BPE: any text round-trips, specials stay single tokens
    text = "<|im_start|>user\nHow tall is the 4th bar? ≈120 单位 😀<|im_end|>"
    enc = tok.encode(text)
    assert enc.ids[0] == base + 1 and enc.ids[-1] == base + 2
    assert tok.decode(enc.ids, skip_special_tokens=False) == text
    # vocab.json / merges.txt describe the same model
    vocab = json.loads((tiny_checkpoint / "vocab.json").read_text())
    assert len(vocab) == base and vocab[tok.id_to_token(300)] == 300
    merges = (tiny_checkpoint / "merges.txt").read_text().splitlines()
    assert merges[0].startswith("#version") and len(merges) > 100


def test_big_shapes_use_the_real_qwen_token_ids():
    from qvq_local.convert import tokenizer_synth
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(
        tokenizer_synth.build_tokenizer_json(151643, "trained", DEFAULT_FAMILY.special_tokens)
    )
    assert [tok.token_to_id(t) for t in SPECIALS] == list(range(151643, 151657))
    assert tok.get_vocab_size() == 151657
    # fillers up to the real ids are never produced by encoding
    enc = tok.encode("Let me look at the image carefully: the fourth bar is the tallest, 120 units.")
    assert max(enc.ids) < 2000


def test_chat_template_renders_images_like_qwen2_vl(tiny_checkpoint):
    import jinja2

    tcfg = json.loads((tiny_checkpoint / "tokenizer_config.json").read_text())
    separate = json.loads((tiny_checkpoint / "chat_template.json").read_text())
    assert separate["chat_template"] == tcfg["chat_template"]
    assert tcfg["eos_token"] == "<|im_end|>" and tcfg["pad_token"] == "<|endoftext|>"
    assert [d["content"] for d in tcfg["added_tokens_decoder"].values()] == SPECIALS
    template = jinja2.Environment().from_string(tcfg["chat_template"])
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many bars?"}]}]
    text = template.render(messages=messages, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are a helpful and harmless assistant. You are Qwen developed by "
        "Alibaba. You should think step-by-step.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>How many bars?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    own_system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert template.render(messages=own_system, add_generation_prompt=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    )


def test_weights_have_sane_statistics(tiny_checkpoint):
    ckpt = ShardedCheckpoint(tiny_checkpoint)
    w = ckpt.to_f32("model.layers.0.mlp.up_proj.weight")
    assert 0.018 < w.std() < 0.022 and abs(w.mean()) < 0.002
    n = ckpt.to_f32("model.layers.1.input_layernorm.weight")
    assert abs(n.mean() - 1.0) < 0.01 and 0 < n.std() < 0.05
    # per-tensor generators: two tensors of one shape are not copies of each other
    assert not np.array_equal(
        ckpt.raw("model.layers.0.mlp.up_proj.weight"), ckpt.raw("model.layers.1.mlp.up_proj.weight")
    )


def test_bf16_checkpoint_is_the_rounded_f32_one(tiny_checkpoint, tiny_checkpoint_bf16):
    f32, bf16 = ShardedCheckpoint(tiny_checkpoint), ShardedCheckpoint(tiny_checkpoint_bf16)
    assert json.loads((tiny_checkpoint_bf16 / "config.json").read_text())["torch_dtype"] == "bfloat16"
    for name in ("model.embed_tokens.weight", "visual.blocks.1.attn.qkv.bias", "model.norm.weight"):
        assert bf16.dtype(name) == "BF16"
        assert np.array_equal(bf16.raw(name), f32_to_bf16_bits(f32.raw(name)))
        assert np.allclose(bf16_bits_to_f32(bf16.raw(name)), f32.raw(name), rtol=2**-8, atol=0)


# ------------------------------------------------------------------------------------------ determinism
def test_same_seed_same_bytes_even_in_another_process(tmp_path, tiny_checkpoint_bf16):
    code = (
        "import sys; from qvq_local.convert.synthetic import write_checkpoint; "
        "write_checkpoint(sys.argv[1], shape='tiny', dtype='bf16', seed=0)"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "again")], check=True, timeout=120)
    assert _hashes(tmp_path / "again") == _hashes(tiny_checkpoint_bf16)


def test_different_seed_changes_weights_not_tokenizer(tmp_path, tiny_checkpoint_bf16):
    other = write_checkpoint(tmp_path / "seed1", shape="tiny", dtype="bf16", seed=1)
    a, b = _hashes(tiny_checkpoint_bf16), _hashes(other)
    for name in ("tokenizer.json", "config.json", "vocab.json", "tokenizer_config.json"):
        assert a[name] == b[name]
    shards = [n for n in a if n.endswith(".safetensors")]
    assert all(a[n] != b[n] for n in shards)


def test_tensor_bytes_do_not_depend_on_writing_order():
    spec = synthetic.tensor_specs("tiny")[5]
    first = np.concatenate(list(synthetic.generate_tensor(spec, seed=3)))
    for other in synthetic.tensor_specs("tiny")[:5]:
        list(synthetic.generate_tensor(other, seed=3))
    assert np.array_equal(first, np.concatenate(list(synthetic.generate_tensor(spec, seed=3))))


# ------------------------------------------------------------------------------------------ writing safety
def test_refuses_when_disk_is_too_small(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(synthetic.shutil, "disk_usage", lambda p: usage(10**12, 10**12 - 10**9, 10**9))
    with pytest.raises(DiskFull) as raised:
        write_checkpoint(tmp_path / "big", shape="7b")
    # files are counted in decimal units (qvq_local.units.file_size): 16.6e9 bytes needed, 1e9 free
    assert_error(raised, r"the 7b checkpoint needs 16\.\d GB but only 1\.0 GB is free")
    assert list(tmp_path.iterdir()) == []


def test_refuses_non_empty_folder_unless_forced(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(InputError) as raised:
        write_checkpoint(out, shape="tiny")
    assert_error(raised, "not empty")
    assert (out / "keep.txt").exists()
    write_checkpoint(out, shape="tiny", force=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()
    (tmp_path / "empty").mkdir()
    write_checkpoint(tmp_path / "empty", shape="tiny")  # an empty folder is fine


def test_interrupt_leaves_no_partial_checkpoint(tmp_path, monkeypatch):
    real = synthetic.generate_tensor
    calls = {"n": 0}

    def flaky(spec, seed):
        calls["n"] += 1
        if calls["n"] == 20:
            raise KeyboardInterrupt
        return real(spec, seed)

    monkeypatch.setattr(synthetic, "generate_tensor", flaky)
    with pytest.raises(KeyboardInterrupt):
        write_checkpoint(tmp_path / "out", shape="tiny")
    assert list(tmp_path.iterdir()) == []


def test_writing_streams_with_bounded_memory(tmp_path):
    """A 96 MB (f32) checkpoint is written holding far less than its size in memory."""
    import tracemalloc

    medium = SynthShape(
        name="medium",
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=1,
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=40960,
        tie_word_embeddings=False,
        mrope_section=(8, 12, 12),
        max_position_embeddings=4096,
        vision_depth=1,
        vision_embed_dim=256,
        vision_num_heads=4,
        tokenizer_base=1264,
        max_shard_bytes=1 << 30,
    )
    total = synthetic.checkpoint_bytes(medium, "f32")
    assert total > 90 * 1024**2
    tracemalloc.start()
    try:
        write_checkpoint(tmp_path / "m", shape=medium, dtype="f32")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < total / 2, f"peak {peak} bytes for {total} bytes written"
    assert ShardedCheckpoint(tmp_path / "m").shape("lm_head.weight") == (40960, 512)


def test_qvq_synth_command(tmp_path):
    from typer.testing import CliRunner

    from qvq_local.cli import app

    runner = CliRunner()
    out = tmp_path / "cli"
    result = runner.invoke(app, ["synth", "--shape", "tiny", "--dtype", "f32", "--seed", "7", str(out)])
    assert result.exit_code == 0, result.output
    assert str(out) in result.output and "tiny" in result.output and "shards" in result.output
    assert ShardedCheckpoint(out).dtype("lm_head.weight") == "F32"

    again = runner.invoke(app, ["synth", "--shape", "tiny", str(out)])
    assert again.exit_code == InputError.exit_code and "not empty" in again.output
    forced = runner.invoke(app, ["synth", "--shape", "tiny", "--force", str(out)])
    assert forced.exit_code == 0 and ShardedCheckpoint(out).dtype("lm_head.weight") == "BF16"

    bad = runner.invoke(app, ["synth", "--shape", "huge", str(tmp_path / "x")])
    assert bad.exit_code == InputError.exit_code and "tiny, 2b, 7b, 72b" in bad.output


# ------------------------------------------------------------------------------------------ real loaders
def _tf_inputs(path: Path, image_path: Path, question: str):
    """input_ids / pixel_values / image_grid_thw as transformers' Qwen2VLProcessor builds them.

    AutoProcessor needs torchvision (for the video processor), which is not installed, so this uses
    the PIL image processor and expands <|image_pad|> as the processor does: one per merged patch.
    """
    from PIL import Image
    from transformers import AutoImageProcessor, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    image_proc = AutoImageProcessor.from_pretrained(path, backend="pil")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    images = image_proc(images=[Image.open(image_path).convert("RGB")], return_tensors="pt")
    merge = image_proc.merge_size
    n_pad = int(images["image_grid_thw"].prod()) // (merge * merge)
    text = text.replace("<|image_pad|>", "<|image_pad|>" * n_pad)
    ids = tok(text, return_tensors="pt")
    image_id = tok.convert_tokens_to_ids("<|image_pad|>")
    ids["mm_token_type_ids"] = (ids["input_ids"] == image_id).int()
    return tok, {**ids, **images}, n_pad


@pytest.mark.parity
def test_tiny_loads_in_transformers_and_runs_with_an_image(tiny_checkpoint, sample_image):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")

    model, info = transformers.Qwen2VLForConditionalGeneration.from_pretrained(
        tiny_checkpoint, torch_dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    # every tensor of the file reached the model unchanged
    ckpt = ShardedCheckpoint(tiny_checkpoint)
    state = model.state_dict()
    emb = next(v for k, v in state.items() if k.endswith("embed_tokens.weight"))
    assert np.array_equal(emb.numpy(), ckpt.raw("model.embed_tokens.weight"))
    assert np.array_equal(model.lm_head.weight.detach().numpy(), ckpt.raw("lm_head.weight"))

    tok, inputs, n_pad = _tf_inputs(tiny_checkpoint, sample_image, "Which bar is the tallest?")
    cfg = json.loads((tiny_checkpoint / "config.json").read_text())
    assert tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>", "<|image_pad|>", "<|vision_start|>"]) == [
        cfg["bos_token_id"] + 1,
        cfg["eos_token_id"],
        cfg["image_token_id"],
        cfg["vision_start_token_id"],
    ]
    assert tok.eos_token_id == cfg["eos_token_id"] and tok.pad_token_id == cfg["bos_token_id"]
    assert inputs["image_grid_thw"].tolist() == [[1, 12, 16]] and n_pad == 48  # 168x224 -> 12x16 patches

    with torch.no_grad():
        out = model(**inputs)
    logits = out.logits[0, -1]
    assert logits.shape == (cfg["vocab_size"],)
    assert torch.isfinite(out.logits).all()
    assert logits.std() > 0.1  # not degenerate
    # the image changes the answer's logits: the vision tower is wired in
    blank = dict(inputs, pixel_values=torch.zeros_like(inputs["pixel_values"]))
    with torch.no_grad():
        assert not torch.allclose(model(**blank).logits[0, -1], logits)
    generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 4


@pytest.mark.mlx
def test_tiny_loads_in_mlx_vlm_and_generates_with_an_image(tiny_checkpoint, sample_image):
    mlx_vlm = pytest.importorskip("mlx_vlm")
    from mlx_vlm.prompt_utils import apply_chat_template

    model, processor = mlx_vlm.load(str(tiny_checkpoint))
    prompt = apply_chat_template(processor, model.config, "Which bar is the tallest?", num_images=1)
    assert "<|vision_start|><|image_pad|><|vision_end|>" in prompt
    result = mlx_vlm.generate(
        model, processor, prompt, image=[str(sample_image)], max_tokens=4, temperature=0.0, verbose=False
    )
    assert result.generation_tokens == 4
    assert result.prompt_tokens > 48  # the image's 48 merged patches are in the prompt
    assert all(0 <= t < DEFAULT_FAMILY.synth_shapes["tiny"].vocab_size for t in result.token_ids)


def test_one_writer_for_every_family_and_its_template_variants(tmp_path):
    """Qwen3-VL's checkpoints come from this writer too (its own tokenizer and template files through
    the family's hook); a variant is the family's to offer, checked before anything is written."""
    with pytest.raises(InputError) as info:
        synthetic.write_checkpoint(tmp_path / "a", "tiny", variant="instruct")
    assert_error(info, "Qwen2-VL checkpoints have one chat template, not variant 'instruct'")
    with pytest.raises(InputError) as info:
        synthetic.write_checkpoint(tmp_path / "a", "tiny", family="qwen3-vl", variant="chat")
    assert_error(info, "unknown Qwen3-VL variant 'chat'; choose one of thinking, instruct")
    assert list(tmp_path.iterdir()) == []
    default = synthetic.write_checkpoint(tmp_path / "thinking", "tiny", family="qwen3-vl")
    instruct = synthetic.write_checkpoint(
        tmp_path / "instruct", "tiny", family="qwen3-vl", variant="instruct"
    )
    template = {
        p.name: json.loads((p / "chat_template.json").read_text())["chat_template"]
        for p in (default, instruct)
    }
    assert "<think>" in template["thinking"] and "<think>" not in template["instruct"]
    tokenizer = json.loads((default / "tokenizer.json").read_text())
    assert "</think>" in {t["content"] for t in tokenizer["added_tokens"]}  # Qwen3-VL's own added tokens
    assert (
        json.loads((default / "generation_config.json").read_text())["transformers_version"] == "4.57.0.dev0"
    )


def test_vision_tower_shape_keeps_the_big_shapes_vision_side_only():
    """examples/detail_encode.py and examples/mmproj_quant.py measure 2b's/72b's vision tower this way."""
    from qvq_local.convert import synthetic

    big, tiny = synthetic.get_shape("2b"), synthetic.get_shape("tiny")
    shape = synthetic.vision_tower_shape("2b")
    assert shape.name == "2b-vision" and shape.num_hidden_layers == 1
    assert (shape.vision_depth, shape.vision_hidden_size, shape.hidden_size) == (
        big.vision_depth,
        big.vision_hidden_size,
        big.hidden_size,
    )
    assert (shape.vocab_size, shape.tokenizer_base) == (tiny.vocab_size, tiny.tokenizer_base)
    assert synthetic.checkpoint_bytes(shape) < synthetic.checkpoint_bytes(big) / 2
    assert synthetic.vision_tower_shape("tiny") is tiny
