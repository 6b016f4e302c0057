"""CPU features that decide speed and safety: AVX2, AVX-512, AMX, NEON.

Why this module exists: llama.cpp picks CPU kernels and weight layouts from the CPU it runs on, and one of
them, the AMX buffer type on Intel Xeons (Sapphire Rapids and later), segfaults on the first decode of a
Q4_K_M or Q8_0 model in the llama.cpp that llama-cpp-python 0.3.x bundles (upstream issue #20824).  A
developer's machine may have none of these features while users' machines do, so every decision that
depends on them goes through pure functions of recorded inputs (a ``/proc/cpuinfo`` flags line, macOS
``sysctl`` output, llama.cpp's system-info string) that the tests feed with real recordings.

Reading the live machine is cheap (one file or one ``sysctl`` call) and imports nothing heavy.
"""

from __future__ import annotations

import functools
import os
import platform
import subprocess
import sys
from dataclasses import dataclass, field

#: The features reported, in the order doctor shows them.  Names follow Linux's cpuinfo flags.
SHOWN = ("avx2", "avx512f", "avx512_vnni", "amx_tile", "amx_int8", "amx_bf16", "neon", "dotprod", "i8mm")


@dataclass(frozen=True)
class CpuInfo:
    """What the CPU offers.  ``flags`` uses Linux cpuinfo spellings on every OS (``avx2``, ``amx_int8``,
    ``neon``...); ``source`` says where they came from (``"cpuinfo"``, ``"sysctl"``, ``"unknown"``)."""

    arch: str
    model: str = ""
    flags: frozenset[str] = field(default_factory=frozenset)
    source: str = "unknown"

    @property
    def has_amx(self) -> bool:
        return "amx_int8" in self.flags or "amx_tile" in self.flags

    @property
    def has_avx2(self) -> bool:
        return "avx2" in self.flags

    @property
    def has_avx512(self) -> bool:
        return "avx512f" in self.flags

    def shown(self) -> list[str]:
        """The speed- and safety-relevant features present, in a fixed order."""
        return [f for f in SHOWN if f in self.flags]


def parse_cpuinfo(text: str, arch: str = "x86_64") -> CpuInfo:
    """Parse Linux ``/proc/cpuinfo``: the first ``flags`` (x86) or ``Features`` (ARM) line."""
    model = ""
    flags: frozenset[str] = frozenset()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key = key.strip().lower()
        if key == "model name" and not model:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = frozenset(value.split())
    if "asimd" in flags:  # ARM Linux calls NEON "asimd"
        flags = flags | {"neon"} | ({"dotprod"} if "asimddp" in flags else set())
    return CpuInfo(arch=arch, model=model, flags=flags, source="cpuinfo")


#: macOS ``sysctl`` keys and the cpuinfo-style flag each one means when it is 1.
_DARWIN_ARM_KEYS = {
    "hw.optional.neon": "neon",
    "hw.optional.arm.FEAT_DotProd": "dotprod",
    "hw.optional.arm.FEAT_I8MM": "i8mm",
}


def parse_darwin_sysctl(text: str, arch: str) -> CpuInfo:
    """Parse ``sysctl`` output (``key: value`` lines) from a Mac, Apple Silicon or Intel."""
    values = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            values[key.strip()] = value.strip()
    flags: set[str] = set()
    for key, flag in _DARWIN_ARM_KEYS.items():
        if values.get(key) == "1":
            flags.add(flag)
    for key in ("machdep.cpu.features", "machdep.cpu.leaf7_features"):
        flags.update(f.lower().replace(".", "_") for f in values.get(key, "").split())
    # Intel Macs spell AVX-512 as AVX512F / AVX512VNNI; normalise to Linux's names.
    if "avx512vnni" in flags:
        flags.add("avx512_vnni")
    if "avx2_0" in flags:
        flags.add("avx2")
    return CpuInfo(
        arch=arch, model=values.get("machdep.cpu.brand_string", ""), flags=frozenset(flags), source="sysctl"
    )


@functools.lru_cache(maxsize=1)
def detect() -> CpuInfo:
    """This machine's CPU features (empty flags where the OS does not say); read once per process."""
    arch = platform.machine().lower()
    if sys.platform.startswith("linux"):
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
                return parse_cpuinfo(fh.read(), arch)
        except OSError:
            return CpuInfo(arch=arch)
    if sys.platform == "darwin":
        keys = ["machdep.cpu.brand_string", *_DARWIN_ARM_KEYS]
        if arch in ("x86_64", "amd64"):
            keys += ["machdep.cpu.features", "machdep.cpu.leaf7_features"]
        try:
            out = subprocess.run(["sysctl", *keys], capture_output=True, text=True, timeout=5).stdout
        except (OSError, subprocess.SubprocessError):
            return CpuInfo(arch=arch)
        return parse_darwin_sysctl(out, arch)
    return CpuInfo(arch=arch)


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity where the OS has one (``taskset``, a container's
    cpuset, a job scheduler), else every core.  ``os.cpu_count()`` counts the machine's cores whatever the
    affinity, and llama.cpp given more threads than it has cores runs slower, not faster."""
    if hasattr(os, "sched_getaffinity"):
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except OSError:
            pass
    return max(1, os.cpu_count() or 1)
