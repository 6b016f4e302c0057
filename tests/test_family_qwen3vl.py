"""The Qwen3-VL family: its published layout, its GGUF pair, and parity with transformers on llama.cpp.

References are independent of the code under test: the published sizes' numbers are written out here
(from the published config.json files and the parameter counts Hugging Face shows for each model);
parity is against transformers' ``Qwen3VLForConditionalGeneration`` in f32 on CPU; GGUF names are
gguf-py's and llama.cpp's own.  Measured errors are printed (``pytest -s``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from helpers import assert_error
from qvq_local.convert import synthetic, tokenizer_synth
from qvq_local.convert.synth_qwen3vl import build_tokenizer_json

from qvq_local.errors import InputError, ModelError
from qvq_local.families import (
    FAMILIES,
    family_for_config,
    family_for_gguf_arch,
    family_for_model_type,
    family_for_projector,
    qwen3vl,
)

QUESTION = "Which bar is the tallest, and by how much?"


def _build_config(size: str) -> dict:
    """config.json of a synthetic Qwen3-VL of ``size`` (the published layout)."""
    return synthetic.build_config(size, family="qwen3-vl")


def _special_ids(base: int) -> dict[str, int]:
    """Qwen3-VL's special tokens' ids after a base vocabulary of ``base`` ids."""
    return tokenizer_synth.special_ids(qwen3vl.FAMILY.special_tokens, base)


# Tolerances against transformers f32: those the Qwen2-VL family meets (tests/test_backend_llama.py,
# tests/test_convert_gguf.py).  Measured here: text logits ~1e-6 (llama.cpp's qwen3vl reads the RMS
# epsilon, unlike its qwen2vl), image embeddings incl. DeepStack ~5e-4.
TEXT_ATOL = 2e-3
IMAGE_ATOL = 5e-3


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def q3_thinking(artifacts) -> Path:
    return synthetic.write_checkpoint(
        artifacts / "q3vl-tiny-thinking", "tiny", dtype="f32", family="qwen3-vl", variant="thinking"
    )


@pytest.fixture(scope="session")
def q3_instruct(artifacts) -> Path:
    return synthetic.write_checkpoint(
        artifacts / "q3vl-tiny-instruct", "tiny", dtype="f32", family="qwen3-vl", variant="instruct"
    )


@pytest.fixture(scope="session")
def q3_gguf(artifacts, q3_thinking):
    from qvq_local.convert.to_gguf import convert_to_gguf

    return convert_to_gguf(q3_thinking, artifacts / "q3vl-gguf-f32", quant="f32", mmproj_quant="f32")


@pytest.fixture(scope="session")
def q3_image(artifacts):
    """320x224: sides multiples of 32 and above the processor's 65536-pixel minimum, so transformers and
    llama.cpp both use it unresized (20x14 patches, 70 image tokens)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (320, 224), "white")
    draw = ImageDraw.Draw(img)
    for i, h in enumerate([40, 90, 60, 120, 75, 150]):
        x = 20 + i * 48
        draw.rectangle([x, 200 - h, x + 30, 200], fill=(40 + 35 * i, 90, 200 - 30 * i))
    draw.line([(20, 100), (90, 60), (160, 80), (230, 30), (300, 70)], fill="red", width=3)
    return img


@pytest.fixture(scope="session")
def q3_hf(q3_thinking):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.Qwen3VLForConditionalGeneration.from_pretrained(q3_thinking, dtype=torch.float32)
    return model.eval()


# ---------------------------------------------------------------- registry and facts


def test_registry_finds_qwen3vl_from_every_side():
    fam = FAMILIES["Qwen3-VL"]
    assert fam is qwen3vl.FAMILY
    assert family_for_config({"architectures": ["Qwen3VLForConditionalGeneration"]}) is fam
    assert family_for_config({"model_type": "qwen3_vl"}) is fam
    moe = family_for_config({"architectures": ["Qwen3VLMoeForConditionalGeneration"]})
    assert moe is not None and moe is not fam  # a family of its own (families/qwen3vl_moe.py)
    assert family_for_model_type("qwen3_vl") is fam
    assert family_for_gguf_arch("qwen3vl") is fam and family_for_projector("qwen3vl_merger") is fam
    assert family_for_gguf_arch("qwen2vl") is not fam


def test_special_tokens_are_qwen3s():
    ids = _special_ids(qwen3vl.FAMILY.base_vocab)
    # published ids (tokenizer_config.json of every Qwen3-VL model)
    assert ids["<|im_end|>"] == 151645 and ids["<|image_pad|>"] == 151655
    assert ids["<tool_call>"] == 151657 and ids["<think>"] == 151667 and ids["</think>"] == 151668
    assert len(qwen3vl.FAMILY.special_tokens) == 26


# The published config.json numbers of each dense Qwen3-VL size (Instruct and Thinking share them), and
# the parameter count Hugging Face shows for the repository.
PUBLISHED = {
    "2b": dict(hidden=2048, ffn=6144, layers=28, heads=16, kv=8, tied=True, vdepth=24, vhidden=1024,
               vffn=4096, ds=[5, 11, 17], params_b=2.13),
    "4b": dict(hidden=2560, ffn=9728, layers=36, heads=32, kv=8, tied=True, vdepth=24, vhidden=1024,
               vffn=4096, ds=[5, 11, 17], params_b=4.44),
    "8b": dict(hidden=4096, ffn=12288, layers=36, heads=32, kv=8, tied=False, vdepth=27, vhidden=1152,
               vffn=4304, ds=[8, 16, 24], params_b=8.77),
    "32b": dict(hidden=5120, ffn=25600, layers=64, heads=64, kv=8, tied=False, vdepth=27, vhidden=1152,
                vffn=4304, ds=[8, 16, 24], params_b=33.36),
}  # fmt: skip


@pytest.mark.parametrize("size", sorted(PUBLISHED))
def test_published_sizes_match_their_published_configs(size):
    want = PUBLISHED[size]
    cfg = _build_config(size)
    tc, vc = cfg["text_config"], cfg["vision_config"]
    assert (tc["hidden_size"], tc["intermediate_size"], tc["num_hidden_layers"]) == (
        want["hidden"],
        want["ffn"],
        want["layers"],
    )
    assert (tc["num_attention_heads"], tc["num_key_value_heads"], tc["head_dim"]) == (
        want["heads"],
        want["kv"],
        128,
    )
    assert cfg["tie_word_embeddings"] is tc["tie_word_embeddings"] is want["tied"]
    assert tc["rope_scaling"] == {
        "mrope_interleaved": True,
        "mrope_section": [24, 20, 20],
        "rope_type": "default",
    }
    assert (tc["rope_theta"], tc["max_position_embeddings"], tc["vocab_size"]) == (5_000_000, 262144, 151936)
    assert (vc["depth"], vc["hidden_size"], vc["intermediate_size"], vc["deepstack_visual_indexes"]) == (
        want["vdepth"],
        want["vhidden"],
        want["vffn"],
        want["ds"],
    )
    assert (vc["patch_size"], vc["num_position_embeddings"], vc["out_hidden_size"]) == (
        16,
        2304,
        want["hidden"],
    )
    assert (cfg["image_token_id"], cfg["vision_start_token_id"], cfg["video_token_id"]) == (
        151655,
        151652,
        151656,
    )
    n = sum(math.prod(t.shape) for t in synthetic.tensor_specs(size, family="qwen3-vl"))
    assert round(n / 1e9, 2) == want["params_b"], n


@pytest.mark.parametrize("size", sorted(PUBLISHED))
def test_published_configs_are_what_transformers_reads(size):
    transformers = pytest.importorskip("transformers")
    cfg = _build_config(size)
    parsed = transformers.Qwen3VLConfig(**cfg)
    text, vision = qwen3vl.FAMILY.dims_from_config(cfg, Path("config.json"))
    assert parsed.text_config.head_dim == text.head_dim == 128
    rope = parsed.text_config.rope_parameters
    assert list(rope["mrope_section"]) == list(text.mrope_section) and rope.get("mrope_interleaved") is True
    assert parsed.vision_config.deepstack_visual_indexes == list(vision.deepstack_visual_indexes)
    assert parsed.vision_config.out_hidden_size == vision.out_hidden_size


@pytest.mark.parametrize(
    ("size", "grid"),
    [((640, 480), (20, 15)), ((320, 224), (10, 7)), ((4000, 3000), (16, 12)), ((10, 10), (1, 1))],
)
def test_image_grid_uses_32_pixel_tokens(size, grid):
    """Worked by hand: 640x480 is already a multiple of 32; 4000x3000 under max 448*448 pixels scales by
    beta = sqrt(12e6/200704) = 7.73: 517x388 floored to multiples of 32 is 512x384."""
    bounds = {"max_pixels": 448 * 448} if size == (4000, 3000) else {}
    assert qwen3vl.FAMILY.image_grid(*size, **bounds) == grid


def _cfg(**over):
    cfg = _build_config("tiny")
    for key, value in over.items():
        where, _, field = key.partition("__")
        cfg[where][field] = value
    return cfg


@pytest.mark.parametrize(
    ("over", "words"),
    [
        ({"text_config__rope_scaling": {}}, ["mrope_section"]),
        ({"text_config__head_dim": 48}, ["must sum to head_dim/2 = 24"]),
        ({"vision_config__deepstack_visual_indexes": [1, 9]}, ["deepstack_visual_indexes", "depth 4"]),
        ({"vision_config__num_position_embeddings": 150}, ["150", "not a square"]),
        ({"vision_config__out_hidden_size": 512}, ["out_hidden_size 512", "must equal"]),
        ({"vision_config__hidden_size": None}, ["missing or non-numeric 'hidden_size'"]),
    ],
)
def test_bad_configs_name_the_file_and_the_problem(over, words):
    with pytest.raises(ModelError) as info:
        qwen3vl.FAMILY.dims_from_config(_cfg(**over), Path("/m/config.json"))
    assert_error(info, *words, path="/m/config.json")


# ---------------------------------------------------------------- the synthetic checkpoint


def test_synthetic_checkpoint_opens_and_loads_in_transformers(q3_thinking):
    """Every tensor transformers' Qwen3-VL expects is there with its shape, and nothing else."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from qvq_local.convert.checkpoint import open_checkpoint

    ckpt = open_checkpoint(q3_thinking)
    assert ckpt.family is qwen3vl.FAMILY and "lm_head.weight" not in ckpt  # tiny ties like 2B/4B
    config = transformers.AutoConfig.from_pretrained(q3_thinking)
    with torch.device("meta"):
        model = transformers.Qwen3VLForConditionalGeneration(config)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items() if k != "lm_head.weight"}
    have = {n: ckpt.shape(n) for n in ckpt.names}
    assert have == want
    ckpt.release()


def test_templates_instruct_and_thinking(q3_thinking, q3_instruct):
    from qvq_local.prompt import build_prompt, load_chat_template
    from qvq_local.splitter import THINK_TAG_FORCED_TEXT, default_forced_text, default_markers

    thinking = load_chat_template(q3_thinking)
    instruct = load_chat_template(q3_instruct)
    t = build_prompt(thinking, QUESTION, 1, system=None)
    assert t == (
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>" + QUESTION + "<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n"
    )
    assert build_prompt(instruct, QUESTION, 0, system=None).endswith("<|im_start|>assistant\n")
    # the controller closes the thought of the Thinking model with </think>, and only there
    assert (
        default_forced_text(thinking, QUESTION) == THINK_TAG_FORCED_TEXT
        and "</think>" in THINK_TAG_FORCED_TEXT
    )
    assert default_markers(thinking) == ("</think>",)
    assert "</think>" not in default_forced_text(instruct, QUESTION)
    # the Thinking template keeps only the answer of an earlier assistant turn
    from qvq_local.prompt import render_chat_template

    history = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "<think>\nhmm\n</think>\n\nhello"},
        {"role": "user", "content": "again"},
    ]
    assert "hmm" not in render_chat_template(thinking, history, add_generation_prompt=True)


def test_tokenizer_ids_match_config(q3_thinking):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(q3_thinking / "tokenizer.json"))
    cfg = json.loads((q3_thinking / "config.json").read_text())
    assert tok.token_to_id("<|image_pad|>") == cfg["image_token_id"]
    assert tok.token_to_id("<|vision_start|>") == cfg["vision_start_token_id"]
    assert tok.encode("a</think>b", add_special_tokens=False).ids[1] == tok.token_to_id("</think>") == 1289
    tc = json.loads((q3_thinking / "tokenizer_config.json").read_text())
    assert tc["added_tokens_decoder"]["1289"] == {**tc["added_tokens_decoder"]["1289"], "special": False}
    assert tc["added_tokens_decoder"]["1265"]["special"] is True  # <|im_start|>


def test_writer_refuses_bad_requests_and_leaves_nothing(tmp_path):
    with pytest.raises(InputError) as info:
        synthetic.write_checkpoint(tmp_path / "a", "3b", family="qwen3-vl")
    assert_error(info, "unknown Qwen3-VL shape '3b'", "2b")
    with pytest.raises(InputError) as info:
        synthetic.write_checkpoint(tmp_path / "a", "tiny", family="qwen3-vl", variant="chat")
    assert_error(info, "unknown Qwen3-VL variant 'chat'")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- GGUF pair


def _fields(path: Path):
    import gguf

    r = gguf.GGUFReader(path)
    kv = {f.name: f.contents() for f in r.fields.values()}
    return kv, {t.name: t for t in r.tensors}


def test_gguf_pair_keys_and_names(q3_gguf, q3_thinking):
    """Keys and tensor names as llama.cpp's converter writes them for Qwen3-VL (conversion/qwen3vl.py)."""
    import gguf

    kv, tensors = _fields(q3_gguf.model)
    assert kv["general.architecture"] == "qwen3vl"
    assert kv["qwen3vl.n_deepstack_layers"] == 2
    assert kv["qwen3vl.attention.key_length"] == kv["qwen3vl.attention.value_length"] == 64  # not 256/8
    assert kv["qwen3vl.rope.dimension_sections"] == [12, 10, 10, 0]
    assert kv["qwen3vl.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
    assert "output.weight" not in tensors  # tied: llama.cpp reuses token_embd
    known = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.QWEN3VL]}
    for name in tensors:
        stem = name.rsplit(".", 1)[0]
        assert stem in known or stem.replace(stem.split(".")[1], "{bid}", 1) in known, name
    assert tuple(tensors["blk.0.attn_q_norm.weight"].shape) == (64,)

    kv, tensors = _fields(q3_gguf.mmproj)
    assert kv["clip.projector_type"] == "qwen3vl_merger"
    assert kv["clip.vision.is_deepstack_layers"] == [False, True, True, False]
    assert kv["clip.vision.image_size"] == 12 * 16 and kv["clip.vision.patch_size"] == 16
    assert kv["clip.use_gelu"] is True and kv["clip.vision.projection_dim"] == 256
    assert kv["clip.vision.image_mean"] == pytest.approx([0.5] * 3)
    for name in ("v.patch_embd.weight", "v.patch_embd.weight.1", "v.patch_embd.bias", "v.position_embd.weight",
                 "v.blk.3.attn_qkv.weight", "v.post_ln.weight", "mm.0.weight", "mm.2.bias",
                 "v.deepstack.1.fc2.weight", "v.deepstack.2.norm.bias"):  # fmt: skip
        assert name in tensors, name
    assert not any(n.startswith("v.deepstack.0.") or n.startswith("v.deepstack.3.") for n in tensors)
    known = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.MMPROJ]}
    for name in tensors:
        stem = name.removesuffix(".1").rsplit(".", 1)[0]
        parts = stem.split(".")
        generic = ".".join("{bid}" if p.isdigit() else p for p in parts)
        assert stem in known or generic in known, name


# ---------------------------------------------------------------- parity on llama.cpp

pytest_llama = pytest.mark.llama


@pytest.fixture(scope="module")
def q3_llama(q3_gguf):
    pytest.importorskip("llama_cpp")
    from qvq_local.backends import llamacpp

    model = llamacpp.load(q3_gguf.model, q3_gguf.mmproj)
    yield model
    model.close()


def _hf_logits(model, ckpt: Path, text: str, images: list):
    import torch
    from tokenizers import Tokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    kwargs = {}
    if images:
        pix = Qwen2VLImageProcessorPil.from_pretrained(ckpt)(images=images, return_tensors="pt")
        n = [int(t * h * w) // 4 for t, h, w in pix["image_grid_thw"].tolist()]
        pieces = text.split("<|image_pad|>")
        text = pieces[0] + "".join("<|image_pad|>" * k + rest for k, rest in zip(n, pieces[1:]))
        kwargs = {"pixel_values": pix["pixel_values"], "image_grid_thw": pix["image_grid_thw"]}
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    if images:
        pad = tokenizer.token_to_id("<|image_pad|>")
        kwargs["mm_token_type_ids"] = torch.tensor([[1 if t == pad else 0 for t in ids]])
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), **kwargs
        )
    return out.logits[0, -1].float().numpy(), ids


@pytest_llama
@pytest.mark.parity
def test_llama_text_and_image_prompts_match_transformers(q3_llama, q3_hf, q3_thinking, q3_image):
    """Next-token logits of the f32 GGUF pair through the llama.cpp backend vs transformers, f32 on CPU.

    With the image this covers the ViT, the merger, the DeepStack mergers, their addition to the first two
    text layers, and interleaved M-RoPE positions; the image takes as many tokens as transformers'
    processor gives it.
    """
    import numpy as np

    from qvq_local.backends.base import Prompt, SamplingParams
    from qvq_local.prompt import build_prompt, load_chat_template

    template = load_chat_template(q3_thinking)
    for n_images, atol in ((0, TEXT_ATOL), (1, IMAGE_ATOL)):
        text = build_prompt(template, QUESTION, n_images, system=None)
        prompt = Prompt(text=text, images=[q3_image] * n_images)
        session = q3_llama.new_session(SamplingParams(), n_ctx=q3_llama.context_needed(prompt, new_tokens=16))
        try:
            stats = session.prefill(prompt)
            ours = session.last_logits()
        finally:
            session.close()
        ref, ids = _hf_logits(q3_hf, q3_thinking, text, prompt.images)
        if n_images:
            n_img = ids.count(_special_ids(1264)["<|image_pad|>"])
            assert stats.image_tokens == n_img == 70 == q3_llama.image_token_estimate(320, 224)
        err = float(np.abs(ours - ref).max())
        print(
            f"\n{n_images} image(s): max |logit diff| vs transformers {err:.3g} (scale {np.abs(ref).max():.3g})"
        )
        assert err < atol
        assert int(ours.argmax()) == int(ref.argmax())


@pytest_llama
@pytest.mark.parity
def test_mmproj_embeddings_with_deepstack_match_transformers(q3_gguf, q3_llama, q3_hf, q3_thinking, q3_image):
    """The mmproj's output per image token is the merger's and then each DeepStack merger's, concatenated."""
    import ctypes

    import numpy as np
    import torch
    from llama_cpp import mtmd_cpp
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    rgb = np.ascontiguousarray(np.asarray(q3_image, dtype=np.uint8))
    params = mtmd_cpp.mtmd_context_params_default()
    params.use_gpu, params.print_timings, params.n_threads = False, False, 2
    ctx = mtmd_cpp.mtmd_init_from_file(str(q3_gguf.mmproj).encode(), q3_llama._model, params)
    assert ctx
    bitmap = mtmd_cpp.mtmd_bitmap_init(
        rgb.shape[1], rgb.shape[0], rgb.ctypes.data_as(ctypes.POINTER(ctypes.c_ubyte))
    )
    chunks = mtmd_cpp.mtmd_input_chunks_init()
    try:
        marker = mtmd_cpp.mtmd_default_marker()
        text = mtmd_cpp.mtmd_input_text(
            text=marker, text_len=len(marker), add_special=False, parse_special=True
        )
        assert (
            mtmd_cpp.mtmd_tokenize(
                ctx, chunks, ctypes.byref(text), (mtmd_cpp.mtmd_bitmap_p_ctypes * 1)(bitmap), 1
            )
            == 0
        )
        chunk = next(
            mtmd_cpp.mtmd_input_chunks_get(chunks, i)
            for i in range(mtmd_cpp.mtmd_input_chunks_size(chunks))
            if mtmd_cpp.mtmd_input_chunk_get_type(mtmd_cpp.mtmd_input_chunks_get(chunks, i)) == 1
        )
        n = mtmd_cpp.mtmd_input_chunk_get_n_tokens(chunk)
        assert mtmd_cpp.mtmd_encode_chunk(ctx, chunk) == 0
        got = (
            np.ctypeslib.as_array(mtmd_cpp.mtmd_get_output_embd(ctx), shape=(n * 256 * 3,))
            .reshape(n, -1)
            .copy()
        )
    finally:
        mtmd_cpp.mtmd_input_chunks_free(chunks)
        mtmd_cpp.mtmd_bitmap_free(bitmap)
        mtmd_cpp.mtmd_free(ctx)

    pix = Qwen2VLImageProcessorPil.from_pretrained(q3_thinking)(images=[q3_image], return_tensors="pt")
    with torch.no_grad():
        out = q3_hf.model.get_image_features(
            pixel_values=pix["pixel_values"], image_grid_thw=pix["image_grid_thw"]
        )

    def flat(x):
        return torch.cat(list(x)) if isinstance(x, (list, tuple)) else x

    ref = torch.cat([flat(out.pooler_output)] + [flat(d) for d in out.deepstack_features], dim=-1).numpy()
    assert got.shape == ref.shape == (70, 3 * 256)
    errs = [
        float(np.abs(got[:, k * 256 : (k + 1) * 256] - ref[:, k * 256 : (k + 1) * 256]).max())
        for k in range(3)
    ]
    print(f"\nmmproj f32 vs transformers (merger, DeepStack 1, DeepStack 2): max abs errors {errs}")
    assert max(errs) < IMAGE_ATOL


# ---------------------------------------------------------------- MLX


@pytest.fixture(scope="session")
def q3_mlx(artifacts, q3_thinking):
    pytest.importorskip("mlx.core")
    pytest.importorskip("mlx_vlm")
    from qvq_local.convert.to_mlx import convert_to_mlx

    return convert_to_mlx(q3_thinking, artifacts / "q3vl-mlx-f32", bits=None)


@pytest.mark.mlx
@pytest.mark.parity
@pytest.mark.parametrize("chunk", [None, 16])
def test_mlx_text_and_image_prompts_match_transformers(q3_mlx, q3_hf, q3_thinking, q3_image, chunk):
    """The unquantised MLX conversion through the MLX session vs transformers, f32 on CPU.

    With the image the session must hand the DeepStack features to the first text layers; ``chunk=16``
    prefills in 16-token chunks, so each chunk gets its own slice of them.
    """
    import numpy as np

    from qvq_local.backends import mlx as backend
    from qvq_local.backends import mlx_session
    from qvq_local.backends.base import Prompt, SamplingParams
    from qvq_local.prompt import build_prompt

    loaded = backend.load(q3_mlx)
    try:
        for n_images in (0, 1):
            text = build_prompt(loaded.chat_template, QUESTION, n_images, system=None)
            prompt = Prompt(text=text, images=[q3_image] * n_images)
            kw = {"prefill_chunk": chunk} if chunk else {}
            session = mlx_session.MlxSession(loaded, SamplingParams(), n_ctx=1024, **kw)
            try:
                stats = session.prefill(prompt)
                ours = np.array(session.last_logits())
            finally:
                session.close()
            ref, ids = _hf_logits(q3_hf, q3_thinking, text, prompt.images)
            assert stats.image_tokens == ids.count(_special_ids(1264)["<|image_pad|>"]) == 70 * n_images
            err = float(np.abs(ours - ref).max())
            print(f"\nMLX, {n_images} image(s), chunk {chunk}: max |logit diff| vs transformers {err:.3g}")
            assert err < TEXT_ATOL
            assert int(ours.argmax()) == int(ref.argmax())
    finally:
        loaded.close()


# ---------------------------------------------------------------- qvq ask with a thinking budget


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["llama", "mlx"])
def test_ask_with_a_budget_closes_think_on_both_backends(backend, request, q3_image, tmp_path, monkeypatch):
    """`qvq ask --think-budget` on the Thinking model: the thought is cut at the budget, the forced text
    ends with ``</think>`` (fed into the same KV cache), and the answer follows; JSON carries it all."""
    from typer.testing import CliRunner

    from qvq_local.cli import app
    from qvq_local.reasoning import ReasoningConfig

    pytest.importorskip("llama_cpp" if backend == "llama" else "mlx_vlm")
    model = (
        request.getfixturevalue("q3_gguf").model if backend == "llama" else request.getfixturevalue("q3_mlx")
    )
    monkeypatch.setenv("QVQ_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("QVQ_MODEL", raising=False)
    image = tmp_path / "chart.png"
    q3_image.save(image)
    args = ["ask", str(image), QUESTION, "--model", str(model), "--backend", backend]
    args += ["--think-budget", "12", "--answer-budget", "6", "--json", "--seed", "1", "--no-loop-stop"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    q = data["qvq"]
    assert q["backend"] == backend and q["images"][0]["tokens"] == 70
    assert q["settings"]["system"] is None  # the family's default: no system turn (not QVQ's prompt)
    grace = ReasoningConfig().grace_tokens  # the cut waits up to this many tokens for a sentence end
    assert (
        q["forced"]
        and q["forced"][0]["reason"] == "budget"
        and 12 <= q["forced"][0]["at_token"] <= 12 + grace
    )
    assert q["forced"][0]["text"].endswith("</think>\n\n")
    message = data["choices"][0]["message"]
    assert "</think>" not in message["content"]
    assert data["usage"]["reasoning_tokens"] >= 12 and data["usage"]["completion_tokens"] > 0
    assert q["stop_reason"] in ("budget", "max_tokens", "eos")


# ---------------------------------------------------------------- qvq doctor --model


def test_doctor_sizes_the_kv_cache_with_qwen3s_head_size(q3_gguf, q3_thinking):
    """64-wide heads (not 256 / 8 = 32): 3 layers x K and V x 2 kv heads x 64 x n_ctx x bytes."""
    from qvq_local.doctor import model_fit

    for ref, kv_bytes in ((q3_gguf.model, 2), (q3_thinking, 4)):  # llama.cpp's f16 cache; f32 weights
        fit = model_fit(str(ref), n_ctx=1000, available=10**12)
        assert fit["kv_cache_bytes"] == 2 * 3 * 1000 * 2 * 64 * kv_bytes, ref
        assert fit["trained_context"] == 262144


@pytest.mark.llama
@pytest.mark.parametrize(("quant", "mmproj_quant"), [("q4_k_m", "f16"), ("q8_0", "q8_0")])
def test_quantised_pairs_answer_with_an_image(q3_thinking, q3_image, tmp_path, quant, mmproj_quant):
    """The position table stays F32 whatever the mmproj type: clip interpolates it with ggml_interpolate,
    which aborts the process on anything else."""
    pytest.importorskip("llama_cpp")
    from qvq_local.convert.to_gguf import convert_to_gguf

    from qvq_local import api

    pair = convert_to_gguf(q3_thinking, tmp_path / "out", quant=quant, mmproj_quant=mmproj_quant)
    _, tensors = _fields(pair.mmproj)
    assert tensors["v.position_embd.weight"].tensor_type.name == "F32"
    assert tensors["v.blk.0.attn_qkv.weight"].tensor_type.name == mmproj_quant.upper()
    image = tmp_path / "chart.png"
    q3_image.save(image)
    with api.load(str(pair.model), backend="llama") as model:
        result = model.ask(str(image), QUESTION, think_budget=8, answer_budget=4, system="")
    assert result.images[0].tokens == 70 and result.forced[0].text.endswith("</think>\n\n")


OWN_ROOMS = {("families", "qwen3vl.py"), ("convert", "gguf_qwen3vl.py"), ("convert", "synth_qwen3vl.py")}
#: identifiers a successor's checkpoints carry too (Qwen3.5's vision config has DeepStack indexes): its own
#: synthetic writer may spell them, as its checkpoints do
SHARED = {"deepstack_visual_indexes": {("convert", "synth_qwen3_5.py")}}


def test_only_the_family_module_names_qwen3vl():
    """One place per family: no code outside the family's own modules (families/qwen3vl.py and, beside
    the converter and the synthesiser, convert/gguf_qwen3vl.py and convert/synth_qwen3vl.py) spells
    Qwen3-VL's identifiers (string constants; docstrings and comments are prose)."""
    import ast
    import re

    idents = (
        "Qwen3VLForConditionalGeneration",
        "qwen3_vl",
        "qwen3vl",
        "qwen3vl_merger",
        "deepstack_visual_indexes",
    )
    root = Path(__file__).resolve().parents[1]
    offenders = []
    for path in [*(root / "qvq_local").rglob("*.py"), *(root / "convert").rglob("*.py")]:
        # the family's own rooms: its facts, its GGUF converter class, its synthetic checkpoint writer
        if (path.parent.name, path.name) in OWN_ROOMS:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        prose = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr)}
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Constant) and isinstance(node.value, str)) or id(node) in prose:
                continue
            named = [i for i in idents if re.search(rf"(?<![\w.]){re.escape(i)}(?![\w])", node.value)]
            if any((path.parent.name, path.name) not in SHARED.get(i, ()) for i in named):
                offenders.append(f"{path.relative_to(root)}:{node.lineno}")
    assert offenders == []


@pytest.mark.llama
def test_images_are_bounded_on_the_families_32_pixel_grid(q3_gguf, q3_image, tmp_path):
    """A 320x224 image stays 320x224 for Qwen3-VL (on Qwen2-VL's 28-pixel grid it would first become
    308x224, and the model's processor would then resample it again), through the API and through a
    CLI-style early preparation on the default grid."""
    from qvq_local import api, images

    image = tmp_path / "chart.png"
    q3_image.save(image)
    early = images.prepare_images(str(image))  # what `qvq ask` does before the model is known
    assert early[0].info.size == (308, 224)
    with api.load(str(q3_gguf.model), backend="llama") as model:
        for source in (str(image), early[0]):
            result = model.ask(source, QUESTION, think_budget=4, answer_budget=2, system="")
            assert result.images[0].size == (320, 224) and result.images[0].tokens == 70


@pytest.mark.slow
def test_real_qwen_vocabulary_gets_qwen3s_ids():
    """With Qwen's real vocabulary (the dashscope package) the tokenizer has Qwen3's 151,669 tokens and
    the published ids: "Hello" 9707, " world" 1879, </think> 151668."""
    from qvq_local.convert import tokenizer_qwen
    from tokenizers import Tokenizer

    if not tokenizer_qwen.available():
        pytest.skip("Qwen's vocabulary file (dashscope) is not installed")
    tok = Tokenizer.from_str(build_tokenizer_json(qwen3vl.FAMILY.base_vocab, "qwen"))
    assert tok.get_vocab_size() == 151669
    assert tok.encode("Hello world</think>", add_special_tokens=False).ids == [9707, 1879, 151668]
