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


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    """Each test its own settings file (a stored detail or max_pixels would leak into the next)."""
    monkeypatch.setenv("QVQ_HOME", str(tmp_path / "home"))


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
    assert (
        detail.image_bound(QWEN2VL, choice).label()
        == "detail max (<= 16,384 image tokens; from the detail setting)"
    )
    default = detail.resolve(None, _machine("cuda-h200"))
    bound = detail.image_bound(QWEN3VL, default)
    assert bound.label().startswith("detail high (<= 1,280 image tokens; default: CUDA GPU")
    assert (bound.max_pixels, bound.min_pixels, bound.factor) == (1_310_720, 65_536, 32)
    # a pixel bound wins over any level, and says where it came from
    pixels = detail.image_bound(QWEN3VL, default, pixels=100_000, source="--max-pixels")
    assert (pixels.level, pixels.max_pixels, pixels.min_pixels) == (None, 100_000, 65_536)
    assert pixels.label() == "max pixels 100,000 (<= 97 image tokens; from --max-pixels)"
    assert detail.resolve(None, None).level == "low"  # nothing known of the machine: today's bound


def test_help_names_every_level_with_its_tokens():
    text = detail.help_table()
    assert "low 256, medium 576, high 1280, max 16,384 (the processor's limit) image tokens" in text
    assert "448/672/980/3584 px on Qwen2-VL's" in text and "512/768/1120/4096 px on Qwen3-VL's grid" in text


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


# ------------------------------------------------------------------------------------------ qvq ask


class _Loaded:
    """A fake loaded model (tests/fakes.py's scripted session) of QVQ's family."""

    backend = name = "fake"
    quantization = "none"
    chat_template = None
    context_length = 32768

    def __init__(self):
        self.generation_config: dict = {}

    def image_token_estimate(self, width, height):
        return QWEN2VL.image_tokens(*QWEN2VL.smart_resize(width, height))

    def tokenize(self, text, *, special=False):
        from fakes import chop

        return chop(text)

    def new_session(self, sampling, *, n_ctx=None):
        from fakes import ScriptedSession

        return ScriptedSession("thinking " * 4, "It is \\boxed{5}.")

    def close(self):
        pass


@pytest.fixture
def big_photo(tmp_path) -> Path:
    from PIL import Image

    path = tmp_path / "photo.png"
    Image.new("RGB", (2400, 1800), (30, 120, 200)).save(path)
    return path


def _ask(monkeypatch, image, *args, cores=2, encoder="cpu"):
    """``qvq ask`` on the fake model (piped: the plain header on stderr), on a machine of ``cores`` whose
    backend encodes images on ``encoder``; returns (stderr's header line, the JSON's settings, image)."""
    from fakes import FAKE_BACKEND
    from typer.testing import CliRunner

    from qvq_local import api, cpu
    from qvq_local.cli import app
    from qvq_local.model import Model

    monkeypatch.setattr(
        api, "load", lambda ref, **kw: Model(_Loaded(), name="fake", spec=FAKE_BACKEND, quantization="q")
    )
    monkeypatch.setattr(cpu, "usable_cores", lambda: cores)
    monkeypatch.setattr(Model, "run_facts", lambda self: {"image_encoder": encoder})
    runner = CliRunner()
    plain = runner.invoke(app, ["ask", str(image), "How many?", "-m", "x", *args])
    assert plain.exit_code == 0, plain.output
    header = plain.stderr.splitlines()[0]
    shown = runner.invoke(app, ["ask", str(image), "How many?", "-m", "x", "--json", *args])
    assert shown.exit_code == 0, shown.output
    qvq = json.loads(shown.stdout)["qvq"]
    return header, qvq["settings"], qvq["images"][0]


@pytest.mark.parametrize(
    ("cores", "encoder", "level", "words"),
    [
        (2, "cpu", "low", "default: 2-core CPU: ~11 s an image"),
        (16, "cpu", "medium", "default: 16-core CPU: ~4 s an image"),
        (16, "gpu", "high", "default: a GPU encodes the images"),
    ],
)
def test_the_ask_header_and_json_show_the_machines_default(
    monkeypatch, big_photo, cores, encoder, level, words
):
    header, settings, image = _ask(monkeypatch, big_photo, cores=cores, encoder=encoder)
    budget = detail.max_tokens(level)
    assert f"detail {level} (<= {budget:,} image tokens; {words}" in header
    assert settings["detail"]["level"] == level and settings["detail"]["source"] == "machine"
    assert settings["max_pixels"] == detail.max_pixels(level, QWEN2VL)
    w, h = image["size"]
    assert w * h <= detail.max_pixels(level) and QWEN2VL.image_tokens(w, h) <= budget
    assert QWEN2VL.image_tokens(w, h) > budget * 0.8  # a 2400x1800 photo fills the budget


def test_the_bound_comes_from_the_command_line_then_the_settings_then_the_machine(monkeypatch, big_photo):
    from typer.testing import CliRunner

    from qvq_local.cli import app

    _, settings, _ = _ask(monkeypatch, big_photo, "--detail", "medium")
    assert (settings["detail"]["level"], settings["detail"]["source"]) == ("medium", "--detail")
    runner = CliRunner()
    runner.invoke(app, ["config", "set", "detail", "high"])
    header, settings, _ = _ask(monkeypatch, big_photo)
    assert (settings["detail"]["level"], settings["detail"]["source"]) == ("high", "the detail setting")
    assert "detail high (<= 1,280 image tokens; from the detail setting)" in header
    runner.invoke(app, ["config", "set", "max_pixels", "100000"])
    _, settings, image = _ask(monkeypatch, big_photo)  # in the settings file, a pixel bound wins
    assert (settings["detail"]["source"], settings["max_pixels"]) == ("the max_pixels setting", 100_000)
    _, settings, _ = _ask(monkeypatch, big_photo, "--detail", "low")  # the command line beats the file
    assert (settings["detail"]["level"], settings["detail"]["source"]) == ("low", "--detail")
    _, settings, _ = _ask(monkeypatch, big_photo, "--detail", "max", "--max-pixels", "50000")
    assert (settings["detail"]["level"], settings["max_pixels"]) == (None, 50_000)
    bad = runner.invoke(app, ["ask", str(big_photo), "q", "-m", "x", "--detail", "ultra"])
    assert bad.exit_code == 2 and bad.stderr.strip() == (
        "error: --detail must be low | medium | high | max | auto, got 'ultra'"
    )


def test_qwen3vl_images_keep_its_minimum_and_its_grid(monkeypatch, tmp_path):
    from PIL import Image

    from qvq_local.images import SourceImage, prepare_images

    small = SourceImage(Image.new("RGB", (40, 30)), "small.png")
    bound = detail.image_bound(QWEN3VL, detail.Choice("low", "--detail"))
    (prepared,) = prepare_images([small], bound.max_pixels, factor=bound.factor, min_pixels=bound.min_pixels)
    w, h = prepared.info.size
    assert w % 32 == 0 and h % 32 == 0 and w * h >= 65_536  # scaled up to Qwen3-VL's minimum


def test_the_live_header_shows_the_detail():
    from rich.console import Console

    from qvq_local.events import ImageInfo, Started
    from qvq_local.render import LiveRenderer

    console = Console(record=True, force_terminal=True, width=200, height=20)
    label = "detail high (<= 1,280 image tokens; default: CUDA GPU encodes the images)"
    with LiveRenderer(console) as renderer:
        image = ImageInfo("a.png", (2000, 1000), (1400, 700), 1250)
        renderer.handle(Started("m", "llama", "Q4_K_M", [image], 1300, None, None, detail=label))
        renderer.live.refresh()
    assert label in console.export_text()
