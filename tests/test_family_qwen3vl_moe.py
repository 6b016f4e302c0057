"""The Qwen3-VL MoE family: its published layout, its GGUF pair, and parity with transformers on both backends.

References are independent of the code under test: the published sizes' numbers are written out here (from
the published config.json files and the parameter counts Hugging Face shows); the tensors are checked
against transformers' own ``Qwen3VLMoeForConditionalGeneration``; the GGUF expert tensors against the
checkpoint's arrays transposed by numpy here; parity is against transformers in f32 on CPU.  Measured
errors are printed (``pytest -s``).
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
    family_for_projector,
    qwen3vl,
    qwen3vl_moe,
)

FAM = qwen3vl_moe.FAMILY
HF_CLASS = "Qwen3VLMoeForConditionalGeneration"
# The tolerances the dense Qwen3-VL family meets (tests/test_family_qwen3vl.py).  Measured here: MLX text
# ~1e-6 and image ~2e-4; llama.cpp ~9e-4 text and ~1.6e-3 image, the same with all 8 experts used and with
# every expert's output zeroed (so none of it comes from the experts or the routing): the dense Qwen3-VL
# tiny model measures 1.1e-3 / 1.5e-3 through llama.cpp on this machine too.
TEXT_ATOL = 2e-3
IMAGE_ATOL = 5e-3


@pytest.fixture(scope="session")
def moe_ckpt(artifacts) -> Path:
    return synthetic.write_checkpoint(artifacts / "q3moe-tiny", "tiny", dtype="f32", family="qwen3-vl-moe")


@pytest.fixture(scope="session")
def moe_gguf(artifacts, moe_ckpt):
    from qvq_local.convert.to_gguf import convert_to_gguf

    return convert_to_gguf(moe_ckpt, artifacts / "q3moe-gguf-f32", quant="f32", mmproj_quant="f32")


@pytest.fixture(scope="session")
def moe_mlx(artifacts, moe_ckpt):
    pytest.importorskip("mlx.core")
    pytest.importorskip("mlx_vlm")
    from qvq_local.convert.to_mlx import convert_to_mlx

    return convert_to_mlx(moe_ckpt, artifacts / "q3moe-mlx-f32", bits=None)


@pytest.fixture(scope="session")
def moe_hf(moe_ckpt):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    return hf_model(moe_ckpt, HF_CLASS)


# ---------------------------------------------------------------- registry and facts


def test_registry_finds_the_moe_family_and_tells_its_pair_from_qwen3vls():
    assert FAMILIES["Qwen3-VL-MoE"] is FAM
    assert family_for_config({"architectures": [HF_CLASS]}) is FAM
    assert family_for_config({"model_type": "qwen3_vl_moe"}) is FAM
    assert family_for_model_type("qwen3_vl_moe") is FAM
    assert family_for_gguf_arch("qwen3vlmoe") is FAM
    # the projector is Qwen3-VL's: only the pair says which family a GGUF pair is
    assert FAM.gguf_projector == qwen3vl.FAMILY.gguf_projector == "qwen3vl_merger"
    assert family_for_projector("qwen3vl_merger") is qwen3vl.FAMILY
    assert family_for_gguf_pair("qwen3vlmoe", "qwen3vl_merger") is FAM
    assert family_for_gguf_pair("qwen3vl", "qwen3vl_merger") is qwen3vl.FAMILY
    assert family_for_gguf_pair("qwen3vlmoe", "qwen2vl_merger") is None
    assert FAM.recurrent_state is False


# The published config.json numbers of each size (Instruct and Thinking share them) and the parameter
# count Hugging Face shows for the repository (31.1B, 236B).
PUBLISHED = {
    "30b-a3b": dict(hidden=2048, ffn=6144, layers=48, heads=32, kv=4, experts=128, top_k=8, expert_ffn=768,
                    params_b=31.1),
    "235b-a22b": dict(hidden=4096, ffn=12288, layers=94, heads=64, kv=4, experts=128, top_k=8, expert_ffn=1536,
                      params_b=235.7),
}  # fmt: skip


@pytest.mark.parametrize("size", sorted(PUBLISHED))
def test_published_sizes_match_their_published_configs(size):
    want = PUBLISHED[size]
    cfg = synthetic.build_config(size, family="qwen3-vl-moe")
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
    assert (tc["num_experts"], tc["num_experts_per_tok"], tc["moe_intermediate_size"]) == (
        want["experts"],
        want["top_k"],
        want["expert_ffn"],
    )
    assert tc["decoder_sparse_step"] == 1 and tc["mlp_only_layers"] == [] and tc["norm_topk_prob"] is True
    assert cfg["tie_word_embeddings"] is False and tc["vocab_size"] == 151936
    assert (vc["depth"], vc["hidden_size"], vc["deepstack_visual_indexes"], vc["out_hidden_size"]) == (
        27,
        1152,
        [8, 16, 24],
        want["hidden"],
    )
    n = sum(math.prod(t.shape) for t in synthetic.tensor_specs(size, family="qwen3-vl-moe"))
    assert round(n / 1e9, 1) == want["params_b"], n


def test_active_parameters_are_the_top_k_experts_and_everything_else():
    """30B-A3B reads ~3.3B text parameters per token (the "A3B") plus its 0.6B ViT; every expert counts
    toward the total."""
    cfg = synthetic.build_config("30b-a3b", family="qwen3-vl-moe")
    text, vision = FAM.dims_from_config(cfg, Path("config.json"))
    total = sum(math.prod(s) for s in FAM.expected_shapes(text, vision).values())
    active = FAM.active_parameters(text, vision)
    experts = 48 * 128 * 3 * 2048 * 768
    assert active == total - experts + 48 * 8 * 3 * 2048 * 768
    assert 3.8e9 < active < 4.0e9 and round(total / 1e9, 1) == 31.1


def test_published_configs_are_what_transformers_reads():
    transformers = pytest.importorskip("transformers")
    cfg = synthetic.build_config("30b-a3b", family="qwen3-vl-moe")
    parsed = transformers.Qwen3VLMoeConfig(**cfg)
    text, vision = FAM.dims_from_config(cfg, Path("config.json"))
    assert parsed.text_config.num_experts == text.num_experts == 128
    assert parsed.text_config.moe_intermediate_size == text.moe_intermediate_size == 768
    assert parsed.text_config.num_experts_per_tok == text.num_experts_per_tok == 8
    assert list(parsed.text_config.rope_parameters["mrope_section"]) == list(text.mrope_section)


def _cfg(**text_over):
    cfg = synthetic.build_config("tiny", family="qwen3-vl-moe")
    cfg["text_config"].update(text_over)
    return cfg


@pytest.mark.parametrize(
    ("over", "words"),
    [
        ({"num_experts_per_tok": 9}, ["num_experts_per_tok 9", "num_experts 8"]),
        ({"mlp_only_layers": [3]}, ["mlp_only_layers", "0..2"]),
        ({"moe_intermediate_size": None}, ["moe_intermediate_size"]),
        ({"num_experts": None}, ["num_experts"]),
    ],
)
def test_bad_moe_configs_name_the_file_and_the_problem(over, words):
    with pytest.raises(ModelError) as info:
        FAM.dims_from_config(_cfg(**over), Path("/m/config.json"))
    assert_error(info, *words, path="/m/config.json")


# ---------------------------------------------------------------- the synthetic checkpoint


def test_synthetic_checkpoint_is_what_transformers_loads(moe_ckpt):
    """transformers reads every tensor (the published experts transposed into its own layout) and misses
    none."""
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from qvq_local.convert.checkpoint import open_checkpoint

    ckpt = open_checkpoint(moe_ckpt)
    assert ckpt.family is FAM and ckpt.shape("model.language_model.layers.0.mlp.experts.gate_up_proj") == (
        8,
        256,
        1024,
    )
    ckpt.release()
    _, info = getattr(transformers, HF_CLASS).from_pretrained(moe_ckpt, output_loading_info=True)
    assert not any(info.values()), info


# ---------------------------------------------------------------- GGUF pair


def _gguf(path: Path):
    import gguf

    r = gguf.GGUFReader(path)
    return {f.name: f.contents() for f in r.fields.values()}, {t.name: t for t in r.tensors}


def test_gguf_experts_are_packed_as_llama_cpp_reads_them(moe_gguf, moe_ckpt):
    """Keys and names as llama.cpp's converter writes them (Qwen3VLMoeTextModel), and the experts' data:
    ffn_gate_exps[e] is gate_up_proj[e][:, :width] transposed, ffn_down_exps[e] is down_proj[e] transposed."""
    import gguf
    import numpy as np
    from qvq_local.convert.checkpoint import open_checkpoint

    kv, tensors = _gguf(moe_gguf.model)
    assert kv["general.architecture"] == "qwen3vlmoe"
    assert (kv["qwen3vlmoe.expert_count"], kv["qwen3vlmoe.expert_used_count"]) == (8, 2)
    assert kv["qwen3vlmoe.expert_feed_forward_length"] == 512 and kv["qwen3vlmoe.n_deepstack_layers"] == 2
    known = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.QWEN3VLMOE]}
    for name in tensors:
        stem = name.rsplit(".", 1)[0]
        assert stem in known or stem.replace(stem.split(".")[1], "{bid}", 1) in known, name
    assert "blk.0.ffn_gate.weight" not in tensors
    ckpt = open_checkpoint(moe_ckpt)
    p = "model.language_model.layers.1.mlp."
    gate_up, down = ckpt.read_f32(p + "experts.gate_up_proj"), ckpt.read_f32(p + "experts.down_proj")
    gate = np.asarray(tensors["blk.1.ffn_gate_exps.weight"].data)
    up = np.asarray(tensors["blk.1.ffn_up_exps.weight"].data)
    got_down = np.asarray(tensors["blk.1.ffn_down_exps.weight"].data)
    assert gate.shape == up.shape == (8, 512, 256) and got_down.shape == (8, 256, 512)
    assert np.array_equal(gate, gate_up[:, :, :512].transpose(0, 2, 1))
    assert np.array_equal(up, gate_up[:, :, 512:].transpose(0, 2, 1))
    assert np.array_equal(got_down, down.transpose(0, 2, 1))
    assert np.array_equal(
        np.asarray(tensors["blk.1.ffn_gate_inp.weight"].data), ckpt.read_f32(p + "gate.weight")
    )
    ckpt.release()


def _dense_bytes_per_token(sizes: dict[str, int], rows: int, embed: str, head: str) -> int:
    """Every text weight once and one embedding row (the whole embedding again when it is the output head)."""
    total = sum(sizes.values())
    return total + sizes[embed] // rows if head not in sizes else total - sizes[embed] + sizes[embed] // rows


@pytest.mark.parametrize("fmt", ["gguf", "mlx"])
def test_the_bench_bound_reads_two_experts_of_eight(fmt, request):
    """The bench's bytes per token count the 2 experts a token's router picks of the 8 in each layer and
    everything else in full: 6 x (gate + up + down) x 512 x 256 f32 fewer per layer than reading every weight
    (sizes read here with gguf-py and safetensors, not with the code under test)."""
    from qvq_local.bench.bandwidth import weights_per_token

    if fmt == "gguf":
        import gguf

        pair = request.getfixturevalue("moe_gguf")
        r = gguf.GGUFReader(pair.model)
        sizes = {t.name: int(t.n_bytes) for t in r.tensors}
        layers = int(r.fields["qwen3vlmoe.block_count"].contents())
        rows = int(r.get_tensor(list(sizes).index("token_embd.weight")).shape[1])
        dense = _dense_bytes_per_token(sizes, rows, "token_embd.weight", "output.weight")
        got = weights_per_token("gguf", pair.model, pair.mmproj)
    else:
        pytest.importorskip("mlx_vlm")
        from safetensors import safe_open

        folder = request.getfixturevalue("moe_mlx")
        sizes, rows = {}, 0
        for shard in sorted(folder.glob("*.safetensors")):
            with safe_open(shard, framework="numpy") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                    if "vision_tower" in name or name.startswith("visual."):
                        continue
                    t = f.get_slice(name)
                    sizes[name] = math.prod(t.get_shape()) * {"F32": 4, "F16": 2, "BF16": 2}[t.get_dtype()]
                    if "embed_tokens" in name:
                        embed, rows = name, t.get_shape()[0]
        head = next((n for n in sizes if "lm_head" in n), "no lm_head")
        dense = _dense_bytes_per_token(sizes, rows, embed, head)
        layers = json.loads((folder / "config.json").read_text())["text_config"]["num_hidden_layers"]
        got = weights_per_token("mlx", folder)
    assert (got["experts"], got["experts_per_token"]) == (8, 2)
    assert dense - got["bytes_per_token"] == layers * 6 * 3 * 512 * 256 * 4


def test_routers_stay_f32_in_an_f16_pair(moe_ckpt, tmp_path):
    from qvq_local.convert.to_gguf import convert_to_gguf

    pair = convert_to_gguf(moe_ckpt, tmp_path, quant="f16", mmproj_quant="f16")
    _, tensors = _gguf(pair.model)
    assert tensors["blk.0.ffn_gate_inp.weight"].tensor_type.name == "F32"
    assert tensors["blk.0.ffn_gate_exps.weight"].tensor_type.name == "F16"


def test_dense_layers_are_refused_for_llama_cpp_before_writing(tmp_path):
    """transformers reads a checkpoint whose layer 1 keeps a dense MLP (mlp_only_layers), llama.cpp's
    qwen3vlmoe does not (experts in every layer): one line naming the layers, nothing written."""
    from dataclasses import replace

    from qvq_local.convert.to_gguf import convert_to_gguf

    shape = replace(synthetic.get_shape("tiny", "qwen3-vl-moe"), mlp_only_layers=(1,))
    src = synthetic.write_checkpoint(tmp_path / "mixed", shape, dtype="f32")
    from qvq_local.convert.checkpoint import open_checkpoint

    ckpt = open_checkpoint(src)  # the checkpoint is fine: layer 1 has gate/up/down, no experts
    assert "model.language_model.layers.1.mlp.up_proj.weight" in ckpt and not ckpt.text.is_moe_layer(1)
    ckpt.release()
    with pytest.raises(ModelError) as info:
        convert_to_gguf(src, tmp_path / "out", quant="f32", mmproj_quant="f32")
    assert_error(
        info, r"text layers \[1\] have a dense MLP", "experts in every layer", path=src / "config.json"
    )
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# ---------------------------------------------------------------- llama.cpp


@pytest.fixture(scope="module")
def moe_llama(moe_gguf):
    pytest.importorskip("llama_cpp")
    from qvq_local.backends import llamacpp

    model = llamacpp.load(moe_gguf.model, moe_gguf.mmproj)
    yield model
    model.close()


def _llama_parity(model, ref_model, ckpt: Path, label: str) -> None:
    import numpy as np

    from qvq_local.backends.base import Prompt, SamplingParams
    from qvq_local.prompt import build_prompt, load_chat_template

    assert model.family is FAM
    template = load_chat_template(ckpt)
    for n_images, atol in ((0, TEXT_ATOL), (1, IMAGE_ATOL)):
        text = build_prompt(template, QUESTION, n_images, system=None, family=FAM)
        prompt = Prompt(text=text, images=[chart_image()] * n_images)
        n_ctx = model.context_needed(prompt, new_tokens=16)
        ours, stats = session_logits(
            lambda n_ctx=n_ctx: model.new_session(SamplingParams(), n_ctx=n_ctx), prompt
        )
        ref, _ = hf_logits(ref_model, ckpt, text, prompt.images, FAM.image_pad)
        assert stats.image_tokens == 70 * n_images
        err = float(np.abs(ours - ref).max())
        print(f"\n{label} llama.cpp, {n_images} image(s): max |logit diff| vs transformers {err:.3g}")
        assert err < atol and int(ours.argmax()) == int(ref.argmax())


@pytest.mark.llama
@pytest.mark.parity
def test_llama_text_and_image_prompts_match_transformers(moe_llama, moe_hf, moe_ckpt):
    """The f32 pair through the llama.cpp backend (``qwen3vlmoe`` + Qwen3-VL's projector, told apart from
    Qwen3-VL's pair by the text architecture) vs transformers."""
    _llama_parity(moe_llama, moe_hf, moe_ckpt, "Qwen3-VL-MoE")


@pytest.mark.llama
@pytest.mark.slow
def test_quantised_pair_answers_with_an_image(moe_ckpt, tmp_path):
    """Q4_K_M through llama.cpp's quantiser: the experts are quantised, the routers stay F32."""
    pytest.importorskip("llama_cpp")
    from qvq_local.convert.to_gguf import convert_to_gguf

    from qvq_local import api

    pair = convert_to_gguf(moe_ckpt, tmp_path / "out", quant="q4_k_m", mmproj_quant="f16")
    _, tensors = _gguf(pair.model)
    assert tensors["blk.0.ffn_gate_exps.weight"].tensor_type.name == "Q4_K"
    assert tensors["blk.0.ffn_gate_inp.weight"].tensor_type.name == "F32"
    image = tmp_path / "chart.png"
    chart_image().save(image)
    with api.load(str(pair.model), backend="llama") as model:
        result = model.ask(str(image), QUESTION, think_budget=8, answer_budget=4, system="")
    assert result.images[0].tokens == 70 and result.forced[0].text.endswith("</think>\n\n")


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["llama", "mlx"])
def test_ask_with_a_budget_closes_think_on_both_backends(backend, request, tmp_path, monkeypatch):
    """`qvq ask --think-budget` on the Thinking template: the thought is cut at the budget, the forced text
    closes ``</think>`` and the answer follows, on either backend."""
    from typer.testing import CliRunner

    from qvq_local.cli import app
    from qvq_local.reasoning import ReasoningConfig

    pytest.importorskip("llama_cpp" if backend == "llama" else "mlx_vlm")
    model = (
        request.getfixturevalue("moe_gguf").model
        if backend == "llama"
        else request.getfixturevalue("moe_mlx")
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
    assert data["usage"]["reasoning_tokens"] >= 12 and data["usage"]["completion_tokens"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["llama", "mlx"])
def test_the_api_reuses_the_prefix_and_runs_chains(backend, request, tmp_path):
    """A second question about the same image restores the prefix from memory and answers as a model with
    the cache off does; samples=3 decodes three chains of the MoE from one prefill."""
    from qvq_local import api

    pytest.importorskip("llama_cpp" if backend == "llama" else "mlx_vlm")
    ref = (
        request.getfixturevalue("moe_gguf").model
        if backend == "llama"
        else request.getfixturevalue("moe_mlx")
    )
    image = tmp_path / "chart.png"
    chart_image().save(image)
    kw = {"think_budget": 6, "answer_budget": 4, "temperature": 0.0, "seed": 1}
    with api.load(str(ref), backend=backend) as cached, api.load(str(ref), backend=backend) as plain:
        plain.prefix_cache = None
        first = cached.ask(str(image), QUESTION, **kw)
        second = cached.ask(str(image), "What colour is the line?", **kw)
        again = plain.ask(str(image), "What colour is the line?", **kw)
        assert first.settings["prefix_cache"]["source"] == "fresh"
        assert second.settings["prefix_cache"]["source"] == "memory"
        assert again.settings["prefix_cache"]["source"] == "off"
        assert (second.thought, second.answer) == (again.thought, again.answer)
        chained = cached.ask(
            str(image), QUESTION, samples=3, **{**kw, "temperature": 1.5, "top_p": 1.0, "top_k": 0}
        )
        assert len(chained.chains) == 3 and chained.settings["samples"] == 3
        assert len({c.thought for c in chained.chains}) > 1  # each chain went its own way


# ---------------------------------------------------------------- MLX


@pytest.mark.mlx
@pytest.mark.parity
def test_mlx_text_and_image_prompts_match_transformers(moe_mlx, moe_hf, moe_ckpt):
    import numpy as np

    from qvq_local.backends import mlx as backend
    from qvq_local.backends.base import Prompt, SamplingParams
    from qvq_local.prompt import build_prompt

    image = chart_image()
    loaded = backend.load(moe_mlx)
    try:
        for n_images, atol in ((0, TEXT_ATOL), (1, IMAGE_ATOL)):
            text = build_prompt(loaded.chat_template, QUESTION, n_images, system=None, family=FAM)
            prompt = Prompt(text=text, images=[image] * n_images)
            ours, stats = session_logits(
                lambda: backend.MlxSession(loaded, SamplingParams(), n_ctx=1024), prompt
            )
            ref, ids = hf_logits(moe_hf, moe_ckpt, text, prompt.images, FAM.image_pad)
            assert stats.image_tokens == 70 * n_images
            err = float(np.abs(ours - ref).max())
            print(f"\nQwen3-VL-MoE MLX, {n_images} image(s): max |logit diff| vs transformers {err:.3g}")
            assert err < atol and int(ours.argmax()) == int(ref.argmax())
    finally:
        loaded.close()


@pytest.mark.mlx
@pytest.mark.slow
def test_mlx_4bit_conversion_quantises_the_experts_and_answers(moe_ckpt, tmp_path):
    pytest.importorskip("mlx_vlm")
    from qvq_local.convert.to_mlx import convert_to_mlx

    from qvq_local import api

    out = convert_to_mlx(moe_ckpt, tmp_path / "q4", bits=4, group_size=64)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization"]["bits"] == 4
    from qvq_local.formats.safetensors import SafetensorsFile

    names = set()
    for f in out.glob("*.safetensors"):
        st = SafetensorsFile(f)
        names |= set(st)
        st.close()
    assert "language_model.model.layers.0.mlp.switch_mlp.gate_proj.scales" in names
    image = tmp_path / "chart.png"
    chart_image().save(image)
    with api.load(str(out), backend="mlx") as model:
        result = model.ask(str(image), QUESTION, think_budget=6, answer_budget=3, system="")
    assert result.images[0].tokens == 70 and result.forced and result.forced[0].text.endswith("</think>\n\n")


# ---------------------------------------------------------------- a checkpoint made by transformers


@pytest.fixture(scope="session")
def moe_saved_by_transformers(artifacts, moe_ckpt) -> Path:
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    return save_with_transformers(moe_ckpt, artifacts / "q3moe-transformers", HF_CLASS)


def test_transformers_save_pretrained_layout_reads(moe_saved_by_transformers):
    """transformers 5 writes the experts in its own layout ([experts, 2 x width, hidden]) and num_local_experts:
    the family reads both, and knows what to transpose back for mlx-vlm."""
    from qvq_local.convert.checkpoint import open_checkpoint

    cfg = json.loads((moe_saved_by_transformers / "config.json").read_text())
    assert "num_experts" not in cfg["text_config"] and cfg["text_config"]["num_local_experts"] == 8
    ckpt = open_checkpoint(moe_saved_by_transformers)
    name = "model.language_model.layers.2.mlp.experts.gate_up_proj"
    assert ckpt.shape(name) == (8, 1024, 256)
    layout = FAM.published_layout(ckpt.text, {n: ckpt.shape(n) for n in ckpt.names})
    assert layout[name] == (0, 2, 1) and len(layout) == 6
    published = FAM.published_config(ckpt.config)
    assert published["text_config"]["num_experts"] == 8 and published["text_config"]["rope_theta"] == 5e6
    ckpt.release()


@pytest.mark.mlx
@pytest.mark.parity
@pytest.mark.slow
def test_checkpoint_saved_by_transformers_converts_and_matches_on_mlx(moe_saved_by_transformers, artifacts):
    import numpy as np
    from qvq_local.convert.to_mlx import convert_to_mlx

    from qvq_local.backends import mlx as backend
    from qvq_local.backends.base import Prompt, SamplingParams
    from qvq_local.prompt import build_prompt

    out = convert_to_mlx(moe_saved_by_transformers, artifacts / "q3moe-transformers-mlx", bits=None)
    ref_model = hf_model(moe_saved_by_transformers, HF_CLASS)
    loaded = backend.load(out)
    try:
        for n_images, atol in ((0, TEXT_ATOL), (1, IMAGE_ATOL)):
            text = build_prompt(loaded.chat_template, QUESTION, n_images, system=None, family=FAM)
            prompt = Prompt(text=text, images=[chart_image()] * n_images)
            ours, _ = session_logits(lambda: backend.MlxSession(loaded, SamplingParams(), n_ctx=1024), prompt)
            ref, _ = hf_logits(ref_model, moe_saved_by_transformers, text, prompt.images, FAM.image_pad)
            err = float(np.abs(ours - ref).max())
            print(
                f"\nQwen3-VL-MoE saved by transformers, MLX, {n_images} image(s): max |logit diff| {err:.3g}"
            )
            assert err < atol and int(ours.argmax()) == int(ref.argmax())
    finally:
        loaded.close()


def test_checkpoint_saved_by_transformers_converts_to_gguf_with_the_experts_in_place(
    moe_saved_by_transformers, moe_ckpt, tmp_path
):
    """Its experts are already in llama.cpp's order: split, not transposed."""
    import numpy as np
    from qvq_local.convert.checkpoint import open_checkpoint
    from qvq_local.convert.to_gguf import convert_to_gguf

    pair = convert_to_gguf(moe_saved_by_transformers, tmp_path, quant="f32", mmproj_quant="f32")
    _, tensors = _gguf(pair.model)
    ckpt = open_checkpoint(moe_saved_by_transformers)
    gate_up = ckpt.read_f32("model.language_model.layers.0.mlp.experts.gate_up_proj")
    assert np.array_equal(np.asarray(tensors["blk.0.ffn_up_exps.weight"].data), gate_up[:, 512:])
    ckpt.release()


@pytest.mark.llama
@pytest.mark.parity
@pytest.mark.slow
def test_checkpoint_saved_by_transformers_matches_on_llama(moe_saved_by_transformers, tmp_path):
    pytest.importorskip("llama_cpp")
    from qvq_local.convert.to_gguf import convert_to_gguf

    from qvq_local.backends import llamacpp

    pair = convert_to_gguf(moe_saved_by_transformers, tmp_path, quant="f32", mmproj_quant="f32")
    model = llamacpp.load(pair.model, pair.mmproj)
    try:
        _llama_parity(
            model,
            hf_model(moe_saved_by_transformers, HF_CLASS),
            moe_saved_by_transformers,
            "saved by transformers,",
        )
    finally:
        model.close()


OWN_ROOMS = {
    ("families", "qwen3vl_moe.py"),
    ("convert", "gguf_qwen3vl_moe.py"),
    ("convert", "synth_qwen3vl_moe.py"),
}


def test_only_the_family_modules_name_qwen3vl_moe():
    """No code outside the family's own rooms spells its identifiers (string constants)."""
    import ast
    import re

    idents = (HF_CLASS, "qwen3_vl_moe", "qwen3vlmoe", "qwen3_vl_moe_text")
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


def test_catalogue_names_the_30b_a3b_thinking_model():
    from qvq_local import catalogue

    entry = catalogue.lookup("qwen3-vl-30b-a3b")
    assert entry.title == "Qwen3-VL-30B-A3B-Thinking" and entry.family == FAM.name
    assert entry.shape in FAM.synth_shapes and entry.other.ref == "Qwen/Qwen3-VL-30B-A3B-Thinking-GGUF:Q4_K_M"
    assert not entry.other.size_checked and not entry.apple.size_checked  # estimates (see catalogue.py)
