"""HF checkpoint -> GGUF (qwen2vl text model + clip/qwen2vl_merger mmproj).

The reference for numbers is transformers on CPU (the ``parity`` extra), never this project's own code.
Structural checks read the files back with gguf-py's reader; runtime checks load them in llama.cpp.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import assert_error
from qvq_local.convert.checkpoint import open_checkpoint
from qvq_local.convert.quants import DEFAULT_MMPROJ_QUANT

from qvq_local.bench.mmproj import PARITY_ATOL
from qvq_local.errors import InputError

TOKENIZER_STRINGS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces,\ttabs\nand\n\nnewlines  ",
    "Numbers: 0 7 42 123 4567 3.14159 1e-9 100,000",
    "Unicode: café naïve Ærø 東京 你好世界 Привет мир 🚀🦙 ✅",
    "def area(w, h):\n    return w * h  # code\n",
    "I've been 'told' he's there; we'll see, they're sure",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|vision_start|><|image_pad|><|image_pad|><|vision_end|>What is in the image?",
    "<|endoftext|>",
]


def _fields(path: Path) -> dict:
    from gguf import GGUFReader

    reader = GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items()}, {t.name: t for t in reader.tensors}


def _hf_tokenizer(ckpt_dir: Path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(ckpt_dir / "tokenizer.json"))


# ------------------------------------------------------------------------------------------ structure
def test_text_gguf_metadata(tiny_gguf_f32, tiny_checkpoint):
    kv, tensors = _fields(tiny_gguf_f32.model)
    cfg = json.loads((tiny_checkpoint / "config.json").read_text())
    tok_cfg = json.loads((tiny_checkpoint / "tokenizer_config.json").read_text())
    assert kv["general.architecture"] == "qwen2vl"
    assert kv["general.file_type"] == 0  # all F32
    assert kv["qwen2vl.embedding_length"] == cfg["hidden_size"]
    assert kv["qwen2vl.block_count"] == cfg["num_hidden_layers"]
    assert kv["qwen2vl.feed_forward_length"] == cfg["intermediate_size"]
    assert kv["qwen2vl.context_length"] == cfg["max_position_embeddings"]
    assert kv["qwen2vl.attention.head_count"] == cfg["num_attention_heads"]
    assert kv["qwen2vl.attention.head_count_kv"] == cfg["num_key_value_heads"]
    assert kv["qwen2vl.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg["rms_norm_eps"])
    assert kv["qwen2vl.rope.freq_base"] == pytest.approx(cfg["rope_theta"])
    assert kv["qwen2vl.rope.dimension_sections"] == cfg["rope_scaling"]["mrope_section"] + [0]
    # tokenizer: padded to the embedding rows, specials CONTROL, the rest UNUSED
    assert kv["tokenizer.ggml.model"] == "gpt2" and kv["tokenizer.ggml.pre"] == "qwen2"
    tokens, types = kv["tokenizer.ggml.tokens"], kv["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == cfg["vocab_size"]
    hf = json.loads((tiny_checkpoint / "tokenizer.json").read_text())
    for entry in hf["added_tokens"]:
        assert tokens[entry["id"]] == entry["content"] and types[entry["id"]] == 3  # CONTROL
    n_real = len(hf["model"]["vocab"]) + len(hf["added_tokens"])
    assert types.count(5) == cfg["vocab_size"] - n_real  # UNUSED
    assert types.count(1) == len(hf["model"]["vocab"])  # NORMAL
    assert len(kv["tokenizer.ggml.merges"]) == len(hf["model"]["merges"])
    assert kv["tokenizer.ggml.bos_token_id"] == cfg["bos_token_id"]
    assert kv["tokenizer.ggml.eos_token_id"] == cfg["eos_token_id"]
    assert tokens[kv["tokenizer.ggml.padding_token_id"]] == tok_cfg["pad_token"]
    assert kv["tokenizer.ggml.add_bos_token"] is False
    assert kv["tokenizer.chat_template"] == tok_cfg["chat_template"]
    # sampling defaults where llama.cpp's converter writes them (float32: compared at that precision)
    gen = json.loads((tiny_checkpoint / "generation_config.json").read_text())
    assert kv["general.sampling.top_k"] == gen["top_k"]
    assert kv["general.sampling.temp"] == pytest.approx(gen["temperature"], rel=1e-6)
    assert kv["general.sampling.top_p"] == pytest.approx(gen["top_p"], rel=1e-6)
    assert kv["general.sampling.penalty_repeat"] == pytest.approx(gen["repetition_penalty"], rel=1e-6)
    assert len(tensors) == 3 + 12 * cfg["num_hidden_layers"]


def test_text_tensor_names_and_data(tiny_gguf_f32, tiny_checkpoint):
    """Names agree with gguf-py's own qwen2vl map, and f32 data is the checkpoint's, untransposed."""
    import gguf

    _, tensors = _fields(tiny_gguf_f32.model)
    ckpt = open_checkpoint(tiny_checkpoint)
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2VL, ckpt.text.num_layers)
    expected = {
        name_map.get_name(n, try_suffixes=(".weight", ".bias")): n
        for n in ckpt.names
        if not n.startswith("visual.")
    }
    assert set(tensors) == set(expected)
    for gname, src in expected.items():
        t = tensors[gname]
        assert t.tensor_type.name == "F32"
        np.testing.assert_array_equal(np.asarray(t.data).reshape(ckpt.shape(src)), ckpt.read_f32(src))


def test_mmproj_structure_and_data(tiny_gguf_f32, tiny_checkpoint):
    kv, tensors = _fields(tiny_gguf_f32.mmproj)
    ckpt = open_checkpoint(tiny_checkpoint)
    pre = json.loads((tiny_checkpoint / "preprocessor_config.json").read_text())
    v = ckpt.vision
    assert kv["general.architecture"] == "clip"
    assert kv["clip.projector_type"] == "qwen2vl_merger"
    assert kv["clip.has_vision_encoder"] is True
    assert kv["clip.vision.projection_dim"] == ckpt.text.hidden_size
    assert kv["clip.vision.embedding_length"] == v.embed_dim
    assert kv["clip.vision.feed_forward_length"] == v.mlp_dim
    assert kv["clip.vision.block_count"] == v.depth
    assert kv["clip.vision.attention.head_count"] == v.num_heads
    assert kv["clip.vision.patch_size"] == v.patch_size
    assert kv["clip.vision.spatial_merge_size"] == v.spatial_merge_size
    np.testing.assert_allclose(kv["clip.vision.image_mean"], pre["image_mean"], rtol=1e-6)
    np.testing.assert_allclose(kv["clip.vision.image_std"], pre["image_std"], rtol=1e-6)

    e, md = v.embed_dim, v.merged_dim
    want = {
        "v.patch_embd.weight": (e, 3, 14, 14),
        "v.patch_embd.weight.1": (e, 3, 14, 14),
        "v.post_ln.weight": (e,),
        "v.post_ln.bias": (e,),
        "mm.0.weight": (md, md),
        "mm.0.bias": (md,),
        "mm.2.weight": (ckpt.text.hidden_size, md),
        "mm.2.bias": (ckpt.text.hidden_size,),
    }
    for i in range(v.depth):
        for part, shape in (("weight", (e, e)), ("bias", (e,))):
            for k in ("attn_q", "attn_k", "attn_v", "attn_out"):
                want[f"v.blk.{i}.{k}.{part}"] = shape
        want.update(
            {
                f"v.blk.{i}.ln1.weight": (e,),
                f"v.blk.{i}.ln1.bias": (e,),
                f"v.blk.{i}.ln2.weight": (e,),
                f"v.blk.{i}.ln2.bias": (e,),
                f"v.blk.{i}.ffn_up.weight": (v.mlp_dim, e),
                f"v.blk.{i}.ffn_up.bias": (v.mlp_dim,),
                f"v.blk.{i}.ffn_down.weight": (e, v.mlp_dim),
                f"v.blk.{i}.ffn_down.bias": (e,),
            }
        )
    assert {n: tuple(int(x) for x in reversed(t.shape)) for n, t in tensors.items()} == want
    assert not any("position_embd" in n or "patch_embd.bias" in n for n in tensors)

    def data(name):
        return np.asarray(tensors[name].data).reshape(want[name])

    conv = ckpt.read_f32("visual.patch_embed.proj.weight")
    np.testing.assert_array_equal(data("v.patch_embd.weight"), conv[:, :, 0])
    np.testing.assert_array_equal(data("v.patch_embd.weight.1"), conv[:, :, 1])
    qkv_w, qkv_b = (
        ckpt.read_f32("visual.blocks.1.attn.qkv.weight"),
        ckpt.read_f32("visual.blocks.1.attn.qkv.bias"),
    )
    for k, letter in enumerate("qkv"):
        np.testing.assert_array_equal(data(f"v.blk.1.attn_{letter}.weight"), qkv_w[k * e : (k + 1) * e])
        np.testing.assert_array_equal(data(f"v.blk.1.attn_{letter}.bias"), qkv_b[k * e : (k + 1) * e])
    np.testing.assert_array_equal(data("mm.2.weight"), ckpt.read_f32("visual.merger.mlp.2.weight"))
    np.testing.assert_array_equal(data("v.post_ln.bias"), ckpt.read_f32("visual.merger.ln_q.bias"))


def test_mmproj_types_per_quant(tiny_gguf_q4, tiny_checkpoint, tmp_path):
    """f16 mmproj: 2-D weights and conv kernels F16; q8_0: linear weights Q8_0, conv F32; norms/biases F32."""
    from qvq_local.convert.to_gguf import convert_to_gguf

    _, f16 = _fields(tiny_gguf_q4.mmproj)
    assert f16["v.patch_embd.weight"].tensor_type.name == "F16"
    assert f16["mm.0.weight"].tensor_type.name == "F16"
    assert f16["v.blk.0.ln1.bias"].tensor_type.name == "F32"
    pair = convert_to_gguf(tiny_checkpoint, tmp_path, quant="f16", mmproj_quant="q8_0")
    kv, q8 = _fields(pair.mmproj)
    assert kv["general.file_type"] == 7
    assert q8["v.blk.1.ffn_down.weight"].tensor_type.name == "Q8_0"
    assert q8["mm.2.weight"].tensor_type.name == "Q8_0"
    assert q8["v.patch_embd.weight.1"].tensor_type.name == "F32"
    assert q8["v.post_ln.weight"].tensor_type.name == "F32"
    # Q8_0 is close to the source: one scale per 32 values, 8 bits
    from gguf import GGMLQuantizationType, quants

    deq = quants.dequantize(np.asarray(q8["mm.2.weight"].data), GGMLQuantizationType.Q8_0)
    src = open_checkpoint(tiny_checkpoint).read_f32("visual.merger.mlp.2.weight")
    assert np.abs(deq.reshape(src.shape) - src).max() <= np.abs(src).max() / 127
    _, text = _fields(pair.model)
    assert text["blk.0.ffn_up.weight"].tensor_type.name == "F16"
    assert text["blk.0.attn_q.bias"].tensor_type.name == "F32"


def test_transformers5_naming_converts_identically(tiny_checkpoint, tiny_gguf_f32, tmp_path):
    from qvq_local.convert.to_gguf import convert_to_gguf
    from test_checkpoint import _to_transformers5

    renamed = _to_transformers5(tiny_checkpoint, tmp_path / tiny_checkpoint.name)
    pair = convert_to_gguf(renamed, tmp_path / "out", quant="f32", mmproj_quant="f32")
    _, a = _fields(tiny_gguf_f32.model)
    _, b = _fields(pair.model)
    assert list(a) == list(b)
    for name in a:
        np.testing.assert_array_equal(np.asarray(a[name].data), np.asarray(b[name].data))
    _, a = _fields(tiny_gguf_f32.mmproj)
    _, b = _fields(pair.mmproj)
    assert list(a) == list(b)
    for name in a:  # every projector tensor, not one
        np.testing.assert_array_equal(np.asarray(a[name].data), np.asarray(b[name].data), err_msg=name)


def test_chunking_does_not_change_the_output(tiny_checkpoint, tiny_gguf_f32, tmp_path, monkeypatch):
    """Streaming in tiny row blocks writes byte-identical files (tensors are never needed whole)."""
    from qvq_local.convert import gguf_stream
    from qvq_local.convert.to_gguf import convert_to_gguf

    seen: list[int] = []
    real = gguf_stream.encode_rows

    def spy(rows, qtype):
        seen.append(rows.nbytes)
        return real(rows, qtype)

    monkeypatch.setattr(gguf_stream, "CHUNK_BYTES", 16 * 1024)
    monkeypatch.setattr(gguf_stream, "encode_rows", spy)
    pair = convert_to_gguf(tiny_checkpoint, tmp_path, quant="f32", mmproj_quant="f32")
    assert max(seen) <= 16 * 1024 + 4 * 1024  # a block is at most the limit (or one row)
    assert pair.model.read_bytes() == tiny_gguf_f32.model.read_bytes()
    assert pair.mmproj.read_bytes() == tiny_gguf_f32.mmproj.read_bytes()


def test_bf16_source(tiny_checkpoint_bf16, tmp_path):
    """A bf16 checkpoint: f16 output holds the bf16 values; the quantiser path goes through raw BF16."""
    from qvq_local.convert.to_gguf import convert_to_gguf

    from qvq_local.formats.safetensors import bf16_bits_to_f32

    pair = convert_to_gguf(tiny_checkpoint_bf16, tmp_path / "f16", quant="f16", mmproj_quant="f16")
    _, t = _fields(pair.model)
    ckpt = open_checkpoint(tiny_checkpoint_bf16)
    src = bf16_bits_to_f32(ckpt.read_raw("model.layers.1.mlp.down_proj.weight"))
    np.testing.assert_array_equal(
        np.asarray(t["blk.1.ffn_down.weight"].data).reshape(src.shape), src.astype(np.float16)
    )


def test_bad_options_write_nothing(tiny_checkpoint, tmp_path):
    from qvq_local.convert.to_gguf import convert_to_gguf

    with pytest.raises(InputError) as raised:
        convert_to_gguf(tiny_checkpoint, tmp_path / "a", quant="q3_k")
    assert_error(raised, "unknown GGUF quantisation 'q3_k'")
    with pytest.raises(InputError) as raised:
        convert_to_gguf(tiny_checkpoint, tmp_path / "b", mmproj_quant="q4_k_m")
    assert_error(raised, "unknown mmproj quantisation 'q4_k_m'")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ------------------------------------------------------------------------------------------ interruption
def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_interrupt_while_writing_leaves_nothing(tiny_checkpoint, tmp_path, monkeypatch):
    from qvq_local.convert import gguf_stream
    from qvq_local.convert.to_gguf import convert_to_gguf

    real = gguf_stream._write_tensor_data
    calls = [0]

    def flaky(fout, t, on_bytes):
        calls[0] += 1
        if calls[0] == 60:  # in the middle of the text model, after the mmproj is complete
            raise KeyboardInterrupt
        return real(fout, t, on_bytes)

    monkeypatch.setattr(gguf_stream, "_write_tensor_data", flaky)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        convert_to_gguf(tiny_checkpoint, out, quant="f16", mmproj_quant="f16")
    assert calls[0] == 60
    assert _listing(out) == []


@pytest.mark.llama
def test_interrupt_while_quantising_leaves_nothing(tiny_checkpoint, tmp_path, monkeypatch):
    """Ctrl-C during llama.cpp's quantiser kills the child and removes every file."""
    pytest.importorskip("llama_cpp")
    from qvq_local.convert import gguf_quantize, to_gguf

    real = gguf_quantize.quantize_gguf

    def interrupted(src, dst, quant, on_progress=None, **kw):
        def progress(size):
            raise KeyboardInterrupt

        return real(src, dst, quant, on_progress=progress, poll_s=0.0, **kw)

    monkeypatch.setattr(to_gguf, "quantize_gguf", interrupted)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        to_gguf.convert_to_gguf(tiny_checkpoint, out, quant="q4_k_m", mmproj_quant="f16")
    assert _listing(out) == []


# ------------------------------------------------------------------------------------------ llama.cpp
def _llama(path: Path, **kw):
    llama_cpp = pytest.importorskip("llama_cpp")
    from qvq_local.backends.llama_buffers import high_level_llama

    with high_level_llama(path):  # the AMX buffer type crashes on quantised models (llama.cpp #20824)
        return llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=2, verbose=False, **kw)


@pytest.mark.llama
def test_gguf_tokenizer_matches_hf(tiny_gguf_f32, tiny_checkpoint):
    hf = _hf_tokenizer(tiny_checkpoint)
    llm = _llama(tiny_gguf_f32.model, vocab_only=True)
    try:
        for text in TOKENIZER_STRINGS:
            want = hf.encode(text, add_special_tokens=False).ids
            got = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
            assert got == want, text
            if "<|" not in text:
                assert llm.detokenize(got).decode("utf-8") == text
    finally:
        llm.close()


def _transformers_logits(ckpt_dir: Path, ids: list[int], rms_norm_eps: float | None = None) -> np.ndarray:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.AutoConfig.from_pretrained(ckpt_dir)
    if rms_norm_eps is not None:
        getattr(config, "text_config", config).rms_norm_eps = rms_norm_eps
    model = transformers.Qwen2VLForConditionalGeneration.from_pretrained(
        ckpt_dir, config=config, dtype=torch.float32
    )
    model.eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].float().numpy()


@pytest.mark.parity
@pytest.mark.llama
def test_text_logits_match_transformers(tiny_gguf_f32, tiny_checkpoint):
    """Next-token logits of the f32 GGUF (llama.cpp, f32 KV cache) vs transformers in f32 on CPU.

    Two references: transformers as configured (rms_norm_eps 1e-6), and transformers with rms_norm_eps 0,
    which is what the bundled llama.cpp computes for qwen2vl (it does not read the epsilon).  The second
    isolates the conversion itself and must agree to float32 rounding.
    Tolerances: 5e-3 absolute vs the configured model (measured ~8e-4 on logits of magnitude ~1.3);
    1e-4 vs the eps-0 model (measured ~1e-6).
    """
    text = "<|im_start|>user\nWhat is 2+2? Think step by step.<|im_end|>\n<|im_start|>assistant\n"
    ids = _hf_tokenizer(tiny_checkpoint).encode(text, add_special_tokens=False).ids
    llm = _llama(tiny_gguf_f32.model, logits_all=True, type_k=0, type_v=0)  # GGML_TYPE_F32 KV cache
    try:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids
        llm.eval(ids)
        got = np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()

    ref = _transformers_logits(tiny_checkpoint, ids)
    ref0 = _transformers_logits(tiny_checkpoint, ids, rms_norm_eps=0.0)
    err = float(np.abs(got - ref).max())
    err0 = float(np.abs(got - ref0).max())
    print(
        f"\nGGUF f32 vs transformers: max abs logit error {err:.3g} (eps 1e-6 reference), "
        f"{err0:.3g} (eps 0 reference); logit scale {np.abs(ref).max():.3g}"
    )
    assert err < 5e-3
    assert err0 < 1e-4
    assert (got.argmax(-1) == ref.argmax(-1)).all()
    assert set(np.argsort(got[-1])[-5:]) == set(np.argsort(ref[-1])[-5:])


@pytest.mark.llama
def test_q4_model_loads_and_generates(tiny_gguf_q4, tiny_gguf_f32, tiny_checkpoint):
    import gguf

    kv, tensors = _fields(tiny_gguf_q4.model)
    assert kv["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q4_K_M
    types = {t.tensor_type.name for t in tensors.values()}
    assert "Q4_K" in types and "F32" in types
    assert tensors["output_norm.weight"].tensor_type.name == "F32"
    assert kv["tokenizer.ggml.tokens"] == _fields(tiny_gguf_f32.model)[0]["tokenizer.ggml.tokens"]

    prompt = "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    llm = _llama(tiny_gguf_q4.model, logits_all=True)
    ref = _llama(tiny_gguf_f32.model, logits_all=True)
    try:
        ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
        out = []
        for tok in llm.generate(ids, top_k=1, temp=0.0):
            out.append(tok)
            if len(out) == 5:
                break
        assert len(out) == 5 and all(0 <= t < llm.n_vocab() for t in out)
        # the quantised model is still the same model: its logits track the f32 ones
        llm.reset()
        llm.eval(ids)
        ref.eval(ids)
        a, b = np.array(llm.scores[len(ids) - 1]), np.array(ref.scores[len(ids) - 1])
        corr = float(np.corrcoef(a, b)[0, 1])
        print(
            f"\nQ4_K_M vs F32 last-position logits: correlation {corr:.4f}, max abs diff {np.abs(a - b).max():.3g}"
        )
        assert corr > 0.9
    finally:
        llm.close()
        ref.close()


@pytest.mark.llama
def test_mmproj_loads_in_llama_cpp(tiny_gguf_q4):
    """llama.cpp's multimodal library accepts the mmproj next to the quantised text model."""
    llm = _llama(tiny_gguf_q4.model)
    from llama_cpp import mtmd_cpp

    params = mtmd_cpp.mtmd_context_params_default()
    params.use_gpu = False
    params.print_timings = False
    params.n_threads = 2
    ctx = mtmd_cpp.mtmd_init_from_file(str(tiny_gguf_q4.mmproj).encode(), llm.model, params)
    try:
        assert ctx, "mtmd_init_from_file failed"
        assert mtmd_cpp.mtmd_support_vision(ctx)
    finally:
        if ctx:
            mtmd_cpp.mtmd_free(ctx)
        llm.close()


@pytest.mark.llama
@pytest.mark.parametrize(("quant", "file_type", "main_type"), [("q8_0", 7, "Q8_0"), ("q5_k_m", 17, "Q5_K")])
def test_other_quants_from_bf16_source(
    tiny_checkpoint_bf16, tiny_gguf_f32, tmp_path, quant, file_type, main_type
):
    """bf16 source -> raw BF16 intermediate -> llama.cpp quantiser; the result loads and evaluates.

    llama-cpp-python fills `Llama.scores` only with logits_all=True; without it the array is
    uninitialised memory (a CI run read NaNs from it), so both models are opened with it.
    The bf16 checkpoint is the f32 one (same seed) rounded, so its logits track the f32 GGUF's.
    """
    from qvq_local.convert.to_gguf import convert_to_gguf

    pair = convert_to_gguf(tiny_checkpoint_bf16, tmp_path, quant=quant, mmproj_quant="f16")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([pair.model.name, pair.mmproj.name])
    kv, tensors = _fields(pair.model)
    assert kv["general.file_type"] == file_type
    assert tensors["blk.0.ffn_gate.weight"].tensor_type.name == main_type
    llm = _llama(pair.model, logits_all=True)
    ref = _llama(tiny_gguf_f32.model, logits_all=True)
    try:
        ids = llm.tokenize(b"Hello world", add_bos=False, special=True)
        llm.eval(ids)
        ref.eval(ids)
        a, b = np.array(llm.scores[len(ids) - 1]), np.array(ref.scores[len(ids) - 1])
        assert np.isfinite(a).all()
        corr = float(np.corrcoef(a, b)[0, 1])
        print(f"\n{main_type} (from bf16) vs F32 last-position logits: correlation {corr:.4f}")
        assert corr > 0.9
    finally:
        llm.close()
        ref.close()


def test_model_name_for_hub_snapshots(tmp_path):
    from qvq_local.convert.to_gguf import gguf_file_names, model_name_for

    snap = tmp_path / "models--Qwen--QVQ-72B-Preview" / "snapshots" / ("0123456789abcdef" * 3)[:40]
    snap.mkdir(parents=True)
    assert model_name_for(snap) == "QVQ-72B-Preview"
    assert model_name_for(tmp_path) == tmp_path.name
    assert gguf_file_names("QVQ-72B-Preview", "q4_k_m", "f16") == (
        "QVQ-72B-Preview-Q4_K_M.gguf",
        "mmproj-QVQ-72B-Preview-F16.gguf",
    )


def test_every_offered_gguf_type_is_gguf_pys_file_type():
    """The numbers written to general.file_type and handed to llama.cpp's quantiser are gguf-py's."""
    import gguf
    from qvq_local.convert.quants import GGUF_QUANTS, GGUF_TYPES, MMPROJ_QUANTS

    from qvq_local.formats.gguf import file_type_name, file_type_value

    assert file_type_value("q4_k_m") == int(gguf.LlamaFileType.MOSTLY_Q4_K_M) == 15
    assert file_type_value("F32") == int(gguf.LlamaFileType.ALL_F32) == 0
    assert file_type_value("BF16") == int(gguf.LlamaFileType.MOSTLY_BF16)  # a source-precision file's
    for name in (*GGUF_QUANTS, *MMPROJ_QUANTS):
        label = GGUF_TYPES[name].label
        assert file_type_name(file_type_value(label)) == label
    with pytest.raises(ValueError, match="no GGUF file type 'Q9_Z'"):
        file_type_value("Q9_Z")


#: mmproj type -> the largest max-abs error against transformers it may show (embeddings of magnitude
#: ~1.2).  f32 and f16 (the default) within the parity tolerance (measured ~5e-4 for both); q8_0 measured
#: ~1.3e-2, outside it, which is why f16 stays the default (examples/mmproj_quant.py prints the figures):
#: its bound only catches a broken q8_0 path.
MMPROJ_PARITY = {"f32": PARITY_ATOL, "f16": PARITY_ATOL, "q8_0": 4e-2}


@pytest.mark.parity
@pytest.mark.llama
@pytest.mark.parametrize("mmproj_quant", list(MMPROJ_PARITY))
def test_mmproj_image_embeddings_match_transformers(
    mmproj_quant, tiny_gguf_f32, tiny_checkpoint, sample_image, tmp_path
):
    """The mmproj through llama.cpp vs transformers' vision tower + merger, in f32 on CPU.

    The 224x168 image is a multiple of 28 on both sides, so neither side resizes it and both see the
    same pixels.
    """
    pytest.importorskip("llama_cpp")
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from PIL import Image
    from qvq_local.convert.to_gguf import convert_to_gguf

    from qvq_local.bench.mmproj import compare, mtmd_image_embeddings, transformers_image_embeddings

    if mmproj_quant == "f32":
        pair = tiny_gguf_f32
    else:
        pair = convert_to_gguf(tiny_checkpoint, tmp_path, quant="f32", mmproj_quant=mmproj_quant)
    image = Image.open(sample_image)
    got = mtmd_image_embeddings(pair.model, pair.mmproj, image)
    ref = transformers_image_embeddings(tiny_checkpoint, image)
    assert got.shape == ref.shape == (48, 256)  # (168/28) * (224/28) merged tokens, text width
    err = compare(got, ref)
    print(
        f"\nmmproj {mmproj_quant} vs transformers image embeddings: max abs error {err['max_abs']:.3g}, "
        f"scale {err['scale']:.3g}"
    )
    assert err["max_abs"] < MMPROJ_PARITY[mmproj_quant]


def test_default_mmproj_type_is_within_the_parity_tolerance():
    """The default is only as good as its parity: ``qvq convert`` must not default to a type whose image
    embeddings fall outside the tolerance above."""
    assert MMPROJ_PARITY[DEFAULT_MMPROJ_QUANT] <= PARITY_ATOL
