"""make install's choice of llama.cpp build flags, on recorded machines (no toolkit needed here)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from qvq_local.build_flags import CUDA_FLAG, llama_cmake_args

ROOT = Path(__file__).resolve().parents[1]


def no_nvcc(_name):
    return None


def test_cuda_when_nvcc_is_on_path():
    assert llama_cmake_args({}, lambda n: "/usr/local/cuda/bin/nvcc", "Linux") == CUDA_FLAG


def test_cuda_when_cuda_home_has_nvcc(tmp_path):
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").write_text("")
    assert llama_cmake_args({"CUDA_HOME": str(tmp_path)}, no_nvcc, "Linux") == CUDA_FLAG
    assert llama_cmake_args({"CUDA_PATH": str(tmp_path)}, no_nvcc, "Windows") == CUDA_FLAG


def test_cpu_build_without_a_toolkit(tmp_path):
    assert llama_cmake_args({}, no_nvcc, "Linux") == ""
    assert llama_cmake_args({"CUDA_HOME": str(tmp_path)}, no_nvcc, "Linux") == ""  # no bin/nvcc there


def test_macos_builds_metal_by_default_and_the_users_flags_win():
    assert llama_cmake_args({}, lambda n: "/x/nvcc", "Darwin") == ""
    assert (
        llama_cmake_args({"CMAKE_ARGS": "-DGGML_VULKAN=on"}, lambda n: "/x/nvcc", "Linux")
        == "-DGGML_VULKAN=on"
    )


def test_makefile_runs_it_as_a_plain_script():
    """make install calls it before qvq-local is installed: it must run from the source tree alone."""
    out = subprocess.run(
        [sys.executable, "-S", str(ROOT / "qvq_local" / "build_flags.py")],
        capture_output=True,
        text=True,
        env={"PATH": "/nonexistent"},
        check=True,
    )
    assert out.stdout.strip() == ""
    assert "LLAMA_CMAKE_ARGS" in (ROOT / "Makefile").read_text()
