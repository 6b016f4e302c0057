"""Backend choice for every machine / installed-library / model-format combination, and describe()."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
from helpers import assert_error

from qvq_local import hardware
from qvq_local.errors import BackendUnavailable, InputError, ModelError

MAC = ("Darwin", "arm64")
INTEL_MAC = ("Darwin", "x86_64")
LINUX = ("Linux", "x86_64")


@pytest.fixture
def machine(monkeypatch):
    """Pretend to be a given OS/CPU with a given set of importable backend libraries."""

    def setup(platform_: tuple[str, str], installed: set[str]):
        system, arch = platform_
        monkeypatch.setattr(hardware.platform, "system", lambda: system)
        monkeypatch.setattr(hardware.platform, "machine", lambda: arch)
        real = importlib.util.find_spec
        libs = {"mlx": {"mlx", "mlx_vlm"}, "llama": {"llama_cpp"}}
        known = set().union(*libs.values())
        present = set().union(*(libs[b] for b in installed)) if installed else set()

        def fake_find_spec(name, *args, **kwargs):
            if name in known:
                return object() if name in present else None
            return real(name, *args, **kwargs)

        monkeypatch.setattr(importlib.util, "find_spec", fake_find_spec)

    return setup


BOTH = {"mlx", "llama"}
ANY = None


@pytest.mark.parametrize(
    "platform_, installed, formats, expected",
    [
        # Apple Silicon prefers MLX when it is installed and the model exists as MLX/HF
        (MAC, BOTH, ANY, "mlx"),
        (MAC, BOTH, {"mlx", "gguf"}, "mlx"),
        (MAC, BOTH, {"hf"}, "mlx"),
        (MAC, BOTH, {"gguf"}, "llama"),  # the format decides
        (MAC, {"llama"}, ANY, "llama"),  # no mlx: llama.cpp
        (MAC, {"mlx"}, {"mlx"}, "mlx"),
        # elsewhere llama.cpp, unless the model only exists for MLX
        (LINUX, BOTH, ANY, "llama"),
        (LINUX, BOTH, {"mlx", "gguf"}, "llama"),
        (LINUX, BOTH, {"mlx"}, "mlx"),
        (LINUX, {"mlx"}, ANY, "mlx"),
        (LINUX, {"llama"}, {"gguf"}, "llama"),
        (INTEL_MAC, BOTH, ANY, "llama"),
    ],
)
def test_auto_choice(machine, platform_, installed, formats, expected):
    machine(platform_, installed)
    assert hardware.choose_backend("auto", formats) == expected


@pytest.mark.parametrize(
    "platform_, installed, formats, hint",
    [
        (LINUX, set(), ANY, "qvq-local[llama]"),
        (MAC, set(), ANY, "qvq-local[mlx]"),
        (LINUX, {"mlx"}, {"gguf"}, "qvq-local[llama]"),  # only llama.cpp can run a GGUF
        (MAC, {"llama"}, {"mlx"}, "qvq-local[mlx]"),
    ],
)
def test_auto_missing_backend_names_install(machine, platform_, installed, formats, hint):
    machine(platform_, installed)
    with pytest.raises(BackendUnavailable) as err:
        hardware.choose_backend("auto", formats)
    assert f"pip install '{hint}'" in str(err.value)


def test_requested_backend(machine):
    machine(LINUX, BOTH)
    assert hardware.choose_backend("mlx", {"mlx", "gguf"}) == "mlx"
    assert hardware.choose_backend("llama", {"mlx", "gguf"}) == "llama"
    assert hardware.choose_backend("LLAMA", {"gguf"}) == "llama"


def test_requested_backend_cannot_load_format(machine):
    machine(MAC, BOTH)
    with pytest.raises(ModelError) as err:
        hardware.choose_backend("mlx", {"gguf"})
    assert_error(err, "mlx backend cannot load")
    assert "gguf" in str(err.value)
    with pytest.raises(ModelError) as raised:
        hardware.choose_backend("llama", {"mlx", "hf"})
    assert_error(raised, "llama backend cannot load")
    with pytest.raises(ModelError) as err:  # the error names the model it refused
        hardware.choose_backend("llama", {"mlx"}, model_path="/models/qvq-mlx-4bit")
    assert str(err.value).startswith("/models/qvq-mlx-4bit: the llama backend cannot load this model")
    assert "exists only as mlx" in str(err.value)


def test_requested_backend_not_installed(machine):
    machine(MAC, {"llama"})
    with pytest.raises(BackendUnavailable) as raised:
        hardware.choose_backend("mlx", {"mlx"})
    assert_error(raised, r"pip install 'qvq-local\[mlx\]'")
    machine(LINUX, {"mlx"})
    with pytest.raises(BackendUnavailable) as raised:
        hardware.choose_backend("llama", {"gguf"})
    assert_error(raised, r"pip install 'qvq-local\[llama\]'")


def test_mlx_needs_mlx_vlm_too(machine, monkeypatch):
    machine(MAC, BOTH)
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a, **k: None if n == "mlx_vlm" else real(n, *a, **k)
    )
    assert hardware.choose_backend("auto", ANY) == "llama"


def test_no_format_and_bad_request(machine):
    machine(LINUX, BOTH)
    with pytest.raises(ModelError):
        hardware.choose_backend("auto", set())
    with pytest.raises(InputError) as raised:
        hardware.choose_backend("vllm", ANY)
    assert_error(raised, "unknown backend")


@pytest.mark.parametrize(
    "platform_, installed, expected",
    [
        (MAC, BOTH, "mlx"),
        (MAC, set(), "mlx"),
        (MAC, {"llama"}, "gguf"),
        (LINUX, BOTH, "gguf"),
        (INTEL_MAC, BOTH, "gguf"),
    ],
)
def test_default_convert_target(machine, platform_, installed, expected):
    machine(platform_, installed)
    assert hardware.default_convert_target() == expected


def test_describe_is_light_and_complete():
    """describe() reports the facts without importing a backend library (checked in a fresh interpreter)."""
    code = (
        "import json, sys; from qvq_local import hardware; d = hardware.describe();"
        "print(json.dumps({'d': d, 'heavy': [m for m in ('llama_cpp', 'mlx', 'mlx_vlm', 'torch', 'numpy')"
        " if m in sys.modules]}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    data = json.loads(out.stdout)
    facts = data["d"]
    assert data["heavy"] == []
    for key in (
        "os",
        "machine",
        "apple_silicon",
        "cpu_count",
        "memory_total_bytes",
        "memory_available_bytes",
        "mlx_installed",
        "llama_cpp_installed",
        "llama_gpu_offload",
        "cuda",
        "metal",
        "default_backend",
        "default_convert_target",
    ):
        assert key in facts
    assert facts["cpu_count"] >= 1
    assert facts["default_convert_target"] in ("mlx", "gguf")
    if sys.platform.startswith("linux"):
        assert facts["memory_total_bytes"] > facts["memory_available_bytes"] > 0
        assert facts["apple_silicon"] is False


def test_memory_without_psutil(monkeypatch):
    if not sys.platform.startswith("linux"):
        pytest.skip("reads /proc/meminfo")
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a, **k: None if n == "psutil" else real(n, *a, **k)
    )
    total, available = hardware.memory_bytes()
    assert total > available > 0


@pytest.mark.llama
def test_describe_probes_llama_gpu():
    llama_cpp = pytest.importorskip("llama_cpp")
    from qvq_local.backends import registry

    facts = registry.machine_facts(hardware.describe(probe_gpu=True))  # the llama backend's hook
    assert facts["llama_gpu_offload"] == bool(llama_cpp.llama_supports_gpu_offload())
    if not facts["llama_gpu_offload"]:
        assert facts["cuda"] is False and facts["metal"] is False


def test_usable_cores_follows_the_affinity_not_the_machine(monkeypatch):
    """llama.cpp's threads and the bench's bandwidth threads: the cores this process may use (taskset, a
    container's cpuset), which os.cpu_count() does not see."""
    import os

    from qvq_local import cpu

    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    assert cpu.usable_cores() == 3
    monkeypatch.delattr(os, "sched_getaffinity")
    assert cpu.usable_cores() == 16
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert cpu.usable_cores() == 1
