"""Build flags for llama-cpp-python on this machine: CUDA where an NVIDIA toolkit is installed.

``make install`` runs this file as a script *before* qvq-local is installed, so it imports nothing but the
standard library.  llama-cpp-python builds llama.cpp from source; without ``-DGGML_CUDA=on`` a machine with
an NVIDIA GPU gets a CPU-only build and a 72B model runs for hours instead of minutes.  Metal is
llama.cpp's default on macOS and needs no flag.

Usage: ``python qvq_local/build_flags.py`` prints the CMAKE_ARGS to build with (empty: the default build).
"""

from __future__ import annotations

import os
import platform
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path

CUDA_FLAG = "-DGGML_CUDA=on"
#: The llama-cpp-python versions qvq-local runs with (pyproject.toml's ``llama`` extra says the same).
LLAMA_CPP_PIN = "llama-cpp-python>=0.3.16,<0.4"
#: The one-line rebuild that gives llama-cpp-python CUDA (needs the CUDA toolkit: nvcc).
CUDA_REBUILD = (
    f'CMAKE_ARGS="{CUDA_FLAG}" pip install --force-reinstall --no-cache-dir --no-deps "{LLAMA_CPP_PIN}"'
)


def find_nvcc(env: Mapping[str, str], which: Callable[[str], str | None]) -> str | None:
    """The CUDA compiler: ``nvcc`` on PATH, else under ``$CUDA_HOME`` / ``$CUDA_PATH``, else None."""
    found = which("nvcc")
    if found:
        return found
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = env.get(var)
        if root and Path(root, "bin", "nvcc").is_file():
            return str(Path(root, "bin", "nvcc"))
    return None


def llama_cmake_args(
    env: Mapping[str, str], which: Callable[[str], str | None] = shutil.which, system: str | None = None
) -> str:
    """CMAKE_ARGS for building llama-cpp-python here.  A CMAKE_ARGS the user set always wins."""
    if env.get("CMAKE_ARGS"):
        return env["CMAKE_ARGS"]
    if (system or platform.system()) == "Darwin":
        return ""  # Metal is on by default
    return CUDA_FLAG if find_nvcc(env, which) else ""


if __name__ == "__main__":
    print(llama_cmake_args(os.environ))
