"""The CMake arguments for llama-cpp-python with CUDA for the H200 (sm_90), wherever it is built.

One place for them: ``prepare.py`` builds here (a machine without a GPU: no driver, no cuBLAS in the
toolkit) and ``run.py`` builds on the GPU machine when no build made here is carried.  Standard library
only: run.py runs under the GPU machine's bare ``python3``.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

#: The H200's compute capability; nothing else is built.
CUDA_ARCH = "90"


def toolkit_root(nvcc: str | None = None) -> Path | None:
    """The CUDA toolkit that ``nvcc`` (on PATH by default) belongs to."""
    found = nvcc or shutil.which("nvcc")
    if not found:
        return None
    real = Path(found).resolve()
    with open(real, "rb") as fh:
        script = fh.read(2) == b"#!"
    if script:  # a wrapper script: find the real nvcc it runs
        for word in real.read_text().split():
            if word.endswith("/nvcc") and Path(word).is_file():
                real = Path(word).resolve()
                break
    return real.parents[1]


def driver_library(toolkit: Path, fallback: Path | None = None) -> Path | None:
    """A ``libcuda`` to link against: the toolkit's stub, else the driver's own (``ldconfig -p``), else
    ``fallback`` (prepare.py's stub on a machine without a driver)."""
    for stub in ("lib64/stubs/libcuda.so", "targets/x86_64-linux/lib/stubs/libcuda.so"):
        if (toolkit / stub).is_file():
            return toolkit / stub
    try:
        listed = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        listed = ""
    for line in listed.splitlines():
        if "libcuda.so.1 " in line and "x86-64" in line:
            return Path(line.split("=>")[-1].strip())
    return fallback


def llama_cmake_args(toolkit: Path, cu13: Path, libcuda: Path, *, native: bool) -> str:
    """CMAKE_ARGS for llama-cpp-python: CUDA for sm_90 only, without the extra flash-attention quant
    pairs (GGML_CUDA_FA_ALL_QUANTS stays off: minutes of compiling for KV types qvq never uses), cuBLAS
    from pip's ``nvidia/cu13`` (the toolkits here and there have none).  ``native``: the CPU code for
    the machine that builds (on the GPU machine itself); off for a build carried elsewhere (AVX2, FMA,
    F16C; no AVX-512)."""
    return " ".join(
        [
            "-DGGML_CUDA=on",
            f"-DCMAKE_CUDA_ARCHITECTURES={CUDA_ARCH}",
            f"-DCMAKE_CUDA_COMPILER={toolkit}/bin/nvcc",
            f"-DCUDAToolkit_ROOT={toolkit}",
            f"-DGGML_NATIVE={'on' if native else 'off'}",
            "-DGGML_CUDA_FA_ALL_QUANTS=off",
            f"-DCUDA_cuda_driver_LIBRARY={libcuda}",
            f"-DCUDA_cublas_LIBRARY={_lib(cu13, 'cublas')}",
            f"-DCUDA_cublasLt_LIBRARY={_lib(cu13, 'cublasLt')}",
            f"-DCMAKE_CUDA_FLAGS=-I{cu13}/include",
        ]
    )


def _lib(cu13: Path, name: str) -> Path:
    plain = cu13 / "lib" / f"lib{name}.so"
    return plain if plain.exists() else cu13 / "lib" / f"lib{name}.so.13"
