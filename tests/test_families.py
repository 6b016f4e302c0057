"""The family registry and the Qwen2-VL family module: its facts, and that it is the only place for them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from qvq_local import families
from qvq_local.errors import InputError, ModelError
from qvq_local.families import (
    DEFAULT_FAMILY,
    FAMILIES,
    describe_supported,
    family_for_config,
    family_for_gguf_arch,
    family_for_model_type,
    family_for_projector,
    qwen2vl,
)


def test_registry_finds_qwen2vl_from_every_side():
    fam = FAMILIES["Qwen2-VL"]
    assert fam is DEFAULT_FAMILY is qwen2vl.FAMILY
    assert family_for_config({"architectures": ["Qwen2VLForConditionalGeneration"]}) is fam
    assert family_for_config({"model_type": "qwen2_vl"}) is fam  # no architectures: model_type decides
    assert (
        family_for_config({"architectures": ["LlavaForConditionalGeneration"], "model_type": "qwen2_vl"})
        is None
    )
    # Qwen2.5-VL is its own family (tests/test_family_qwen2_5vl.py), though its text GGUF is qwen2vl too
    assert family_for_config({"architectures": ["Qwen2_5_VLForConditionalGeneration"]}) is not fam
    assert family_for_model_type("qwen2_vl") is fam and family_for_model_type("llava") is None
    assert family_for_gguf_arch("qwen2vl") is fam and family_for_gguf_arch("llama") is None
    assert (
        family_for_projector("qwen2vl_merger") is fam and family_for_projector("qwen2.5vl_merger") is not fam
    )
    assert "Qwen2VLForConditionalGeneration (QVQ / Qwen2-VL)" in describe_supported()


def test_gguf_identifiers_are_gguf_pys_own_constants():
    import gguf

    fam = qwen2vl.FAMILY
    assert fam.gguf_text_arch == gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.QWEN2VL] == "qwen2vl"
    assert fam.gguf_projector == gguf.VisionProjectorType.QWEN2VL == "qwen2vl_merger"


def test_gguf_tensor_maps_name_tensors_llama_cpp_knows(tiny_checkpoint):
    """Every GGUF name the converter writes is one of gguf-py's names for the qwen2vl / clip architectures."""
    import gguf
    from qvq_local.convert.checkpoint import open_checkpoint
    from qvq_local.convert.gguf_converter import converter_for
    from qvq_local.convert.gguf_qwen2vl import Qwen2VLConverter

    def known(arch) -> set[str]:
        return {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[arch]}

    conv = converter_for(open_checkpoint(tiny_checkpoint))
    assert type(conv) is Qwen2VLConverter
    names = dict(conv.text_tensor_names())
    text = known(gguf.MODEL_ARCH.QWEN2VL)
    for name in ("token_embd.weight", "output_norm.weight", "output.weight"):  # the global tensors
        assert name in names.values() and name.rsplit(".", 1)[0] in text
    for name in Qwen2VLConverter.text_layer_map.values():
        assert "blk.{bid}." + name.rsplit(".", 1)[0] in text
    vision = known(gguf.MODEL_ARCH.MMPROJ)
    for name in Qwen2VLConverter.mmproj_block_map.values():
        assert "v.blk.{bid}." + name.rsplit(".", 1)[0] in vision
    for name in Qwen2VLConverter.mmproj_merger_map.values():
        stem = name.rsplit(".", 1)[0]
        assert stem in vision or stem.replace(".0", ".{bid}").replace(".2", ".{bid}") in vision
    assert names["model.layers.1.mlp.down_proj.weight"] == "blk.1.ffn_down.weight"
    assert "visual.blocks.0.attn.qkv.weight" not in names


@pytest.mark.parametrize(
    ("size", "bounds", "grid"),
    [
        ((640, 480), {}, (23, 17)),  # rounded to 644x476
        ((56, 56), {"min_pixels": 8 * 28 * 28}, (3, 3)),  # scaled up (ceil) to reach the minimum
        ((4000, 3000), {"max_pixels": 448 * 448}, (18, 13)),  # scaled down (floor) under the maximum
        ((10, 10), {}, (1, 1)),  # never below one token
    ],
)
def test_image_grid_is_smart_resize(size, bounds, grid):
    """Values worked by hand from transformers' smart_resize (round, then floor/ceil by sqrt of the ratio)."""
    assert qwen2vl.FAMILY.image_grid(*size, **bounds) == grid
    w, h = qwen2vl.FAMILY.smart_resize(*size, **bounds)
    assert (w, h) == (grid[0] * 28, grid[1] * 28)
    assert qwen2vl.FAMILY.image_tokens(w, h) == grid[0] * grid[1]


def test_image_grid_refuses_an_empty_image():
    with pytest.raises(InputError, match="0x5"):
        qwen2vl.FAMILY.smart_resize(0, 5)


def _config(**over):
    cfg = {
        "architectures": ["Qwen2VLForConditionalGeneration"],
        "hidden_size": 256,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_hidden_layers": 2,
        "intermediate_size": 768,
        "vocab_size": 1280,
        "rope_scaling": {"type": "mrope", "mrope_section": [8, 12, 12]},
        "vision_config": {"embed_dim": 128, "depth": 2, "num_heads": 4, "hidden_size": 256},
    }
    cfg.update(over)
    return cfg


def test_dims_from_config_reads_both_layouts():
    text, vision = qwen2vl.FAMILY.dims_from_config(_config(), Path("config.json"))
    assert (text.head_dim, text.num_kv_heads, text.mrope_section) == (64, 2, (8, 12, 12))
    assert (vision.patch_size, vision.spatial_merge_size, vision.merged_dim, vision.mlp_dim) == (
        14,
        2,
        512,
        512,
    )
    flat = _config()
    nested = {k: v for k, v in flat.items() if k in ("architectures", "vision_config")}
    nested["text_config"] = {k: v for k, v in flat.items() if k not in nested}
    assert qwen2vl.FAMILY.dims_from_config(nested, Path("config.json")) == (text, vision)


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"hidden_size": None}, "missing or non-numeric 'hidden_size'"),
        ({"num_attention_heads": 3}, "do not divide"),
        ({"rope_scaling": {}}, "mrope_section"),
        ({"rope_scaling": {"mrope_section": [8, 8, 8]}}, "must sum to head_dim/2 = 32"),
        ({"vision_config": None}, "no vision_config"),
        ({"vision_config": {"embed_dim": 128, "depth": 2, "num_heads": 4, "hidden_size": 512}}, "must equal"),
    ],
)
def test_dims_from_config_names_the_file_and_the_problem(over, message):
    with pytest.raises(ModelError, match=message) as info:
        qwen2vl.FAMILY.dims_from_config(_config(**over), Path("/m/config.json"))
    assert "/m/config.json" in str(info.value)


def test_expected_shapes_follow_the_config():
    text, vision = qwen2vl.FAMILY.dims_from_config(_config(), Path("config.json"))
    shapes = qwen2vl.FAMILY.expected_shapes(text, vision)
    assert shapes["model.layers.1.self_attn.k_proj.weight"] == (128, 256)  # 2 kv heads x 64
    assert shapes["visual.patch_embed.proj.weight"] == (128, 3, 2, 14, 14)
    assert shapes["visual.merger.mlp.0.weight"] == (512, 512)
    assert shapes["visual.merger.mlp.2.weight"] == (256, 512)
    assert "lm_head.weight" in shapes and "model.layers.2.mlp.up_proj.weight" not in shapes
    tied, _ = qwen2vl.FAMILY.dims_from_config(_config(tie_word_embeddings=True), Path("config.json"))
    assert "lm_head.weight" not in qwen2vl.FAMILY.expected_shapes(tied, vision)


def test_synthetic_shapes_are_consistent_with_the_family_rules():
    for shape in qwen2vl.FAMILY.synth_shapes.values():
        assert sum(shape.mrope_section) * 2 == shape.head_dim, shape.name
        assert shape.num_attention_heads % shape.num_key_value_heads == 0, shape.name
        assert shape.vocab_size >= shape.tokenizer_base + len(qwen2vl.FAMILY.special_tokens), shape.name


# ------------------------------------------------------------------------------------------ one place

#: A family's identifiers that only its module under families/ may spell out (string constants).
FAMILY_STRINGS = {
    *("Qwen2VLForConditionalGeneration", "qwen2_vl", "qwen2vl", "qwen2vl_merger"),
    *("Qwen2_5_VLForConditionalGeneration", "qwen2_5_vl", "qwen2.5vl_merger"),
}
#: The 28-pixel grid (patch 14 x merge 2) as an integer literal.
GRID_LITERAL = 28


def _family_literals(source: str) -> list[tuple[int, str]]:
    """(line, what) for each string constant naming a family id, and each 28 that is not a dict key.

    Docstrings (a string standing alone as a statement) and comments are prose, not code: they don't count.
    """
    import ast

    tree = ast.parse(source)
    dict_keys = {id(k) for node in ast.walk(tree) if isinstance(node, ast.Dict) for k in node.keys if k}
    prose = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Expr)}
    hits = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Constant) or id(node) in prose:
            continue
        if isinstance(node.value, str) and any(
            re.search(rf"(?<![\w.]){re.escape(ident)}(?![\w])", node.value) for ident in FAMILY_STRINGS
        ):
            hits.append((node.lineno, repr(node.value)[:60]))
        # a dict key 28 is a table index (ggml type ids), not the grid
        elif type(node.value) is int and node.value == GRID_LITERAL and id(node) not in dict_keys:
            hits.append((node.lineno, "28"))
    return hits


def test_no_module_outside_families_names_a_family():
    """Docstrings and comments may mention the family; code asks qvq_local.families instead."""
    root = Path(__file__).resolve().parents[1]
    sources = [*(root / "qvq_local").rglob("*.py"), *(root / "convert").rglob("*.py")]
    families = root / "qvq_local" / "families"
    checked, offenders = 0, []
    for path in sources:
        if families in path.parents:
            continue
        checked += 1
        for line, what in _family_literals(path.read_text(encoding="utf-8")):
            offenders.append(f"{path.relative_to(root)}:{line}: {what}")
    assert checked > 30
    assert offenders == [], "family facts outside qvq_local/families/:\n" + "\n".join(offenders)


@pytest.mark.parametrize(
    ("source", "found"),
    [
        ('ARCH = "qwen2vl"', True),
        ('x = {"model_type": "qwen2_vl"}', True),
        ('p = f"projector {p} is not qwen2vl_merger"', True),
        ("grid = size // 28", True),
        ('"""A docstring about qwen2vl."""\nx = 1\n"""An attribute doc: qwen2vl_merger, 28 px."""', False),
        ("# only a comment: qwen2vl_merger, 28 px\nx = 1", False),
        ('def f():\n    """Doc: qwen2_vl."""\n    return "qwen2_vl"', True),
        ('x = "qwen2.5vl_merger"', True),
        ('x = "qwen2.5vl_mergers"; y = "qwen2_vl_surgery"; n = 280', False),
        ("TABLE = {28: (1, 8)}", False),
    ],
)
def test_the_guard_sees_literals_and_only_literals(source, found):
    assert bool(_family_literals(source)) is found


#: Methods the base class implements once for every family, from the family's own attributes, or with the
#: answer most families share (the published layout is the only one they read; norm weights near 1).
_SHARED_METHODS = {
    "matches_config",
    "image_grid",
    "image_tokens",
    "is_vision_tensor",
    "is_unit_norm_weight",
    "layout_shapes",
    "published_layout",
    "published_config",
    "takes_video",
    "video_time_scale",
}


def test_every_family_fills_the_whole_interface():
    """A new family that forgets one of the attributes generic code reads fails here, not at run time;
    each one converts and synthesises through the classes registered under its name."""
    from qvq_local.convert.gguf_converter import GgufConverter, converter_class
    from qvq_local.convert.synth_writer import SynthWriter, writer_for

    from qvq_local.families import FAMILIES
    from qvq_local.families.base import Family

    declared = [k for k in Family.__annotations__ if not k.startswith("_")]
    methods = [
        k
        for k, v in vars(Family).items()
        if callable(v) and not k.startswith("_") and k not in _SHARED_METHODS
    ]
    assert {"image_block", "sampling", "answer_markers", "llama_image_tokens"} <= set(declared)
    for family in FAMILIES.values():
        for attr in declared:
            assert hasattr(family, attr), f"{family.name} does not set {attr}"
        for name in methods:
            assert getattr(type(family), name) is not getattr(Family, name), f"{family.name} lacks {name}()"
        assert family.gguf_text_arch and family.gguf_projector
        # --family names it, and the bench's cache folders are prefixed with its first alias
        assert family.aliases and family.aliases[0] == family.name.lower()
        assert issubclass(converter_class(family), GgufConverter), family.name
        writer = writer_for(family)
        assert isinstance(writer, SynthWriter) and writer.family is family


def test_family_modules_hold_facts_only():
    """The family modules import nothing from the converter (its per-family classes import them), nor a
    heavy library at import time; of the package, only errors and the plugin loader (a plugin's family
    registers when the registry is first imported)."""
    import ast

    root = Path(__file__).resolve().parents[1] / "qvq_local" / "families"
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                assert not name.startswith(("qvq_local.convert", "convert")), f"{path.name} imports {name}"
                assert name.split(".")[0] != "qvq_local" or name.startswith(
                    ("qvq_local.families", "qvq_local.errors", "qvq_local.plugins")
                ), f"{path.name} imports {name}"


def test_register_refuses_a_duplicate_or_incomplete_family():
    from qvq_local.families import register
    from qvq_local.families.base import Family

    with pytest.raises(ValueError, match="already registered"):
        register(qwen2vl.Qwen2VLFamily())
    with pytest.raises(ValueError, match="does not declare"):
        register(type("Half", (Family,), {"name": "Half"})())
    with pytest.raises(TypeError):
        register("Qwen2-VL")


@pytest.mark.parametrize(
    ("name", "merger_key", "embed_key"),
    [
        ("Qwen2-VL", "hidden_size", "embed_dim"),
        ("Qwen2.5-VL", "out_hidden_size", "hidden_size"),
        ("Qwen3-VL", "out_hidden_size", "hidden_size"),
    ],
)
def test_every_family_refuses_a_vision_tower_that_does_not_fit(name, merger_key, embed_key, tmp_path):
    """The two width rules (families/base.check_vision_widths), in each family's own config keys."""
    import copy

    from helpers import assert_error
    from qvq_local.convert import synthetic

    from qvq_local.errors import ModelError
    from qvq_local.families import FAMILIES

    family = FAMILIES[name]
    config = synthetic.build_config(synthetic.get_shape("tiny", family), "bf16")
    path = tmp_path / "config.json"
    family.dims_from_config(config, path)  # the tiny config itself is fine

    wide = copy.deepcopy(config)
    wide["vision_config"][merger_key] += 64
    with pytest.raises(ModelError) as err:
        family.dims_from_config(wide, path)
    assert_error(err.value, f"vision_config.{merger_key}", "merger output", "must equal", path=path)

    odd = copy.deepcopy(config)
    odd["vision_config"]["num_heads"] = 7
    with pytest.raises(ModelError) as err:
        family.dims_from_config(odd, path)
    assert_error(err.value, f"vision {embed_key}", "not divisible by num_heads 7", path=path)


def test_synth_and_bench_help_list_the_registered_families_and_their_shapes():
    """``--family`` and ``--shape`` help are built from the family registry, not typed out in cli.py."""
    from typer.testing import CliRunner

    from qvq_local.cli import app

    for command in ("synth", "bench"):
        out = CliRunner().invoke(app, [command, "--help"], terminal_width=400).stdout
        flat = " ".join(out.replace("│", " ").split())
        assert families.family_choices() in flat and families.shape_choices() in flat
        for family in families.FAMILIES.values():
            assert families.choice_name(family) in flat
            assert all(shape in flat for shape in family.synth_shapes)
