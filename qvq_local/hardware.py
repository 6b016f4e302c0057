"""Platform facts and the backend choice.

Which backend runs a model depends on three things: the machine (MLX only makes sense on Apple
Silicon), what is installed (the libraries each backend's registry entry names) and the formats the model
exists in (each entry says which it loads).  This module answers that question from the registry's data
alone, without importing any backend: installation is checked with ``importlib.util.find_spec``, so
``qvq --help`` and ``qvq doctor`` stay fast.  ``describe(probe_gpu=True)`` looks for NVIDIA GPUs and asks
``mlx`` on a Mac for Metal; what a backend's own library says about this machine (llama.cpp's GPU offload
and buffer plan) is that backend's ``machine_facts`` hook (:func:`qvq_local.backends.registry.machine_facts`).
"""

from __future__ import annotations

import importlib.util
import os
import platform
import subprocess
import sys

from qvq_local.backends import registry
from qvq_local.build_flags import (  # noqa: F401 - NVIDIA facts live there: make install needs them too
    detect_nvidia,
    parse_nvidia_driver_version,
    parse_nvidia_smi_list,
)
from qvq_local.cpu import detect as detect_cpu
from qvq_local.cpu import usable_cores
from qvq_local.errors import BackendUnavailable, ModelError

# The backend names, the formats each loads, their modules and install lines: qvq_local.backends.registry.


def _has_module(name: str) -> bool:
    """True when ``name`` is importable, without importing it (a broken spec counts as missing)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def is_apple_silicon() -> bool:
    return platform.system() == "Darwin" and platform.machine().lower() in ("arm64", "aarch64")


def backend_installed(backend: str) -> bool:
    """True when every library the backend needs can be imported."""
    return all(_has_module(mod) for mod in registry.get(backend).modules)


def _preference() -> tuple[str, ...]:
    """Backends in the order this machine prefers them: MLX first only on Apple Silicon."""
    return registry.preference(is_apple_silicon())


def choose_backend(
    requested: str = "auto",
    formats_available: set[str] | frozenset[str] | None = None,
    *,
    model_path: str | os.PathLike | None = None,
) -> str:
    """Return ``"mlx"`` or ``"llama"`` for a model that exists in ``formats_available``.

    ``formats_available`` holds the model's formats (``"mlx"``, ``"gguf"``, ``"hf"``); ``None`` means the
    model can be had in any format (the choice then rests on the machine alone).  ``model_path``, when
    given, starts the format-mismatch errors, so the user sees which model the backend refused.

    Raises ``ModelError`` when the requested backend cannot load any of the model's formats, and
    ``BackendUnavailable`` (naming the ``pip install`` line) when the backend that should run it is not
    installed.
    """
    requested = registry.canonical(requested)

    formats = set(formats_available) if formats_available is not None else {"mlx", "gguf", "hf"}
    loadable = [b for b in registry.names() if registry.BACKENDS[b].formats & formats]
    have = ", ".join(sorted(formats)) or "no known format"

    if requested != "auto":
        if requested not in loadable:
            raise ModelError(
                f"the {requested} backend cannot load this model: it exists only as {have}",
                path=model_path,
                hint=f"convert it to {registry.get(requested).convert_hint()} or use --backend auto",
            )
        if not backend_installed(requested):
            raise BackendUnavailable(
                f"the {requested} backend is not installed", hint=registry.get(requested).install_hint
            )
        return requested

    if not loadable:
        raise ModelError(f"no backend can load this model's format ({have})", path=model_path)
    ordered = [b for b in _preference() if b in loadable]
    for backend in ordered:
        if backend_installed(backend):
            return backend
    first = ordered[0]
    only = " (the model exists only in a format it loads)" if len(ordered) == 1 else ""
    raise BackendUnavailable(
        f"no backend to run this model is installed{only}", hint=registry.get(first).install_hint
    )


def default_convert_target() -> str:
    """The format ``qvq convert`` should write on this machine: what the backend ``auto`` picks here runs
    (``"mlx"`` on Apple Silicon, else ``"gguf"``; on Apple Silicon with only llama.cpp installed, GGUF is
    the one that will run); with no backend installed, what the machine's first choice runs."""
    order = [name for name in _preference() if registry.BACKENDS[name].convert_to]
    for name in order:
        if backend_installed(name):
            return str(registry.BACKENDS[name].convert_to)
    return str(registry.BACKENDS[order[0]].convert_to)


# ---------------------------------------------------------------- memory


def _meminfo_linux() -> tuple[int | None, int | None]:
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            fields = {}
            for line in fh:
                key, _, rest = line.partition(":")
                parts = rest.split()
                if parts:
                    fields[key] = int(parts[0]) * 1024  # values are in kB
    except (OSError, ValueError):
        return None, None
    return fields.get("MemTotal"), fields.get("MemAvailable", fields.get("MemFree"))


def _meminfo_darwin() -> tuple[int | None, int | None]:
    total = available = None
    try:
        total = int(
            subprocess.run(
                ["sysctl", "-n", "hw.memsize"], capture_output=True, text=True, timeout=5, check=True
            ).stdout.strip()
        )
        out = subprocess.run(["vm_stat"], capture_output=True, text=True, timeout=5, check=True).stdout
        page = 4096
        pages = 0
        for line in out.splitlines():
            if "page size of" in line:
                page = int(line.split("page size of")[1].split()[0])
            for key in ("Pages free", "Pages inactive", "Pages speculative"):
                if line.startswith(key + ":"):
                    pages += int(line.split(":")[1].strip().rstrip("."))
        available = pages * page if pages else None
    except (OSError, ValueError, subprocess.SubprocessError):
        pass
    return total, available


def memory_bytes() -> tuple[int | None, int | None]:
    """(total, available) system memory in bytes; ``None`` where it cannot be read."""
    if _has_module("psutil"):
        import psutil

        vm = psutil.virtual_memory()
        return int(vm.total), int(vm.available)
    if sys.platform.startswith("linux"):
        return _meminfo_linux()
    if sys.platform == "darwin":
        return _meminfo_darwin()
    return None, None


# ---------------------------------------------------------------- GPU probes (import on request only)


def _probe_mlx_metal() -> bool | None:
    try:
        import mlx.core as mx

        return bool(mx.metal.is_available())
    except (ImportError, OSError, AttributeError, RuntimeError):
        return None


def metal_working_set(device_info: dict | None = None) -> int | None:
    """How much memory Metal lets the GPU wire on this Mac (``recommendedMaxWorkingSetSize``: a share of
    the unified memory, ~2/3 to ~5/6 by size, raised by ``sysctl iogpu.wired_limit_mb``), from mlx's
    ``device_info()`` (or the dict given); None where it cannot be read."""
    if device_info is None:
        try:
            import mlx.core as mx

            device_info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
        except (ImportError, OSError, AttributeError, RuntimeError):
            return None
    value = (device_info or {}).get("max_recommended_working_set_size")
    return int(value) if value else None


#: What ``nvidia-smi`` is asked for each GPU's memory (MiB, one CSV line per GPU).  ``memory.free`` is
#: what is left after the driver's own reserve, which total minus used would count as free.
NVIDIA_SMI_MEMORY_QUERY = ("--query-gpu=name,memory.total,memory.free", "--format=csv,noheader,nounits")


def parse_nvidia_smi_memory(text: str) -> list[dict]:
    """``NVIDIA H200, 143771, 143156`` lines (name, total MiB, free MiB) -> ``[{"name", "total_bytes",
    "free_bytes"}]``; lines that do not parse (``[N/A]``, an error text) are left out."""
    gpus = []
    for line in text.splitlines():
        parts = [p.strip() for p in line.rsplit(",", 2)]
        if len(parts) != 3:
            continue
        try:
            total, free = int(float(parts[1])) * 2**20, int(float(parts[2])) * 2**20
        except ValueError:
            continue
        gpus.append({"name": parts[0], "total_bytes": total, "free_bytes": free})
    return gpus


def nvidia_memory() -> list[dict]:
    """Each NVIDIA GPU's memory as ``nvidia-smi`` reports it now ([] without nvidia-smi or a GPU)."""
    import shutil

    smi = shutil.which("nvidia-smi")
    if not smi:
        return []
    try:
        out = subprocess.run([smi, *NVIDIA_SMI_MEMORY_QUERY], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return []
    return parse_nvidia_smi_memory(out.stdout) if out.returncode == 0 else []


def describe(probe_gpu: bool = False) -> dict:
    """Facts about this machine for ``qvq doctor`` and bench reports.

    Cheap by default (no backend library imported); ``probe_gpu=True`` also asks nvidia-smi, and mlx on
    Apple Silicon (Metal).  Each backend's own view of the machine (``llama_gpu_offload``, ``cuda`` ...:
    placeholders here) comes from :func:`qvq_local.backends.registry.machine_facts` over these facts.
    """
    total, available = memory_bytes()
    facts: dict = {
        "os": platform.system(),
        "os_release": platform.release(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "apple_silicon": is_apple_silicon(),
        "cpu_count": os.cpu_count(),
        "usable_cores": usable_cores(),  # this process's CPU affinity (taskset, a container's cpuset)
        "memory_total_bytes": total,
        "memory_available_bytes": available,
        "mlx_installed": backend_installed("mlx"),
        "llama_cpp_installed": backend_installed("llama"),
        "llama_gpu_offload": None,
        "cuda": None,
        "metal": None,
    }
    cpu = detect_cpu()
    facts["cpu"] = {"model": cpu.model, "arch": cpu.arch, "features": cpu.shown(), "source": cpu.source}
    if probe_gpu:
        facts["nvidia"] = detect_nvidia()
        if facts["nvidia"].get("present"):
            facts["nvidia"]["memory"] = nvidia_memory()
        if facts["mlx_installed"] and facts["apple_silicon"]:
            metal = _probe_mlx_metal()
            facts["mlx_metal"] = metal
            if metal:
                facts["metal"] = True
                facts["metal_working_set_bytes"] = metal_working_set()
    try:
        facts["default_backend"] = choose_backend("auto", None)
    except (ModelError, BackendUnavailable) as err:
        facts["default_backend"] = None
        facts["default_backend_error"] = str(err)
    facts["default_convert_target"] = default_convert_target()
    return facts
