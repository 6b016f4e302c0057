"""The machine a benchmark ran on, as its JSON file and its tables and chart describe it.

The facts are ``qvq_local.hardware.describe`` (what ``qvq doctor`` shows) and the CPU's name from
``qvq_local.cpu`` (which reads ``/proc/cpuinfo`` or ``sysctl`` once per process); this module only adds a
one-line summary, and a fallback for when the hardware description itself fails.
"""

from __future__ import annotations

import os
import platform

from qvq_local.units import memory_size


def cpu_name() -> str:
    """The CPU's model name (``qvq_local.cpu``), else what the platform module says."""
    from qvq_local.cpu import detect

    return detect().model or platform.processor() or platform.machine()


def describe_machine() -> dict:
    """``hardware.describe()`` with the CPU's name under ``cpu`` and a one-line summary for the table and chart."""
    try:
        from qvq_local import hardware
        from qvq_local.backends import registry

        facts = registry.machine_facts(hardware.describe(probe_gpu=True))
    except Exception as exc:  # noqa: BLE001 - the bench still reports what it can find itself
        facts = {
            "os": platform.system(),
            "machine": platform.machine(),
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "describe_error": f"{type(exc).__name__}: {exc}",
        }
        try:
            import psutil

            facts["memory_total_bytes"] = int(psutil.virtual_memory().total)
            facts["memory_available_bytes"] = int(psutil.virtual_memory().available)
        except Exception as exc:  # noqa: BLE001 - psutil is optional (the bench extra)
            facts["memory_error"] = f"{type(exc).__name__}: {exc}"
    facts["cpu"] = cpu_name()
    mem = facts.get("memory_total_bytes")
    mem_text = f", {memory_size(mem)} RAM" if mem else ""
    facts["summary"] = (
        f"{facts['cpu']}, {facts.get('cpu_count')} cores{mem_text}, "
        f"{facts.get('os', platform.system())} {facts.get('machine', platform.machine())}"
    )
    return facts
