"""make install's choice of llama.cpp build flags, on recorded machines (no toolkit or GPU needed here)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from qvq_local.build_flags import CUDA_FLAG, llama_cmake_args

ROOT = Path(__file__).resolve().parents[1]


def no_nvcc(_name):
    return None


def nvcc(_name):
    return "/usr/local/cuda/bin/nvcc"


def test_cuda_when_a_toolkit_and_a_gpu_are_both_here():
    assert llama_cmake_args({}, nvcc, "Linux", gpu_present=True) == CUDA_FLAG


def test_no_cuda_for_a_toolkit_without_a_gpu():
    """A container or CI image with nvcc (and perhaps no cuBLAS) but no GPU: the CUDA build would fail or
    never be used, so the default build is chosen."""
    assert llama_cmake_args({}, nvcc, "Linux", gpu_present=False) == ""


def test_cuda_home_counts_as_a_toolkit(tmp_path):
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").write_text("")
    assert llama_cmake_args({"CUDA_HOME": str(tmp_path)}, no_nvcc, "Linux", gpu_present=True) == CUDA_FLAG
    assert llama_cmake_args({"CUDA_PATH": str(tmp_path)}, no_nvcc, "Windows", gpu_present=True) == CUDA_FLAG
    assert llama_cmake_args({"CUDA_HOME": str(tmp_path / "none")}, no_nvcc, "Linux", gpu_present=True) == ""


def test_a_gpu_without_a_toolkit_gets_the_default_build():
    assert llama_cmake_args({}, no_nvcc, "Linux", gpu_present=True) == ""


def test_overrides_and_macos():
    assert llama_cmake_args({"QVQ_CUDA": "1"}, no_nvcc, "Linux", gpu_present=False) == CUDA_FLAG
    assert llama_cmake_args({"QVQ_CUDA": "0"}, nvcc, "Linux", gpu_present=True) == ""
    assert llama_cmake_args({}, nvcc, "Darwin", gpu_present=False) == ""
    assert (
        llama_cmake_args({"CMAKE_ARGS": "-DGGML_VULKAN=on"}, nvcc, "Linux", gpu_present=True)
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
