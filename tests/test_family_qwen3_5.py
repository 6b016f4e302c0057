"""The Qwen3.5 families (dense and MoE): published layout, tokens and templates, GGUF pair, parity with
transformers.

References are independent of the code under test: transformers 5's own classes (its configs' token ids,
its tokenizer's split pattern, its models built on the meta device for the tensor set at every published
size, its f32 logits on CPU), numpy recomputing what llama.cpp's converter does to the DeltaNet tensors,
and the published sizes' numbers as their model cards state them.  Measured errors are printed
(``pytest -s``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from helpers import assert_error
from qvq_local.convert import synthetic
from vl_parity import QUESTION, chart_image, hf_logits, hf_model, save_with_transformers, session_logits

from qvq_local.errors import ModelError
from qvq_local.families import (
    FAMILIES,
    family_for_config,
    family_for_gguf_arch,
    family_for_gguf_pair,
    family_for_model_type,
    qwen3_5,
    qwen3vl,
)

DENSE, MOE = qwen3_5.FAMILY, qwen3_5.MOE_FAMILY
HF_CLASS = {DENSE.name: "Qwen3_5ForConditionalGeneration", MOE.name: "Qwen3_5MoeForConditionalGeneration"}
ALIAS = {DENSE.name: "qwen3.5", MOE.name: "qwen3.5-moe"}
# The tolerances the other families meet.  Measured here: MLX ~1e-6 (text and image); llama.cpp ~5e-4
# text, ~9e-4 image (its Gated DeltaNet rounds differently from torch's reference implementation).
TEXT_ATOL = 2e-3
IMAGE_ATOL = 5e-3

both = pytest.mark.parametrize("fam", [DENSE, MOE], ids=["dense", "moe"])


# ---------------------------------------------------------------- registry, tokens, templates


def test_registry_finds_both_families_and_their_pairs():
    assert FAMILIES["Qwen3.5"] is DENSE and FAMILIES["Qwen3.5-MoE"] is MOE
    assert family_for_config({"architectures": ["Qwen3_5ForConditionalGeneration"]}) is DENSE
    assert family_for_config({"architectures": ["Qwen3_5MoeForConditionalGeneration"]}) is MOE
    assert family_for_model_type("qwen3_5") is DENSE and family_for_model_type("qwen3_5_moe") is MOE
    assert family_for_gguf_arch("qwen35") is DENSE and family_for_gguf_arch("qwen35moe") is MOE
    assert family_for_gguf_pair("qwen35", "qwen3vl_merger") is DENSE
    assert family_for_gguf_pair("qwen35moe", "qwen3vl_merger") is MOE
    assert DENSE.recurrent_state and MOE.recurrent_state and not qwen3vl.FAMILY.recurrent_state


def test_token_ids_are_transformers_published_ones():
    """transformers' Qwen3_5Config defaults carry the published ids; Qwen3's added tokens from 248044."""
    transformers = pytest.importorskip("transformers")
    from qvq_local.convert import tokenizer_synth

    ids = tokenizer_synth.special_ids(DENSE.special_tokens, DENSE.base_vocab)
    ref = transformers.Qwen3_5Config()
    assert ids[DENSE.image_pad] == ref.image_token_id == 248056
    assert ids["<|video_pad|>"] == ref.video_token_id
    assert ids["<|vision_start|>"] == ref.vision_start_token_id
    assert ids["<|vision_end|>"] == ref.vision_end_token_id
    assert (ids["<|im_end|>"], ids["<think>"], ids["</think>"]) == (248046, 248068, 248069)
    assert ref.text_config.vocab_size == 248320


def test_pretokenizer_pattern_is_transformers_and_keeps_combining_marks():
    pytest.importorskip("transformers")
    from qvq_local.convert.synth_qwen3vl import build_tokenizer_json
    from tokenizers import Tokenizer
    from transformers.models.qwen3_5.tokenization_qwen3_5 import PRETOKENIZE_REGEX

    assert DENSE.pretokenizer_pattern == PRETOKENIZE_REGEX and DENSE.gguf_tokenizer_pre == "qwen35"
    # "e" + COMBINING ACUTE: Qwen2's pattern cuts the mark off into its own piece, Qwen3.5's keeps the word
    word = "cafe\u0301"
    qwen35 = Tokenizer.from_str(
        build_tokenizer_json(1264, "trained", DENSE.special_tokens, PRETOKENIZE_REGEX)
    )
    qwen2 = Tokenizer.from_str(build_tokenizer_json(1264, "trained", DENSE.special_tokens))
    split = qwen35.pre_tokenizer.pre_tokenize_str(word)
    assert len(split) == 1 and len(qwen2.pre_tokenizer.pre_tokenize_str(word)) == 2


def test_templates_switch_thinking_and_the_controller_closes_it():
    from qvq_local.prompt import build_prompt
    from qvq_local.splitter import default_markers

    on, off = qwen3_5.chat_template(thinks_by_default=True), qwen3_5.chat_template(thinks_by_default=False)
    head = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Q<|im_end|>\n<|im_start|>assistant\n"
    for template, default in ((on, "<think>\n"), (off, "<think>\n\n</think>\n\n")):
        assert build_prompt(template, "Q", 1, system=None, family=DENSE) == head + default
        yes = build_prompt(template, "Q", 1, system=None, family=DENSE, variables={"enable_thinking": True})
        no = build_prompt(template, "Q", 1, system=None, family=DENSE, variables={"enable_thinking": False})
        assert yes == head + "<think>\n" and no == head + "<think>\n\n</think>\n\n"
        assert default_markers(template) == ("</think>",)
    assert DENSE.fallback_chat_template == on


# ---------------------------------------------------------------- published sizes

# From the model cards (hidden size, layers, DeltaNet value heads; attention heads / kv heads; FFN or
# experts) and the published configs (tied embeddings, vision towers).  Every size: 16 key heads of 128,
# value heads of 128, attention heads of 256 of which a quarter rotates, full attention every 4th layer.
PUBLISHED = {
    "0.8b": dict(hidden=1024, layers=24, heads=8, kv=2, v_heads=16, ffn=3584, tied=True, vdepth=12, vhidden=768),
    "2b": dict(hidden=2048, layers=24, heads=8, kv=2, v_heads=16, ffn=6144, tied=True, vdepth=24, vhidden=1024),
    "4b": dict(hidden=2560, layers=32, heads=16, kv=4, v_heads=32, ffn=9216, tied=True, vdepth=24, vhidden=1024),
    "9b": dict(hidden=4096, layers=32, heads=16, kv=4, v_heads=32, ffn=12288, tied=False, vdepth=27, vhidden=1152),
    "27b": dict(hidden=5120, layers=64, heads=24, kv=4, v_heads=48, ffn=17408, tied=False, vdepth=27, vhidden=1152),
    "35b-a3b": dict(hidden=2048, layers=40, heads=16, kv=2, v_heads=32, experts=(256, 8, 512, 512)),
    "122b-a10b": dict(hidden=3072, layers=48, heads=32, kv=2, v_heads=64, experts=(256, 8, 1024, 1024)),
    "397b-a17b": dict(hidden=4096, layers=60, heads=32, kv=2, v_heads=64, experts=(512, 10, 1024, 1024)),
}  # fmt: skip


def _alias(size: str) -> str:
    return "qwen3.5-moe" if size in MOE.synth_shapes else "qwen3.5"


@pytest.mark.parametrize("size", list(PUBLISHED))
def test_published_sizes_match_their_model_cards(size):
    want, alias = PUBLISHED[size], _alias(size)
    cfg = synthetic.build_config(size, family=alias)
    tc, vc = cfg["text_config"], cfg["vision_config"]
    assert (tc["hidden_size"], tc["num_hidden_layers"], tc["linear_num_value_heads"]) == (
        want["hidden"],
        want["layers"],
        want["v_heads"],
    )
    assert (tc["num_attention_heads"], tc["num_key_value_heads"], tc["head_dim"]) == (
        want["heads"],
        want["kv"],
        256,
    )
    assert (tc["linear_num_key_heads"], tc["linear_key_head_dim"], tc["linear_value_head_dim"]) == (
        16,
        128,
        128,
    )
    assert (
        tc["rope_parameters"]["mrope_section"] == [11, 11, 10]
        and tc["rope_parameters"]["partial_rotary_factor"] == 0.25
    )
    assert (
        tc["layer_types"].count("full_attention") == want["layers"] // 4
        and tc["layer_types"][3] == "full_attention"
    )
    assert (
        tc["vocab_size"] == 248320
        and vc["deepstack_visual_indexes"] == []
        and vc["out_hidden_size"] == want["hidden"]
    )
    if "experts" in want:
        assert (tc["num_experts"], tc["num_experts_per_tok"], tc["moe_intermediate_size"],
                tc["shared_expert_intermediate_size"]) == want["experts"]  # fmt: skip
        assert "intermediate_size" not in tc
    else:
        assert tc["intermediate_size"] == want["ffn"] and cfg["tie_word_embeddings"] is want["tied"]
        assert (vc["depth"], vc["hidden_size"]) == (want["vdepth"], want["vhidden"])


@pytest.mark.parametrize("size", ["0.8b", "27b", "35b-a3b", "397b-a17b"])
def test_published_sizes_hold_exactly_the_tensors_transformers_builds(size):
    """transformers' own model, built on the meta device from the config, has every tensor the family
    expects, with the same shapes (the MTP block aside: transformers has none), at the published sizes."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    alias = _alias(size)
    fam = synthetic.get_family(alias)
    cfg = synthetic.build_config(size, family=alias)
    with torch.device("meta"):
        model = getattr(transformers, HF_CLASS[fam.name])(transformers.AutoConfig.for_model(**cfg))
    theirs = {
        k: tuple(v.shape)
        for k, v in model.state_dict().items()
        if k != "lm_head.weight" or not cfg["tie_word_embeddings"]
    }
    text, vision = fam.dims_from_config(cfg, Path("config.json"))
    ours = {k: v for k, v in fam.expected_shapes(text, vision).items() if not fam.is_mtp_tensor(k)}
    assert theirs == ours  # the MoE's packed experts included: transformers 5 holds the published layout
    assert (
        text.mtp_layers == 1
        and math.prod(ours["model.language_model.embed_tokens.weight"]) == 248320 * text.hidden_size
    )


# ---------------------------------------------------------------- config checks


def _cfg(**text_over):
    cfg = synthetic.build_config("tiny", family="qwen3.5")
    cfg["text_config"].update(text_over)
    return cfg


@pytest.mark.parametrize(
    ("over", "words"),
    [
        ({"layer_types": ["full_attention"] * 8}, ["layer_types", "full_attention_interval 4"]),
        ({"layer_types": ["linear_attention"] * 3}, ["layer_types must list 8"]),
        ({"linear_num_value_heads": 6}, ["linear_num_value_heads 6", "linear_num_key_heads 4"]),
        (
            {"rope_parameters": {"mrope_section": [11, 11, 10], "partial_rotary_factor": 0.25}},
            ["mrope_section", "8"],
        ),
        ({"linear_conv_kernel_dim": None}, ["linear_conv_kernel_dim"]),
        ({"intermediate_size": None}, ["intermediate_size"]),
    ],
)
def test_bad_configs_name_the_file_and_the_problem(over, words):
    with pytest.raises(ModelError) as info:
        DENSE.dims_from_config(_cfg(**over), Path("/m/config.json"))
    assert_error(info, *words, path="/m/config.json")


# ---------------------------------------------------------------- the synthetic checkpoints


@both
def test_synthetic_checkpoint_is_what_transformers_loads(fam, q35_ckpts):
    """Every tensor transformers' model has is there and none is missing (the MTP block is ignored by it,
    as in the published files)."""
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from qvq_local.convert.checkpoint import open_checkpoint

    ckpt = open_checkpoint(q35_ckpts[fam.name])
    assert ckpt.family is fam and "mtp.fc.weight" in ckpt and ckpt.text.mtp_layers == 1
    ckpt.release()
    _, info = getattr(transformers, HF_CLASS[fam.name]).from_pretrained(
        q35_ckpts[fam.name], output_loading_info=True
    )
    assert not info["missing_keys"] and not info["mismatched_keys"]
    assert all(k.startswith("mtp.") for k in info["unexpected_keys"])


# ---------------------------------------------------------------- GGUF pair


def _gguf(path: Path):
    import gguf

    r = gguf.GGUFReader(path)
    return {f.name: f.contents() for f in r.fields.values()}, {t.name: t for t in r.tensors}


@both
def test_gguf_keys_and_names_are_llama_cpps(fam, q35_ggufs):
    import gguf

    kv, tensors = _gguf(q35_ggufs[fam.name].model)
    arch = fam.gguf_text_arch
    assert kv["general.architecture"] == arch and kv["tokenizer.ggml.pre"] == "qwen35"
    assert kv[f"{arch}.block_count"] == (8 if fam is DENSE else 4)  # no MTP layer
    assert kv[f"{arch}.rope.dimension_count"] == 16 and kv[f"{arch}.rope.dimension_sections"] == [3, 3, 2, 0]
    assert kv[f"{arch}.attention.key_length"] == kv[f"{arch}.attention.value_length"] == 64
    assert (kv[f"{arch}.ssm.conv_kernel"], kv[f"{arch}.ssm.state_size"], kv[f"{arch}.ssm.group_count"]) == (
        4,
        32,
        4,
    )
    assert (kv[f"{arch}.ssm.time_step_rank"], kv[f"{arch}.ssm.inner_size"]) == (8, 256)
    assert kv[f"{arch}.full_attention_interval"] == 4
    assert kv[f"{arch}.attention.recurrent_layers"][:4] == [True, True, True, False]
    assert f"{arch}.n_deepstack_layers" not in kv
    if fam is MOE:
        assert f"{arch}.feed_forward_length" not in kv
        assert (kv[f"{arch}.expert_count"], kv[f"{arch}.expert_used_count"]) == (8, 2)
        assert (
            kv[f"{arch}.expert_feed_forward_length"],
            kv[f"{arch}.expert_shared_feed_forward_length"],
        ) == (256, 256)
    else:
        assert kv[f"{arch}.feed_forward_length"] == 512
    known = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH[arch.upper()]]}
    for name in tensors:
        stem = name if name.endswith("ssm_a") else name.rsplit(".", 1)[0]
        assert stem in known or stem.replace(stem.split(".")[1], "{bid}", 1) in known, name
    assert not any("nextn" in n or "mtp" in n for n in tensors)
    assert {"blk.3.attn_q.weight", "blk.0.attn_qkv.weight", "blk.0.ssm_a"} <= set(tensors)
    kv, mm = _gguf(q35_ggufs[fam.name].mmproj)
    assert (
        kv["clip.projector_type"] == "qwen3vl_merger" and kv["clip.vision.is_deepstack_layers"] == [False] * 4
    )
    assert not any(n.startswith("v.deepstack.") for n in mm)


def test_gguf_deltanet_tensors_are_what_llama_cpp_computes(q35_ggufs, q35_ckpts):
    """Recomputed with numpy here: -exp(A_log), 1 + the zero-centred norms (not the gated one), the squeezed
    convolution, and every value-head tensor in llama.cpp's tiled order (4 key heads, 2 value heads each:
    output head r * 4 + g is the checkpoint's g * 2 + r)."""
    import numpy as np
    from qvq_local.convert.checkpoint import open_checkpoint

    _, t = _gguf(q35_ggufs[DENSE.name].model)
    ckpt = open_checkpoint(q35_ckpts[DENSE.name])
    a = "model.language_model.layers.1.linear_attn."
    got = lambda n: np.asarray(t[n].data)  # noqa: E731
    order = [g * 2 + r for r in range(2) for g in range(4)]
    assert order == [0, 2, 4, 6, 1, 3, 5, 7]

    def tiled(x, head, axis=0, offset=0):
        parts = [np.take(x, range(offset + h * head, offset + (h + 1) * head), axis=axis) for h in order]
        keep = np.take(x, range(offset), axis=axis)
        return np.concatenate([keep, *parts], axis=axis)

    assert np.array_equal(
        got("blk.1.ssm_a"), (-np.exp(ckpt.read_f32(a + "A_log").astype(np.float64)))[order].astype(np.float32)
    )
    assert np.array_equal(got("blk.1.ssm_dt.bias"), ckpt.read_f32(a + "dt_bias")[order])
    assert np.array_equal(got("blk.1.ssm_beta.weight"), ckpt.read_f32(a + "in_proj_b.weight")[order])
    assert np.array_equal(got("blk.1.ssm_alpha.weight"), ckpt.read_f32(a + "in_proj_a.weight")[order])
    assert np.array_equal(
        got("blk.1.attn_qkv.weight"), tiled(ckpt.read_f32(a + "in_proj_qkv.weight"), 32, offset=256)
    )
    assert np.array_equal(got("blk.1.attn_gate.weight"), tiled(ckpt.read_f32(a + "in_proj_z.weight"), 32))
    conv = ckpt.read_f32(a + "conv1d.weight")[:, 0, :]
    assert np.array_equal(got("blk.1.ssm_conv1d.weight"), tiled(conv, 32, offset=256))
    assert np.array_equal(
        got("blk.1.ssm_out.weight"), tiled(ckpt.read_f32(a + "out_proj.weight"), 32, axis=1)
    )
    assert np.array_equal(got("blk.1.ssm_norm.weight"), ckpt.read_f32(a + "norm.weight"))
    p = "model.language_model."
    assert np.array_equal(
        got("blk.1.attn_norm.weight"), ckpt.read_f32(p + "layers.1.input_layernorm.weight") + 1
    )
    assert np.array_equal(
        got("blk.3.attn_q_norm.weight"), ckpt.read_f32(p + "layers.3.self_attn.q_norm.weight") + 1
    )
    assert np.array_equal(got("output_norm.weight"), ckpt.read_f32(p + "norm.weight") + 1)
    assert got("blk.3.attn_q.weight").shape == (2 * 4 * 64, 256)  # query and output gate
    ckpt.release()


def test_gguf_moe_experts_and_f32_tensors(q35_ggufs, q35_ckpts, tmp_path):
    import numpy as np
    from qvq_local.convert.checkpoint import open_checkpoint
    from qvq_local.convert.to_gguf import convert_to_gguf

    _, t = _gguf(q35_ggufs[MOE.name].model)
    ckpt = open_checkpoint(q35_ckpts[MOE.name])
    m = "model.language_model.layers.2.mlp."
    gate_up = ckpt.read_f32(m + "experts.gate_up_proj")
    assert np.array_equal(np.asarray(t["blk.2.ffn_gate_exps.weight"].data), gate_up[:, :256])
    assert np.array_equal(np.asarray(t["blk.2.ffn_up_exps.weight"].data), gate_up[:, 256:])
    assert np.array_equal(
        np.asarray(t["blk.2.ffn_down_exps.weight"].data), ckpt.read_f32(m + "experts.down_proj")
    )
    assert np.array_equal(
        np.asarray(t["blk.2.ffn_gate_inp_shexp.weight"].data).reshape(-1),
        ckpt.read_f32(m + "shared_expert_gate.weight").reshape(-1),
    )
    ckpt.release()
    pair = convert_to_gguf(q35_ckpts[MOE.name], tmp_path, quant="f16", mmproj_quant="f16")
    _, t = _gguf(pair.model)
    types = {n: t[n].tensor_type.name for n in ("blk.0.ffn_gate_inp.weight", "blk.0.ffn_gate_inp_shexp.weight",
                                               "blk.0.ssm_conv1d.weight", "blk.0.ffn_gate_exps.weight", "blk.0.attn_qkv.weight")}  # fmt: skip
    assert types == {"blk.0.ffn_gate_inp.weight": "F32", "blk.0.ffn_gate_inp_shexp.weight": "F32",
                     "blk.0.ssm_conv1d.weight": "F32", "blk.0.ffn_gate_exps.weight": "F16", "blk.0.attn_qkv.weight": "F16"}  # fmt: skip


# ---------------------------------------------------------------- llama.cpp


def _llama_parity(fam, gguf_pair, ref_model, ckpt: Path, label: str) -> None:
    import numpy as np

    from qvq_local.backends import llamacpp
    from qvq_local.backends.base import Prompt, SamplingParams
    from qvq_local.prompt import build_prompt, load_chat_template

    model = llamacpp.load(gguf_pair.model, gguf_pair.mmproj)
    try:
        assert model.family is fam
        template = load_chat_template(ckpt)
        for n_images, atol in ((0, TEXT_ATOL), (1, IMAGE_ATOL)):
            text = build_prompt(template, QUESTION, n_images, system=None, family=fam)
            prompt = Prompt(text=text, images=[chart_image()] * n_images)
            n_ctx = model.context_needed(prompt, new_tokens=16)
            ours, stats = session_logits(
                lambda n_ctx=n_ctx: model.new_session(SamplingParams(), n_ctx=n_ctx), prompt
            )
            ref, _ = hf_logits(ref_model, ckpt, text, prompt.images, fam.image_pad)
            assert stats.image_tokens == 70 * n_images
            err = float(np.abs(ours - ref).max())
            print(f"\n{label} llama.cpp, {n_images} image(s): max |logit diff| vs transformers {err:.3g}")
            assert err < atol and int(ours.argmax()) == int(ref.argmax())
    finally:
        model.close()


@both
@pytest.mark.llama
@pytest.mark.parity
def test_llama_text_and_image_prompts_match_transformers(fam, q35_ggufs, q35_ckpts):
    """The f32 pair through the llama.cpp backend (``qwen35`` / ``qwen35moe``: its Gated DeltaNet layers and
    the gated attention every 4th layer) vs transformers."""
    pytest.importorskip("llama_cpp")
    ckpt = q35_ckpts[fam.name]
    _llama_parity(fam, q35_ggufs[fam.name], hf_model(ckpt, HF_CLASS[fam.name]), ckpt, fam.name)


@both
@pytest.mark.llama
@pytest.mark.slow
def test_quantised_pair_answers_with_an_image(fam, q35_ckpts, tmp_path):
    pytest.importorskip("llama_cpp")
    from qvq_local.convert.to_gguf import convert_to_gguf

    from qvq_local import api

    pair = convert_to_gguf(q35_ckpts[fam.name], tmp_path / "out", quant="q4_k_m", mmproj_quant="f16")
    _, tensors = _gguf(pair.model)
    assert tensors["blk.0.ssm_conv1d.weight"].tensor_type.name == "F32"
    assert tensors["blk.0.attn_qkv.weight"].tensor_type.name not in ("F32", "F16")
    image = tmp_path / "chart.png"
    chart_image().save(image)
    with api.load(str(pair.model), backend="llama") as model:
        result = model.ask(str(image), QUESTION, think_budget=8, answer_budget=4, system="")
    assert result.images[0].tokens == 70 and result.forced[0].text.endswith("</think>\n\n")


@both
@pytest.mark.slow
@pytest.mark.parametrize("backend", ["llama", "mlx"])
def test_ask_with_a_budget_closes_think_on_both_backends(fam, backend, request, tmp_path, monkeypatch):
    """`qvq ask --think-budget` (the template thinks by default): the thought is cut at the budget, the
    forced text closes ``</think>`` and the answer follows, on either backend."""
    from typer.testing import CliRunner

    from qvq_local.cli import app
    from qvq_local.reasoning import ReasoningConfig

    pytest.importorskip("llama_cpp" if backend == "llama" else "mlx_vlm")
    model = (
        request.getfixturevalue("q35_ggufs")[fam.name].model
        if backend == "llama"
        else request.getfixturevalue("q35_mlx")[fam.name]
    )
    monkeypatch.setenv("QVQ_HOME", str(tmp_path / "home"))
    image = tmp_path / "chart.png"
    chart_image().save(image)
    args = ["ask", str(image), QUESTION, "--model", str(model), "--backend", backend]
    args += ["--think-budget", "12", "--answer-budget", "6", "--json", "--seed", "1", "--no-loop-stop"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    q = data["qvq"]
    assert q["backend"] == backend and q["images"][0]["tokens"] == 70
    grace = ReasoningConfig().grace_tokens
    assert (
        q["forced"]
        and q["forced"][0]["reason"] == "budget"
        and 12 <= q["forced"][0]["at_token"] <= 12 + grace
    )
    assert q["forced"][0]["text"].endswith("</think>\n\n")
    assert "</think>" not in data["choices"][0]["message"]["content"]


# ---------------------------------------------------------------- MLX


@both
@pytest.mark.mlx
@pytest.mark.parity
def test_mlx_text_and_image_prompts_match_transformers(fam, q35_mlx, q35_ckpts):
    import numpy as np

    from qvq_local.backends import mlx as backend
    from qvq_local.backends.base import Prompt, SamplingParams
    from qvq_local.prompt import build_prompt

    ckpt = q35_ckpts[fam.name]
    ref_model = hf_model(ckpt, HF_CLASS[fam.name])
    loaded = backend.load(q35_mlx[fam.name])
    try:
        for n_images, atol in ((0, TEXT_ATOL), (1, IMAGE_ATOL)):
            text = build_prompt(loaded.chat_template, QUESTION, n_images, system=None, family=fam)
            prompt = Prompt(text=text, images=[chart_image()] * n_images)
            ours, stats = session_logits(
                lambda: backend.MlxSession(loaded, SamplingParams(), n_ctx=1024), prompt
            )
            ref, _ = hf_logits(ref_model, ckpt, text, prompt.images, fam.image_pad)
            assert stats.image_tokens == 70 * n_images
            err = float(np.abs(ours - ref).max())
            print(f"\n{fam.name} MLX, {n_images} image(s): max |logit diff| vs transformers {err:.3g}")
            assert err < atol and int(ours.argmax()) == int(ref.argmax())
    finally:
        loaded.close()


@both
@pytest.mark.mlx
@pytest.mark.slow
def test_mlx_4bit_conversion_answers_with_a_budget(fam, q35_ckpts, tmp_path):
    pytest.importorskip("mlx_vlm")
    from qvq_local.convert.to_mlx import convert_to_mlx

    from qvq_local import api

    out = convert_to_mlx(q35_ckpts[fam.name], tmp_path / "q4", bits=4, group_size=64)
    assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == 4
    image = tmp_path / "chart.png"
    chart_image().save(image)
    with api.load(str(out), backend="mlx") as model:
        result = model.ask(str(image), QUESTION, think_budget=6, answer_budget=3, system="")
    assert result.images[0].tokens == 70 and result.forced and result.forced[0].text.endswith("</think>\n\n")


# ---------------------------------------------------------------- checkpoints made by transformers


@pytest.fixture(scope="session")
def q35_saved_by_transformers(artifacts, q35_ckpts) -> dict[str, Path]:
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    return {
        name: save_with_transformers(ckpt, artifacts / f"q35-transformers-{ALIAS[name]}", HF_CLASS[name])
        for name, ckpt in q35_ckpts.items()
    }


def test_transformers_writes_no_mtp_and_the_moe_experts_one_by_one(q35_saved_by_transformers, tmp_path):
    """What transformers 5's save_pretrained writes reads: no MTP block, each expert apart; the GGUF stacks
    the experts back into llama.cpp's packed tensors."""
    import numpy as np
    from qvq_local.convert.checkpoint import open_checkpoint
    from qvq_local.convert.to_gguf import convert_to_gguf

    src = q35_saved_by_transformers[MOE.name]
    ckpt = open_checkpoint(src)
    assert not any(MOE.is_mtp_tensor(n) for n in ckpt.names)
    m = "model.language_model.layers.1.mlp.experts."
    assert MOE.experts_apart(ckpt, "model.language_model.layers.1.") and ckpt.shape(
        m + "5.up_proj.weight"
    ) == (256, 256)
    ups = np.stack([ckpt.read_f32(f"{m}{e}.up_proj.weight") for e in range(8)])
    ckpt.release()
    pair = convert_to_gguf(src, tmp_path, quant="f32", mmproj_quant="f32")
    _, t = _gguf(pair.model)
    assert np.array_equal(np.asarray(t["blk.1.ffn_up_exps.weight"].data), ups)


@both
@pytest.mark.llama
@pytest.mark.parity
@pytest.mark.slow
def test_checkpoint_saved_by_transformers_matches_on_llama(fam, q35_saved_by_transformers, tmp_path):
    pytest.importorskip("llama_cpp")
    from qvq_local.convert.to_gguf import convert_to_gguf

    src = q35_saved_by_transformers[fam.name]
    pair = convert_to_gguf(src, tmp_path, quant="f32", mmproj_quant="f32")
    _llama_parity(fam, pair, hf_model(src, HF_CLASS[fam.name]), src, f"{fam.name} saved by transformers,")


@both
@pytest.mark.mlx
@pytest.mark.parity
@pytest.mark.slow
def test_checkpoint_saved_by_transformers_converts_and_matches_on_mlx(
    fam, q35_saved_by_transformers, artifacts
):
    import numpy as np
    from qvq_local.convert.to_mlx import convert_to_mlx

    from qvq_local.backends import mlx as backend
    from qvq_local.backends.base import Prompt, SamplingParams
    from qvq_local.prompt import build_prompt

    src = q35_saved_by_transformers[fam.name]
    out = convert_to_mlx(src, artifacts / f"q35-transformers-mlx-{ALIAS[fam.name]}", bits=None)
    ref_model = hf_model(src, HF_CLASS[fam.name])
    loaded = backend.load(out)
    try:
        for n_images, atol in ((0, TEXT_ATOL), (1, IMAGE_ATOL)):
            text = build_prompt(loaded.chat_template, QUESTION, n_images, system=None, family=fam)
            prompt = Prompt(text=text, images=[chart_image()] * n_images)
            ours, _ = session_logits(lambda: backend.MlxSession(loaded, SamplingParams(), n_ctx=1024), prompt)
            ref, _ = hf_logits(ref_model, src, text, prompt.images, fam.image_pad)
            err = float(np.abs(ours - ref).max())
            print(f"\n{fam.name} saved by transformers, MLX, {n_images} image(s): max |logit diff| {err:.3g}")
            assert err < atol and int(ours.argmax()) == int(ref.argmax())
    finally:
        loaded.close()


OWN_ROOMS = {("families", "qwen3_5.py"), ("convert", "gguf_qwen3_5.py"), ("convert", "synth_qwen3_5.py")}


def test_only_the_family_modules_name_qwen3_5():
    """No code outside the family's own rooms spells its identifiers (string constants)."""
    import ast
    import re

    idents = (
        *HF_CLASS.values(),
        "qwen3_5",
        "qwen3_5_moe",
        "qwen35",
        "qwen35moe",
        "linear_attn",
        "in_proj_qkv",
    )
    root = Path(__file__).resolve().parents[1]
    offenders = []
    for path in [*(root / "qvq_local").rglob("*.py"), *(root / "convert").rglob("*.py")]:
        if (path.parent.name, path.name) in OWN_ROOMS:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        prose = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr)}
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Constant) and isinstance(node.value, str)) or id(node) in prose:
                continue
            if any(re.search(rf"(?<![\w.]){re.escape(i)}(?![\w])", node.value) for i in idents):
                offenders.append(f"{path.relative_to(root)}:{node.lineno}")
    assert offenders == []


def test_catalogue_names_the_laptop_sizes_as_estimates():
    """``qvq models --available`` lists Qwen3.5-4B/9B/35B-A3B by short name; none of their sizes was read
    from a listing here, so all are marked estimated; the fit uses the family's published dimensions."""
    from qvq_local import catalogue

    for name, family, shape in (
        ("qwen3.5-4b", DENSE, "4b"),
        ("qwen3.5-9b", DENSE, "9b"),
        ("qwen3.5-35b-a3b", MOE, "35b-a3b"),
    ):
        entry = catalogue.lookup(name)
        assert entry.family == family.name and entry.shape == shape and shape in family.synth_shapes
        assert not entry.apple.size_checked and not entry.other.size_checked
        assert entry.apple.format == "mlx" and entry.other.ref.endswith(":Q4_K_M")


# ---------------------------------------------------------------- thinking control


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["llama", "mlx"])
def test_no_think_answers_at_once_on_both_backends(backend, request, tmp_path, monkeypatch):
    """`qvq ask --no-think`: the template closes an empty think block, so every token is answer: no thought,
    nothing forced, the answer budget alone applies."""
    from typer.testing import CliRunner

    from qvq_local.cli import app

    pytest.importorskip("llama_cpp" if backend == "llama" else "mlx_vlm")
    model = (
        request.getfixturevalue("q35_ggufs")[DENSE.name].model
        if backend == "llama"
        else request.getfixturevalue("q35_mlx")[DENSE.name]
    )
    monkeypatch.setenv("QVQ_HOME", str(tmp_path / "home"))
    image = tmp_path / "chart.png"
    chart_image().save(image)
    args = ["ask", str(image), QUESTION, "--model", str(model), "--backend", backend, "--no-think"]
    args += ["--think-budget", "4", "--answer-budget", "6", "--json", "--seed", "1", "--no-loop-stop"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    q = data["qvq"]
    assert q["settings"]["thinking"] is False and q["settings"]["answer_source"] == "no_thought"
    assert q["forced"] == [] and data["usage"]["reasoning_tokens"] == 0
    assert data["usage"]["completion_tokens"] > 0 and data["choices"][0]["message"]["content"]


@pytest.mark.mlx
def test_think_switches_a_template_that_does_not_think_by_default(artifacts, tmp_path):
    """Qwen3.5-0.8B/2B's template does not think unless told to: by default every token is answer; with
    think=True the template opens <think> and the budget closes it."""
    pytest.importorskip("mlx_vlm")
    from qvq_local.convert.to_mlx import convert_to_mlx

    from qvq_local import api

    src = synthetic.write_checkpoint(
        tmp_path / "quiet", "tiny", dtype="f32", family="qwen3.5", variant="non-thinking"
    )
    out = convert_to_mlx(src, tmp_path / "quiet-mlx", bits=None)
    image = tmp_path / "chart.png"
    chart_image().save(image)
    with api.load(str(out), backend="mlx") as model:
        quiet = model.ask(str(image), QUESTION, think_budget=6, answer_budget=3, system="")
        loud = model.ask(str(image), QUESTION, think_budget=6, answer_budget=3, system="", think=True)
    assert quiet.settings["thinking"] is False and quiet.thought == "" and not quiet.forced
    assert loud.settings["thinking"] is True and loud.forced and loud.forced[0].text.endswith("</think>\n\n")


@pytest.mark.llama
def test_no_think_on_a_template_without_the_switch_is_refused_in_one_line(tiny_gguf_f32, sample_image):
    """QVQ's template has no thinking switch: think=False is refused before anything runs; think=True
    changes nothing (QVQ thinks as it was made to)."""
    pytest.importorskip("llama_cpp")
    from qvq_local import api
    from qvq_local.errors import InputError

    with api.load(str(tiny_gguf_f32.model), backend="llama") as model:
        with pytest.raises(InputError) as err:
            model.ask(str(sample_image), QUESTION, think=False, think_budget=4, answer_budget=2)
        assert_error(err, "think", "no thinking switch", "enable_thinking")
        result = model.ask(str(sample_image), QUESTION, think=True, think_budget=4, answer_budget=2)
        assert result.settings["thinking"] is True


@pytest.mark.parametrize(
    ("body", "want"),
    [
        ({"enable_thinking": False}, False),
        ({"chat_template_kwargs": {"enable_thinking": True}}, True),
        ({"enable_thinking": True, "chat_template_kwargs": {"enable_thinking": True}}, True),
        ({}, None),
    ],
)
def test_serve_reads_the_thinking_switch(body, want):
    from qvq_local.serve.schema import parse_chat_request

    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}, {"type": "text", "text": "q"}]}]  # fmt: skip
    assert parse_chat_request({"messages": messages, **body}).think is want


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"enable_thinking": "no"}, "enable_thinking"),
        ({"chat_template_kwargs": {"enable_thinking": 1}}, "chat_template_kwargs.enable_thinking"),
        ({"chat_template_kwargs": {"tools": []}}, "chat_template_kwargs.tools"),
        ({"chat_template_kwargs": []}, "chat_template_kwargs"),
        ({"enable_thinking": True, "chat_template_kwargs": {"enable_thinking": False}}, "enable_thinking"),
    ],
)
def test_serve_refuses_a_bad_thinking_switch_with_400(body, param):
    from qvq_local.serve.schema import ApiError, parse_chat_request

    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}, {"type": "text", "text": "q"}]}]  # fmt: skip
    with pytest.raises(ApiError) as err:
        parse_chat_request({"messages": messages, **body})
    assert err.value.status == 400 and err.value.param == param


@pytest.mark.llama
@pytest.mark.slow
def test_qvq_serve_switches_thinking_off(q35_ggufs, tmp_path):
    """`qvq serve`: enable_thinking=false (or chat_template_kwargs) gives an answer with no reasoning."""
    pytest.importorskip("llama_cpp")
    import openai
    from serve_util import ServerThread, data_uri

    from qvq_local.api import load
    from qvq_local.serve.app import ServeOptions, create_app

    image = tmp_path / "chart.png"
    chart_image().save(image)
    model = load(str(q35_ggufs[DENSE.name].model), backend="llama")
    app = create_app(model, ServeOptions(api_key="k"))
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri(image)}},
                                             {"type": "text", "text": QUESTION}]}]  # fmt: skip
    try:
        with ServerThread(app) as server:
            client = openai.OpenAI(base_url=server.base_url, api_key="k", max_retries=0, timeout=120)
            budget = {"thinking_budget": 4, "answer_budget": 4, "seed": 1}
            off = client.chat.completions.create(
                model=model.name, messages=messages, extra_body={**budget, "enable_thinking": False}
            )
            kw = client.chat.completions.create(model=model.name, messages=messages,
                                                extra_body={**budget, "chat_template_kwargs": {"enable_thinking": False}})  # fmt: skip
            on = client.chat.completions.create(model=model.name, messages=messages, extra_body=budget)
    finally:
        app.state.worker.shutdown()
        model.close()
    for reply in (off, kw):
        assert reply.usage.completion_tokens_details.reasoning_tokens == 0
        assert (
            not reply.choices[0].message.model_extra.get("reasoning_content")
            and reply.choices[0].message.content
        )
    assert off.choices[0].message.content == kw.choices[0].message.content
    assert on.usage.completion_tokens_details.reasoning_tokens >= 4
