"""NVIDIA GPUs and the CUDA toolkit, seen before anything is installed, and the llama.cpp build they imply.

``make install`` runs this file as a script *before* qvq-local is installed, so it imports nothing but the
standard library (``qvq doctor`` and ``qvq ask`` import the same functions through ``hardware``).

llama-cpp-python builds llama.cpp from source; without ``-DGGML_CUDA=on`` a machine with an NVIDIA GPU
gets a CPU-only build and a 72B model runs for hours instead of minutes.  A CUDA build needs both a GPU to
run on and a toolkit to build with: a CUDA toolkit on a machine with no GPU (container images, build and
CI machines often have one, sometimes without cuBLAS) gives a build that fails or is never used, so the
default asks for both.  ``QVQ_CUDA=1`` forces a CUDA build (building on one machine for another),
``QVQ_CUDA=0`` forbids it, and a ``CMAKE_ARGS`` the user set always wins.  Metal is llama.cpp's default on
macOS and needs no flag.

Usage: ``python qvq_local/build_flags.py`` prints the CMAKE_ARGS to build with (empty: the default build).
"""

from __future__ import annotations

import glob
import os
import platform
import shutil
import subprocess
from collections.abc import Callable, Mapping
from pathlib import Path

CUDA_FLAG = "-DGGML_CUDA=on"
#: The llama-cpp-python versions qvq-local runs with (pyproject.toml's ``llama`` extra says the same).
LLAMA_CPP_PIN = "llama-cpp-python>=0.3.16,<0.4"
#: The one-line rebuild that gives llama-cpp-python CUDA (needs the CUDA toolkit: nvcc).
CUDA_REBUILD = (
    f'CMAKE_ARGS="{CUDA_FLAG}" pip install --force-reinstall --no-cache-dir --no-deps "{LLAMA_CPP_PIN}"'
)


# ---------------------------------------------------------------- NVIDIA GPUs, seen without llama.cpp


def parse_nvidia_smi_list(text: str) -> list[str]:
    """GPU names from ``nvidia-smi -L`` ("GPU 0: NVIDIA H200 (UUID: GPU-...)")."""
    names = []
    for line in text.splitlines():
        head, sep, rest = line.partition(":")
        if sep and head.strip().startswith("GPU"):
            names.append(rest.split("(UUID")[0].strip())
    return names


def parse_nvidia_driver_version(text: str) -> str | None:
    """The driver version from ``/proc/driver/nvidia/version`` ("NVRM version: NVIDIA UNIX ... 550.54.15 ...")."""
    for line in text.splitlines():
        if line.startswith("NVRM version:"):
            for word in line.split():
                if word[:1].isdigit() and "." in word:
                    return word
    return None


def detect_nvidia(run_smi: bool = True) -> dict:
    """Whether this machine has an NVIDIA GPU, from the driver's own files (and ``nvidia-smi -L`` for the
    names when ``run_smi``), whatever llama.cpp was built with."""
    found: dict = {"present": False, "gpus": [], "driver": None, "source": None}
    try:
        with open("/proc/driver/nvidia/version", encoding="utf-8", errors="replace") as fh:
            found.update(present=True, driver=parse_nvidia_driver_version(fh.read()), source="driver")
    except OSError:
        pass
    if glob.glob("/dev/nvidia[0-9]*"):
        found.update(present=True, source=found["source"] or "device files")
    smi = shutil.which("nvidia-smi") if run_smi else None
    if smi:
        try:
            out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            out = ""
        gpus = parse_nvidia_smi_list(out)
        if gpus:
            found.update(present=True, gpus=gpus, source=found["source"] or "nvidia-smi")
    return found


# ---------------------------------------------------------------- the build


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
    env: Mapping[str, str],
    which: Callable[[str], str | None] = shutil.which,
    system: str | None = None,
    gpu_present: bool | None = None,
) -> str:
    """CMAKE_ARGS for building llama-cpp-python here: CUDA when a toolkit and an NVIDIA GPU are both here.

    ``gpu_present`` None means: look (:func:`detect_nvidia`).
    """
    if env.get("CMAKE_ARGS"):
        return env["CMAKE_ARGS"]
    force = env.get("QVQ_CUDA", "").strip().lower()
    if force in ("0", "no", "off", "false"):
        return ""
    if force in ("1", "yes", "on", "true"):
        return CUDA_FLAG
    if (system or platform.system()) == "Darwin":
        return ""  # Metal is on by default
    if not find_nvcc(env, which):
        return ""
    if gpu_present is None:
        gpu_present = detect_nvidia()["present"]
    return CUDA_FLAG if gpu_present else ""


if __name__ == "__main__":
    print(llama_cmake_args(os.environ))
