"""Shared fixtures: synthetic checkpoints and their conversions, built once per test session.

The builders are the project's own code (``qvq_local.convert``); nothing is downloaded.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Tests never reach a hub, and skip MLX's g++ kernel compilation on CPU.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLX_DISABLE_COMPILE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Never read or write the user's real cache or settings: every test run gets its own QVQ_HOME (tests
# that need a particular one set it themselves), and no default model leaks in from the environment.
os.environ["QVQ_HOME"] = tempfile.mkdtemp(prefix="qvq-test-home-")
atexit.register(shutil.rmtree, os.environ["QVQ_HOME"], ignore_errors=True)
# ... nor the user's Hugging Face cache (`qvq models` lists what is in it)
os.environ["HF_HUB_CACHE"] = tempfile.mkdtemp(prefix="qvq-test-hf-cache-")
atexit.register(shutil.rmtree, os.environ["HF_HUB_CACHE"], ignore_errors=True)
for _var in ("QVQ_MODEL", "QVQ_BACKEND"):
    os.environ.pop(_var, None)


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory) -> Path:
    """A session-wide folder for built models (kept between fixtures, removed by pytest)."""
    return tmp_path_factory.mktemp("artifacts")


@pytest.fixture(scope="session")
def tiny_checkpoint(artifacts) -> Path:
    """The `tiny` synthetic QVQ-layout checkpoint in f32 (exact parity needs f32)."""
    from qvq_local.convert.synthetic import write_checkpoint

    return write_checkpoint(artifacts / "tiny-f32", shape="tiny", dtype="f32", seed=0)


@pytest.fixture(scope="session")
def tiny_checkpoint_bf16(artifacts) -> Path:
    from qvq_local.convert.synthetic import write_checkpoint

    return write_checkpoint(artifacts / "tiny-bf16", shape="tiny", dtype="bf16", seed=0)


@pytest.fixture(scope="session")
def tiny_gguf_f32(artifacts, tiny_checkpoint):
    """Unquantised GGUF pair (text model, mmproj) of the tiny checkpoint."""
    from qvq_local.convert.to_gguf import convert_to_gguf

    return convert_to_gguf(tiny_checkpoint, artifacts / "gguf-f32", quant="f32", mmproj_quant="f32")


@pytest.fixture(scope="session")
def tiny_gguf_q4(artifacts, tiny_checkpoint):
    """Q4_K_M GGUF pair of the tiny checkpoint (mmproj in f16)."""
    from qvq_local.convert.to_gguf import convert_to_gguf

    return convert_to_gguf(tiny_checkpoint, artifacts / "gguf-q4", quant="q4_k_m", mmproj_quant="f16")


@pytest.fixture(scope="session")
def tiny_mlx_f32(artifacts, tiny_checkpoint) -> Path:
    """Unquantised MLX conversion of the tiny checkpoint."""
    from qvq_local.convert.to_mlx import convert_to_mlx

    return convert_to_mlx(tiny_checkpoint, artifacts / "mlx-f32", bits=None)


@pytest.fixture(scope="session")
def tiny_mlx_q4(artifacts, tiny_checkpoint) -> Path:
    from qvq_local.convert.to_mlx import convert_to_mlx

    return convert_to_mlx(tiny_checkpoint, artifacts / "mlx-q4", bits=4, group_size=64)


def _need_qwen_vocab() -> None:
    from qvq_local.convert import tokenizer_qwen

    if not tokenizer_qwen.available():
        pytest.skip("the real Qwen vocabulary needs the dashscope package (dev extra)")


@pytest.fixture(scope="session")
def qwen_tokenizer_json() -> str:
    """Qwen's real tokenizer.json text, built from dashscope's qwen.tiktoken (once per session)."""
    _need_qwen_vocab()
    from qvq_local.convert.tokenizer_synth import build_tokenizer_json

    from qvq_local.families import DEFAULT_FAMILY

    return build_tokenizer_json(DEFAULT_FAMILY.base_vocab, "qwen", DEFAULT_FAMILY.special_tokens)


@pytest.fixture(scope="session")
def qwen_tokenizer(qwen_tokenizer_json):
    """The real Qwen tokenizer as a ``tokenizers.Tokenizer``."""
    from tokenizers import Tokenizer

    return Tokenizer.from_str(qwen_tokenizer_json)


@pytest.fixture(scope="session")
def qwen_tiny_checkpoint(artifacts, qwen_tokenizer_json) -> Path:
    """The tiny shape carrying the real Qwen tokenizer (its embedding grows to 151936 rows), bf16."""
    from qvq_local.convert.synthetic import write_checkpoint

    return write_checkpoint(
        artifacts / "qwen-tiny-bf16", shape="tiny", dtype="bf16", seed=0, tokenizer="qwen"
    )


@pytest.fixture(scope="session")
def qwen_tiny_gguf_f16(artifacts, qwen_tiny_checkpoint):
    """F16 GGUF pair of the real-vocabulary tiny checkpoint (F16 decodes safely on AMX CPUs)."""
    from qvq_local.convert.to_gguf import convert_to_gguf

    return convert_to_gguf(qwen_tiny_checkpoint, artifacts / "qwen-gguf-f16", quant="f16", mmproj_quant="f16")


@pytest.fixture(scope="session")
def qwen_tiny_mlx(artifacts, qwen_tiny_checkpoint) -> Path:
    """Unquantised MLX conversion of the real-vocabulary tiny checkpoint."""
    from qvq_local.convert.to_mlx import convert_to_mlx

    return convert_to_mlx(qwen_tiny_checkpoint, artifacts / "qwen-mlx", bits=None)


@pytest.fixture(scope="session")
def sample_image(artifacts) -> Path:
    """A small RGB chart-like PNG (224x168): bars and a line, deterministic."""
    from PIL import Image, ImageDraw

    path = artifacts / "chart.png"
    if not path.exists():
        img = Image.new("RGB", (224, 168), "white")
        draw = ImageDraw.Draw(img)
        for i, h in enumerate([40, 90, 60, 120, 75]):
            x = 20 + i * 40
            draw.rectangle([x, 150 - h, x + 24, 150], fill=(40 + 40 * i, 90, 200 - 30 * i))
        draw.line([(10, 150), (214, 150)], fill="black", width=2)
        draw.line([(20, 100), (60, 60), (100, 80), (140, 30), (180, 70)], fill="red", width=3)
        img.save(path)
    return path


# ---------------------------------------------------------------- native crashes: smoke checks first
#
# A native crash (llama.cpp's AMX buffer type segfaulted on Intel Xeons) kills pytest before it reports
# anything.  So before any test decodes in-process, each installed backend runs a tiny quantised model in a
# child process (qvq_local.selftest, the same check as `qvq doctor --selftest`).  A crash there fails
# tests/test_native_smoke.py, naming the signal, the CPU features and the workaround, and every test
# marked for that backend is skipped, so the rest of the suite still runs and reports.

_SMOKE: dict = {}
_SMOKE_FILE = "test_native_smoke.py"
#: The session fixture holding each backend's quantised tiny model (the same one `qvq doctor --selftest`
#: builds for itself), so the smoke check converts nothing extra.
_SMOKE_MODEL = {"llama": "tiny_gguf_q4", "mlx": "tiny_mlx_q4"}


def native_smoke(backend: str, request):
    """The smoke-check result for ``backend`` (run once per session, in a child process)."""
    if backend not in _SMOKE:
        from qvq_local import selftest
        from qvq_local.hardware import backend_installed

        if not backend_installed(backend):
            _SMOKE[backend] = selftest.run([backend])[0]  # "skipped", with the install line
        else:
            model = request.getfixturevalue(_SMOKE_MODEL[backend])
            _SMOKE[backend] = selftest.check(backend, Path(getattr(model, "model", model)))
    return _SMOKE[backend]


def pytest_collection_modifyitems(session, config, items):
    """Run the smoke checks first: the decode tests that could crash come after them."""
    items.sort(key=lambda item: 0 if item.path.name == _SMOKE_FILE else 1)


@pytest.fixture(autouse=True)
def _skip_after_native_crash(request):
    for backend in ("llama", "mlx"):
        if request.node.get_closest_marker(backend) and request.node.path.name != _SMOKE_FILE:
            result = native_smoke(backend, request)
            if result.status == "crash":
                pytest.skip(
                    f"{backend} crashed in tests/test_native_smoke.py ({result.signal}): not run in-process"
                )


# ---------------------------------------------------------------- a local Hugging Face hub (real HTTP)
@pytest.fixture()
def hub_server(tmp_path, monkeypatch):
    """tests/hubserver.py's hub and CDN on 127.0.0.1, with HF_ENDPOINT pointing at it, HF_HUB_CACHE in
    ``tmp_path/hf-cache`` and offline mode off (huggingface_hub reads it once, at import)."""
    import huggingface_hub.constants as hf_constants
    from hubserver import FakeHub

    server = FakeHub()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_IMPLICIT_TOKEN", "1")
    yield server
    server.close()


# ---- Qwen3.5 (dense and MoE): the hybrid families with a recurrent state (tests/test_family_qwen3_5.py,
# tests/test_recurrent_state.py).  Keyed by family name.

Q35_ALIAS = {"Qwen3.5": "qwen3.5", "Qwen3.5-MoE": "qwen3.5-moe"}


@pytest.fixture(scope="session")
def q35_ckpts(artifacts) -> dict[str, Path]:
    from qvq_local.convert import synthetic

    return {
        name: synthetic.write_checkpoint(artifacts / f"q35-tiny-{alias}", "tiny", dtype="f32", family=alias)
        for name, alias in Q35_ALIAS.items()
    }


@pytest.fixture(scope="session")
def q35_ggufs(artifacts, q35_ckpts):
    from qvq_local.convert.to_gguf import convert_to_gguf

    return {
        name: convert_to_gguf(
            ckpt, artifacts / f"q35-gguf-{Q35_ALIAS[name]}", quant="f32", mmproj_quant="f32"
        )
        for name, ckpt in q35_ckpts.items()
    }


@pytest.fixture(scope="session")
def q35_mlx(artifacts, q35_ckpts):
    pytest.importorskip("mlx.core")
    pytest.importorskip("mlx_vlm")
    from qvq_local.convert.to_mlx import convert_to_mlx

    return {
        name: convert_to_mlx(ckpt, artifacts / f"q35-mlx-{Q35_ALIAS[name]}", bits=None)
        for name, ckpt in q35_ckpts.items()
    }
