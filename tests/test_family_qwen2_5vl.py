"""The Qwen2.5-VL family: synthetic checkpoints in the published layout, GGUF + mmproj conversion, parity.

References: the published configs of Qwen/Qwen2.5-VL-{3B,7B,32B,72B}-Instruct (numbers written below),
llama.cpp's own converter for GGUF keys and tensor names, and transformers 5 on CPU in f32 for numbers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from qvq_local.convert import synthetic

from qvq_local.families import (
    FAMILIES,
    family_for_config,
    family_for_model_type,
    family_for_projector,
    qwen2_5vl,
)

FAM = qwen2_5vl.FAMILY

#: From the published config.json of each model (Hugging Face Qwen/Qwen2.5-VL-*-Instruct), and the
#: parameter count its model page shows.  The vision tower is the same at every size: depth 32, width
#: 1280, MLP 3420 (gated SiLU), 16 heads, window 112, full attention in blocks 7/15/23/31.
PUBLISHED = {
    "3b": dict(hidden=2048, inter=11008, layers=36, heads=16, kv=2, vocab=151936, tie=True, params=3.75e9),
    "7b": dict(hidden=3584, inter=18944, layers=28, heads=28, kv=4, vocab=152064, tie=False, params=8.29e9),
    "32b": dict(hidden=5120, inter=27648, layers=64, heads=40, kv=8, vocab=152064, tie=False, params=33.5e9),
    "72b": dict(hidden=8192, inter=29568, layers=80, heads=64, kv=8, vocab=152064, tie=False, params=73.4e9),
}


def test_registered_and_found_from_every_side():
    assert FAMILIES["Qwen2.5-VL"] is FAM
    assert family_for_config({"architectures": ["Qwen2_5_VLForConditionalGeneration"]}) is FAM
    assert family_for_config({"model_type": "qwen2_5_vl"}) is FAM
    assert family_for_model_type("qwen2_5_vl") is FAM
    assert family_for_projector("qwen2.5vl_merger") is FAM
    # the text model is Qwen2-VL's: llama.cpp's converter writes arch qwen2vl for both
    assert FAM.gguf_text_arch == "qwen2vl"
    assert synthetic.get_family("qwen2.5-vl") is FAM and synthetic.get_family("QWEN2.5-VL") is FAM


@pytest.mark.parametrize("size", sorted(PUBLISHED))
def test_published_configs(size):
    want = PUBLISHED[size]
    cfg = synthetic.build_config(size, family="qwen2.5-vl")
    assert cfg["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
    assert cfg["model_type"] == "qwen2_5_vl"
    got = dict(
        hidden=cfg["hidden_size"],
        inter=cfg["intermediate_size"],
        layers=cfg["num_hidden_layers"],
        heads=cfg["num_attention_heads"],
        kv=cfg["num_key_value_heads"],
        vocab=cfg["vocab_size"],
        tie=cfg["tie_word_embeddings"],
    )
    assert got == {k: v for k, v in want.items() if k != "params"}
    vc = cfg["vision_config"]
    assert vc["out_hidden_size"] == want["hidden"]
    assert (vc["depth"], vc["hidden_size"], vc["intermediate_size"], vc["num_heads"]) == (32, 1280, 3420, 16)
    assert (vc["window_size"], vc["fullatt_block_indexes"], vc["hidden_act"]) == (
        112,
        [7, 15, 23, 31],
        "silu",
    )
    assert (vc["patch_size"], vc["spatial_merge_size"], vc["temporal_patch_size"]) == (14, 2, 2)
    assert cfg["rope_scaling"]["mrope_section"] == [16, 24, 24] and cfg["max_position_embeddings"] == 128000
    assert cfg["image_token_id"] == 151655 and cfg["eos_token_id"] == 151645
    # the parameter count the model page shows, to its printed precision
    assert synthetic.parameter_count(size, "qwen2.5-vl") == pytest.approx(want["params"], rel=0.002)
    pre = synthetic.build_preprocessor_config(size, family="qwen2.5-vl")
    assert pre["processor_class"] == "Qwen2_5_VLProcessor"
    assert pre["image_processor_type"] == "Qwen2VLImageProcessor"
    assert (pre["min_pixels"], pre["max_pixels"]) == (3136, 12845056)


def test_transformers_accepts_the_published_config():
    transformers = pytest.importorskip("transformers")
    cfg = synthetic.build_config("7b", family="qwen2.5-vl")
    conf = transformers.Qwen2_5_VLConfig(**cfg)
    assert conf.vision_config.out_hidden_size == 3584
    assert conf.vision_config.fullatt_block_indexes == [7, 15, 23, 31]
    assert conf.text_config.hidden_size == 3584 and conf.text_config.num_key_value_heads == 4


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def q25_checkpoint(artifacts) -> Path:
    """The tiny Qwen2.5-VL checkpoint in f32 (exact parity needs f32)."""
    out = artifacts / "q25-tiny-f32"
    if out.exists():
        return out
    return synthetic.write_checkpoint(out, shape="tiny", dtype="f32", seed=0, family="qwen2.5-vl")


@pytest.fixture(scope="module")
def q25_gguf_f32(artifacts, q25_checkpoint):
    from qvq_local.convert.to_gguf import convert_to_gguf

    return convert_to_gguf(q25_checkpoint, artifacts / "q25-gguf-f32", quant="f32", mmproj_quant="f32")


def test_tensors_are_transformers_own(q25_checkpoint):
    """Every tensor transformers' Qwen2_5_VL model declares is in the checkpoint, with its shape."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from qvq_local.convert.checkpoint import open_checkpoint

    config = transformers.AutoConfig.from_pretrained(q25_checkpoint)
    with torch.device("meta"):
        model = transformers.Qwen2_5_VLForConditionalGeneration(config)
    want = {}
    for name, p in model.state_dict().items():
        want[FAM.original_tensor_name(name)] = tuple(p.shape)
    ckpt = open_checkpoint(q25_checkpoint)
    try:
        assert ckpt.family is FAM
        got = {n: ckpt.shape(n) for n in ckpt.names}
    finally:
        ckpt.release()
    assert got == want


def test_wrong_merger_width_is_one_line(q25_checkpoint, tmp_path):
    import shutil

    from helpers import assert_error
    from qvq_local.convert.checkpoint import open_checkpoint

    from qvq_local.errors import ModelError

    bad = tmp_path / "bad"
    shutil.copytree(q25_checkpoint, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["vision_config"]["out_hidden_size"] = 512
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError) as err:
        open_checkpoint(bad)
    assert_error(err.value, "out_hidden_size", "512", "256", path=bad / "config.json")


def test_llama_cpp_unsupported_windows_refused_before_writing(q25_checkpoint, tmp_path):
    import shutil

    from helpers import assert_error
    from qvq_local.convert.to_gguf import convert_to_gguf

    from qvq_local.errors import ModelError

    for key, value, words in (
        ("window_size", 224, ("window_size", "224", "112")),
        ("fullatt_block_indexes", [0, 3], ("fullatt_block_indexes", "[0, 3]")),
    ):
        bad = tmp_path / f"bad-{key}"
        shutil.copytree(q25_checkpoint, bad)
        cfg = json.loads((bad / "config.json").read_text())
        cfg["vision_config"][key] = value
        (bad / "config.json").write_text(json.dumps(cfg))
        out = tmp_path / f"out-{key}"
        with pytest.raises(ModelError) as err:
            convert_to_gguf(bad, out, quant="f32", mmproj_quant="f32")
        assert_error(err.value, *words, path=bad / "config.json")
        assert not out.exists() or list(out.iterdir()) == []


# ------------------------------------------------------------------------------------------ GGUF


def test_mmproj_keys_and_tensors_follow_llama_cpp(q25_gguf_f32, q25_checkpoint):
    """Keys as llama.cpp's converter writes them for Qwen2.5-VL; tensor data copied exactly."""
    from gguf import GGUFReader, Keys
    from qvq_local.convert.checkpoint import open_checkpoint

    r = GGUFReader(q25_gguf_f32.mmproj)

    def field(key):
        f = r.fields[key]
        return f.contents()

    assert field(Keys.Clip.PROJECTOR_TYPE) == "qwen2.5vl_merger"
    assert field(Keys.ClipVision.USE_SILU) is True
    assert field(Keys.ClipVision.N_WA_PATTERN) == 2  # blocks 1 and 3 full: every 2nd
    assert field(Keys.ClipVision.FEED_FORWARD_LENGTH) == 344
    assert field(Keys.ClipVision.PROJECTION_DIM) == 256
    tensors = {t.name: t for t in r.tensors}
    assert "v.blk.0.ffn_gate.weight" in tensors and "v.blk.0.ln1.bias" not in tensors
    assert "v.post_ln.weight" in tensors and "v.post_ln.bias" not in tensors
    ckpt = open_checkpoint(q25_checkpoint)
    try:
        for gname, src in (
            ("v.blk.1.ffn_gate.weight", "visual.blocks.1.mlp.gate_proj.weight"),
            ("v.blk.1.ffn_down.bias", "visual.blocks.1.mlp.down_proj.bias"),
            ("v.blk.2.ln2.weight", "visual.blocks.2.norm2.weight"),
            ("v.post_ln.weight", "visual.merger.ln_q.weight"),
            ("mm.2.weight", "visual.merger.mlp.2.weight"),
        ):
            want = ckpt.read_f32(src)
            got = np.asarray(tensors[gname].data).reshape(want.shape)
            assert np.array_equal(got, want), gname
        qkv = ckpt.read_f32("visual.blocks.0.attn.qkv.weight")
        k = np.asarray(tensors["v.blk.0.attn_k.weight"].data).reshape(256, 256)
        assert np.array_equal(k, qkv[256:512])
    finally:
        ckpt.release()
    assert sum(name.startswith("v.blk.") for name in tensors) == 4 * 16  # 4 blocks x 16 tensors


def _transformers_model(ckpt_dir: Path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(ckpt_dir, dtype=torch.float32)
    model.eval()
    return model


@pytest.mark.parity
@pytest.mark.llama
def test_text_logits_match_transformers(q25_gguf_f32, q25_checkpoint):
    """f32 GGUF through llama.cpp (f32 KV cache) vs transformers f32 on CPU: the tolerance Qwen2-VL meets
    (5e-3 absolute; llama.cpp runs qwen2vl's RMS norms with epsilon 0, transformers with 1e-6)."""
    torch = pytest.importorskip("torch")
    from test_convert_gguf import _hf_tokenizer, _llama

    text = "<|im_start|>user\nWhat is 2+2? Think step by step.<|im_end|>\n<|im_start|>assistant\n"
    ids = _hf_tokenizer(q25_checkpoint).encode(text, add_special_tokens=False).ids
    llm = _llama(q25_gguf_f32.model, logits_all=True, type_k=0, type_v=0)
    try:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids
        llm.eval(ids)
        got = np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()
    with torch.no_grad():
        ref = _transformers_model(q25_checkpoint)(input_ids=torch.tensor([ids])).logits[0].float().numpy()
    err = float(np.abs(got - ref).max())
    print(
        f"\nQwen2.5-VL GGUF f32 vs transformers: max abs logit error {err:.3g}, scale {np.abs(ref).max():.3g}"
    )
    assert err < 5e-3
    assert (got.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.parity
@pytest.mark.llama
def test_image_embeddings_match_transformers(q25_gguf_f32, q25_checkpoint, sample_image):
    """The f32 mmproj through llama.cpp's mtmd vs transformers' windowed ViT + merger, f32 on CPU.

    224x168 pixels: 8x6 merged tokens, so the 112-pixel windows (4x4 tokens) split it into two full and
    two partial windows; blocks 0 and 2 attend within windows, 1 and 3 over the whole image.
    """
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from PIL import Image

    from qvq_local.bench.mmproj import mtmd_image_embeddings

    image = Image.open(sample_image).convert("RGB")
    got = mtmd_image_embeddings(q25_gguf_f32.model, q25_gguf_f32.mmproj, image)
    processor = transformers.AutoImageProcessor.from_pretrained(q25_checkpoint)
    inputs = processor(images=[image], return_tensors="pt")
    model = _transformers_model(q25_checkpoint)
    with torch.no_grad():
        feats = model.model.get_image_features(
            pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"]
        )
    feats = getattr(feats, "pooler_output", feats)
    ref = (torch.cat(list(feats)) if isinstance(feats, (list, tuple)) else feats).float().numpy()
    # image token count equals the processor's
    assert got.shape == ref.shape == (48, 256)
    assert int(inputs["image_grid_thw"].prod()) // 4 == 48 == FAM.image_tokens(224, 168)
    err = float(np.abs(got - ref).max())
    print(f"\nQwen2.5-VL mmproj f32 vs transformers: max abs error {err:.3g}, scale {np.abs(ref).max():.3g}")
    assert err < 5e-3


# ------------------------------------------------------------------------------------------ MLX


@pytest.fixture(scope="module")
def q25_mlx_f32(artifacts, q25_checkpoint) -> Path:
    pytest.importorskip("mlx_vlm")
    from qvq_local.convert.to_mlx import convert_to_mlx

    return convert_to_mlx(q25_checkpoint, artifacts / "q25-mlx-f32", bits=None)


@pytest.mark.parity
@pytest.mark.mlx
def test_unquantised_mlx_matches_transformers_text_and_image(q25_checkpoint, q25_mlx_f32, sample_image):
    """mlx-vlm's qwen2_5_vl on the converted folder vs transformers f32 on CPU, the same ids and pixels;
    the tolerance the Qwen2-VL family meets (1e-4 on next-token logits)."""
    torch = pytest.importorskip("torch")
    from mlx_vlm import load
    from test_convert_mlx import LOGIT_ATOL, _mlx_logits, _prompts

    text_ids, image_ids, pixel_values, grid = _prompts(q25_checkpoint, sample_image)
    model = _transformers_model(q25_checkpoint)
    image_token = json.loads((q25_checkpoint / "config.json").read_text())["image_token_id"]
    with torch.no_grad():
        ref_text = model(input_ids=torch.tensor([text_ids])).logits[0, -1].numpy()
        ref_image = (
            model(
                input_ids=torch.tensor([image_ids]),
                pixel_values=torch.from_numpy(pixel_values),
                image_grid_thw=torch.from_numpy(grid),
                mm_token_type_ids=torch.tensor([[1 if t == image_token else 0 for t in image_ids]]),
            )
            .logits[0, -1]
            .numpy()
        )
    mlx_model, _ = load(str(q25_mlx_f32))
    got_text = _mlx_logits(mlx_model, text_ids)
    got_image = _mlx_logits(mlx_model, image_ids, pixel_values, grid)
    err_text = float(np.abs(got_text - ref_text).max())
    err_image = float(np.abs(got_image - ref_image).max())
    print(f"\nQwen2.5-VL MLX f32 vs transformers: text {err_text:.3g}, image {err_image:.3g}")
    assert float(np.abs(ref_image - ref_text).max()) > 100 * LOGIT_ATOL  # the image really matters
    assert err_text < LOGIT_ATOL and err_image < LOGIT_ATOL
    assert image_ids.count(image_token) == FAM.image_tokens(224, 168)


# ------------------------------------------------------------------------------------------ qvq ask


def _ask(model: str, image: Path, backend: str) -> dict:
    from typer.testing import CliRunner

    from qvq_local.cli import app

    args = ["ask", str(image), "Which bar is highest?", "--model", model, "--backend", backend]
    args += ["--think-budget", "16", "--answer-budget", "8", "--json", "--seed", "3"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _check_budgeted_answer(data: dict, backend: str) -> None:
    qvq = data["qvq"]
    assert qvq["backend"] == backend
    assert data["choices"][0]["message"]["reasoning_content"]  # random weights think past the budget
    assert data["usage"]["reasoning_tokens"] >= 16
    assert qvq["stop_reason"] in ("budget", "loop", "max_tokens")
    assert qvq["forced"] and qvq["forced"][0]["at_token"] >= 16
    # 224x168 is 8x6 merged tokens, as the processor counts them (test_image_embeddings_match_transformers)
    assert qvq["images"][0]["tokens"] == 48
    assert qvq["settings"]["system"] == "You are a helpful assistant."  # the family's, not QVQ's


@pytest.mark.llama
@pytest.mark.slow
def test_ask_with_a_thinking_budget_through_llama(q25_gguf_f32, sample_image, tmp_path, monkeypatch):
    monkeypatch.setenv("QVQ_HOME", str(tmp_path / "home"))
    _check_budgeted_answer(_ask(str(q25_gguf_f32.model), sample_image, "llama"), "llama")


@pytest.mark.mlx
@pytest.mark.slow
def test_ask_with_a_thinking_budget_through_mlx(q25_mlx_f32, sample_image, tmp_path, monkeypatch):
    monkeypatch.setenv("QVQ_HOME", str(tmp_path / "home"))
    _check_budgeted_answer(_ask(str(q25_mlx_f32), sample_image, "mlx"), "mlx")


# ------------------------------------------------------------------------------------------ CLI plumbing


def test_synth_cli_writes_the_family_and_refuses_unknown_names(tmp_path):
    from typer.testing import CliRunner

    from qvq_local.cli import app

    runner = CliRunner()
    out = tmp_path / "q25"
    result = runner.invoke(app, ["synth", str(out), "--family", "qwen2.5-vl", "--shape", "tiny"])
    assert result.exit_code == 0, result.output
    assert "Qwen2.5-VL tiny" in result.stdout
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
    assert (
        json.loads((out / "preprocessor_config.json").read_text())["processor_class"] == "Qwen2_5_VLProcessor"
    )
    template = json.loads((out / "chat_template.json").read_text())["chat_template"]
    assert "You are a helpful assistant." in template and "Alibaba" not in template
    for args, words in (
        (["--family", "qwen9-vl"], ("unknown family", "qwen9-vl", "qwen2.5-vl")),
        (
            ["--family", "qwen2.5-vl", "--shape", "2b"],
            ("unknown Qwen2.5-VL shape", "'2b'", "3b, 7b, 32b, 72b"),
        ),
    ):
        bad = runner.invoke(app, ["synth", str(tmp_path / "x"), *args])
        assert bad.exit_code not in (0, None) and "Traceback" not in bad.output
        lines = bad.stderr.strip().splitlines()
        assert len(lines) == 1 and all(w in lines[0] for w in words), bad.stderr
        assert not (tmp_path / "x").exists()


def test_bench_refuses_a_shape_the_family_lacks_before_any_work(tmp_path, monkeypatch):
    from helpers import assert_error

    from qvq_local.bench import bandwidth
    from qvq_local.bench.harness import run_bench
    from qvq_local.errors import InputError

    def no_work(*a, **k):
        raise AssertionError("measured before checking the options")

    monkeypatch.setattr(bandwidth, "measure_bandwidth", no_work)

    with pytest.raises(InputError) as err:
        run_bench(shape="2b", family="qwen2.5-vl", home=tmp_path / "bench", progress=False)
    assert_error(err.value, "unknown Qwen2.5-VL shape", "3b")
    assert not (tmp_path / "bench").exists()


@pytest.mark.llama
def test_doctor_and_models_name_the_family(q25_gguf_f32, q25_checkpoint):
    from qvq_local import doctor, hub, models

    report = doctor.report(str(q25_gguf_f32.model), probe_gpu=False)
    assert report["integrity_errors"] == 0, report["integrity"]
    assert report["model"]["family"] == "Qwen2.5-VL"
    assert models.model_family(hub.resolve(str(q25_checkpoint), download=False)) == "Qwen2.5-VL"


@pytest.mark.llama
@pytest.mark.slow
def test_quantised_pair_converts_and_answers(q25_checkpoint, sample_image, tmp_path, monkeypatch):
    """Q4_K_M text + Q8_0 mmproj: the ViT's MLP width (344 here, 3420 published) is not a multiple of Q8_0's
    32-element blocks, so those tensors fall back to F16 and the rest are Q8_0; the pair answers."""
    from gguf import GGMLQuantizationType, GGUFReader
    from qvq_local.convert.to_gguf import convert_to_gguf

    pair = convert_to_gguf(q25_checkpoint, tmp_path / "q", quant="q4_k_m", mmproj_quant="q8_0")
    types = {t.name: t.tensor_type for t in GGUFReader(pair.mmproj).tensors}
    assert types["v.blk.0.ffn_down.weight"] == GGMLQuantizationType.F16  # its rows are 344 wide
    assert types["v.blk.0.ffn_gate.weight"] == GGMLQuantizationType.Q8_0  # 256 wide
    assert types["v.blk.0.attn_q.weight"] == GGMLQuantizationType.Q8_0
    assert types["v.post_ln.weight"] == GGMLQuantizationType.F32
    monkeypatch.setenv("QVQ_HOME", str(tmp_path / "home"))
    _check_budgeted_answer(_ask(str(pair.model), sample_image, "llama"), "llama")


@pytest.mark.mlx
def test_mlx_session_encodes_the_image_apart_and_matches_mlx_vlm(q25_mlx_f32, sample_image):
    """The session runs Qwen2.5-VL's windowed tower on its own (``Family.mlx_split_vision``) and hands the
    features to the prompt; its first-token log-probabilities and greedy tokens equal mlx-vlm's own loop
    (which test_unquantised_mlx_matches_transformers_text_and_image ties to transformers)."""
    from PIL import Image
    from test_backend_mlx import ATOL, GREEDY, image_prompt, log_softmax, reference_greedy, run

    from qvq_local.backends import mlx as backend
    from qvq_local.backends import mlx_session

    assert mlx_session._split_vision("qwen2_5_vl")
    loaded = backend.load(q25_mlx_f32)
    try:
        assert loaded.family is FAM
        with Image.open(sample_image) as img:
            prompt = image_prompt(loaded, img.convert("RGB"))
        ref_tokens, ref_logprobs = reference_greedy(loaded, prompt, 16)
        session = loaded.new_session(GREEDY)
        stats = session.prefill(prompt)
        assert stats.image_tokens == 48 and session.images_encoded == 1
        err = float(np.abs(log_softmax(session.last_logits()) - ref_logprobs[0]).max())
        print(f"\nQwen2.5-VL MLX session vs mlx-vlm: first-token logprob max |diff| {err:.3g}")
        assert err < ATOL
        assert [t.id for t in run(session, 16)] == ref_tokens
    finally:
        loaded.close()
