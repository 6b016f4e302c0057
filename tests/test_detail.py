"""Image detail levels: the image tokens each level gives on each family's grid, and the default each kind
of machine gets (from recorded machine facts, tests/data/machines/)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qvq_local import detail
from qvq_local.errors import InputError
from qvq_local.families import FAMILIES
from qvq_local.families.qwen2_5vl import FAMILY as QWEN2_5VL
from qvq_local.families.qwen2vl import FAMILY as QWEN2VL
from qvq_local.families.qwen3vl import FAMILY as QWEN3VL

MACHINES = Path(__file__).parent / "data" / "machines"

#: (family, level) -> (pixel bound, side of the largest square on the grid, its image tokens): the table
#: in qvq_local/detail.py's docstring and README's, computed by hand from the grids (28 and 32 px).
EXPECTED = {
    (QWEN2VL, "low"): (200_704, 448, 256),
    (QWEN2VL, "medium"): (451_584, 672, 576),
    (QWEN2VL, "high"): (1_003_520, 980, 1225),
    (QWEN2VL, "max"): (12_845_056, 3584, 16_384),
    (QWEN2_5VL, "low"): (200_704, 448, 256),
    (QWEN2_5VL, "high"): (1_003_520, 980, 1225),
    (QWEN3VL, "low"): (262_144, 512, 256),
    (QWEN3VL, "medium"): (589_824, 768, 576),
    (QWEN3VL, "high"): (1_310_720, 1120, 1225),
    (QWEN3VL, "max"): (16_777_216, 4096, 16_384),
}


@pytest.mark.parametrize(("family", "level"), list(EXPECTED), ids=lambda x: getattr(x, "name", x))
def test_each_level_bounds_each_family_grid_to_its_documented_tokens(family, level):
    pixels, side, tokens = EXPECTED[(family, level)]
    assert detail.max_pixels(level, family) == pixels
    assert detail.square_side(level, family) == side
    assert detail.square_tokens(level, family) == tokens
    # the family's own resize rule (transformers' smart_resize) keeps a square a little larger than that
    # side at that grid, and shrinks a larger one to within the bound
    w, h = family.smart_resize(side + 10, side + 10, max_pixels=pixels, min_pixels=detail.min_pixels(family))
    assert (w, h) == (side, side) and family.image_tokens(w, h) == tokens
    w, h = family.smart_resize(3 * side, 2 * side, max_pixels=pixels)
    assert w * h <= pixels and family.image_tokens(w, h) <= detail.max_tokens(level, family)


@pytest.mark.parametrize("family", list(FAMILIES.values()), ids=lambda f: f.name)
def test_no_image_exceeds_its_levels_token_budget_whatever_its_shape(family):
    for level in detail.LEVELS:
        budget = detail.max_tokens(level, family)
        for size in ((4000, 3000), (1920, 1080), (300, 5000), (10_000, 100), (640, 480)):
            w, h = family.smart_resize(*size, max_pixels=detail.max_pixels(level, family))
            assert family.image_tokens(w, h) <= budget, (level, size)


def test_budgets_are_qwens_guidance_and_grounding_needs_high():
    assert [detail.max_tokens(level) for level in detail.LEVELS] == [256, 576, 1280, 16_384]
    assert detail.max_tokens("high") >= 1024  # grounding and small text (llama.cpp's warning)
    # low is today's bound: 448x448, the images module's default
    from qvq_local.images import DEFAULT_MAX_PIXELS

    assert detail.max_pixels("low", QWEN2VL) == DEFAULT_MAX_PIXELS == 448 * 448


def test_qwen3vl_keeps_its_larger_minimum():
    assert detail.min_pixels(QWEN3VL) == 65_536
    assert detail.min_pixels(QWEN2VL) == 56 * 56
    w, h = QWEN3VL.smart_resize(
        64, 64, min_pixels=detail.min_pixels(QWEN3VL), max_pixels=detail.max_pixels("low", QWEN3VL)
    )
    assert w * h >= 65_536 and QWEN3VL.image_tokens(w, h) == 64


def test_levels_are_checked_by_name():
    assert detail.check_level(" High ") == "high"
    assert detail.check_level("auto") == "auto"
    with pytest.raises(
        InputError, match=r"--detail must be low \| medium \| high \| max \| auto, got 'huge'"
    ):
        detail.check_level("huge")
    with pytest.raises(InputError, match="the detail setting must be"):
        detail.check_level("", "the detail setting")


def _machine(name: str, encoder: str | None = None) -> detail.Machine:
    facts = json.loads((MACHINES / f"{name}.json").read_text())
    return detail.Machine.from_facts(facts, encoder)


@pytest.mark.parametrize(
    ("machine", "level", "reason"),
    [
        ("apple-m2-pro", "high", "Metal GPU"),
        ("cuda-h200", "high", "CUDA GPU"),
        ("cpu-2-core", "low", "2-core CPU"),
        ("cpu-16-core", "medium", "16-core CPU"),
    ],
)
def test_the_default_follows_the_machine_class(machine, level, reason):
    choice = detail.machine_default(_machine(machine))
    assert choice.level == level and choice.source == "machine"
    assert reason in choice.reason
    assert detail.resolve(None, _machine(machine)) == choice
    assert detail.resolve("auto", _machine(machine)) == choice


def test_a_gpu_machine_whose_model_encodes_on_the_cpu_gets_the_cpu_default():
    # --gpu-layers 0 on the H200 box: the backend says the image is encoded on the CPU (16 cores)
    assert detail.machine_default(_machine("cuda-h200", "cpu")).level == "medium"
    # a remote server encodes for any machine, even a 2-core laptop
    remote = detail.machine_default(_machine("cpu-2-core", "remote"))
    assert remote.level == "high" and "server" in remote.reason


def test_the_cpu_estimate_scales_with_the_cores_and_picks_within_the_target():
    for cores in (1, 2, 4, 8, 16, 32, 64, 128):
        level = detail.machine_default(detail.Machine("cpu", cpu_count=cores)).level
        assert level in ("low", "medium", "high")
        if level != "low":
            assert detail.estimate_cpu_encode_s(level, cores) <= detail.CPU_ENCODE_TARGET_S
        higher = detail.LEVELS[detail.LEVELS.index(level) + 1]
        if higher != "max":
            assert detail.estimate_cpu_encode_s(higher, cores) > detail.CPU_ENCODE_TARGET_S
    assert detail.estimate_cpu_encode_s("low", 2) == pytest.approx(detail.CPU_CORE_SECONDS["low"] / 2)
    assert detail.estimate_cpu_encode_s("max", 2) is None  # not measured, never a default


def test_an_explicit_level_wins_and_says_where_it_came_from():
    choice = detail.resolve("max", _machine("cpu-2-core"), source="the detail setting")
    assert choice == detail.Choice("max", "the detail setting")
    assert choice.label(QWEN2VL) == "detail max (<= 16,384 image tokens; from the detail setting)"
    default = detail.resolve(None, _machine("cuda-h200"))
    assert default.label(QWEN3VL).startswith("detail high (<= 1,280 image tokens; default: CUDA GPU")
    assert detail.resolve(None, None).level == "low"  # nothing known of the machine: today's bound


def test_help_names_every_level_with_its_tokens():
    text = detail.help_table()
    for part in ("low 256 tokens", "medium 576 tokens", "high 1280 tokens", "max the processor's limit"):
        assert part in text
    assert "448px/512px" in text and "980px/1120px" in text


# ------------------------------------------------------------------------------------------ qvq doctor


def _recorded_machine(monkeypatch, name: str) -> dict:
    """Make ``qvq doctor`` see the recorded machine ``name`` (its platform facts and its backends')."""
    from qvq_local import hardware
    from qvq_local.backends import registry

    facts = json.loads((MACHINES / f"{name}.json").read_text())
    facts.update(os_release="recorded", python="3.x", memory_available_bytes=facts["memory_total_bytes"])
    monkeypatch.setattr(hardware, "describe", lambda probe_gpu=False: dict(facts))
    monkeypatch.setattr(registry, "machine_facts", lambda f: f)
    monkeypatch.setenv("COLUMNS", "250")  # one line per row of the table
    return facts


@pytest.mark.parametrize(
    ("machine", "level", "words"),
    [
        ("apple-m2-pro", "high", "Metal GPU encodes the images"),
        ("cuda-h200", "high", "CUDA GPU encodes the images"),
        ("cpu-2-core", "low", "2-core CPU"),
        ("cpu-16-core", "medium", "16-core CPU"),
    ],
)
def test_doctor_shows_the_default_detail_of_each_machine_class(monkeypatch, machine, level, words):
    from typer.testing import CliRunner

    from qvq_local.cli import app

    _recorded_machine(monkeypatch, machine)
    result = CliRunner().invoke(app, ["doctor", "--json"])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)["detail"]
    assert (shown["level"], shown["source"]) == (level, "machine") and words in shown["reason"]
    assert shown["max_image_tokens"] == detail.max_tokens(level)
    assert ("cpu_encode_s_estimate" in shown) == machine.startswith("cpu")
    result = CliRunner().invoke(app, ["doctor"], terminal_width=250)
    line = next(x.strip() for x in result.output.splitlines() if x.strip().startswith("image detail"))
    assert f"{level} (<= {detail.max_tokens(level):,} image tokens per image), this machine's default" in line
    assert words in line and "qvq config set detail LEVEL" in line


def test_doctor_shows_the_detail_setting_beside_the_machines_default(monkeypatch):
    from typer.testing import CliRunner

    from qvq_local.cli import app

    _recorded_machine(monkeypatch, "cpu-2-core")
    runner = CliRunner()
    assert runner.invoke(app, ["config", "set", "detail", "HIGH"]).output.strip() == "detail = high"
    bad = runner.invoke(app, ["config", "set", "detail", "ultra"])
    assert bad.exit_code == 2 and "the detail level must be low | medium | high | max | auto" in bad.output
    shown = json.loads(runner.invoke(app, ["doctor", "--json"]).output)["detail"]
    assert (shown["level"], shown["source"]) == ("high", "the detail setting")
    assert shown["machine_default"]["level"] == "low"
    line = next(
        x
        for x in runner.invoke(app, ["doctor"], terminal_width=250).output.splitlines()
        if "image detail" in x
    )
    assert "from the detail setting; this machine's default is low (2-core CPU" in line
    assert "s to encode one image here (estimated)" in line
