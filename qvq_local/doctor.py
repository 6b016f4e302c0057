"""``qvq doctor``: what this machine has, which backends import, whether a model fits in memory (and, for
a GGUF on a machine with an NVIDIA GPU, how many of its layers fit in the GPU's), whether its files are
whole; the report as a dict and its printing.  The fit rules are :mod:`qvq_local.fit`'s, the file checks
:mod:`qvq_local.integrity`'s.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

from qvq_local import fit
from qvq_local.errors import InputError, ModelError
from qvq_local.units import memory_size

#: ``qvq doctor --selftest`` exit code when a backend crashed or failed its self-test.
EXIT_SELFTEST_FAILED = 4


def _version(dist: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:  # noqa: BLE001 - not installed under that distribution name
        return None


def backend_report() -> list[dict[str, Any]]:
    """For each backend: whether its modules are importable (without importing them) and versions."""
    from qvq_local.backends import registry

    rows = []
    for spec in registry.BACKENDS.values():
        if spec.has(registry.REMOTE):
            continue  # nothing of it runs on this machine
        missing = []
        for mod in spec.modules:
            try:
                found = importlib.util.find_spec(mod) is not None
            except (ImportError, ValueError):
                found = False
            if not found:
                missing.append(mod)
        versions = {d: _version(d) for d in spec.distributions}
        rows.append(
            {
                "backend": spec.name,
                "installed": not missing,
                "missing": missing,
                "versions": versions,
                "install_hint": spec.install_hint,
            }
        )
    return rows


# ----------------------------------------------------------------------------- the fit of a model
def model_fit(
    ref: str,
    n_ctx: int | None = None,
    available: int | None = None,
    total: int | None = None,
    gpus: list[dict] | None = None,
    working_set: int | None = None,
) -> dict[str, Any]:
    """The report's row for ``ref``: the reference resolved (never downloaded), whether it fits
    (:func:`qvq_local.fit.model_fit`, the arguments are its) and, for a GGUF, the llama.cpp CPU buffer
    types its weights will be loaded into here."""
    from qvq_local import hub

    resolved = hub.resolve(ref, download=False, progress=False)
    buffers = _llama_buffers_for(resolved.path) if resolved.format == "gguf" else None
    row: dict[str, Any] = {}
    for key, value in fit.model_fit(resolved, n_ctx, available, total, gpus, working_set).items():
        row[key] = value
        if key == "format":  # where the report has always shown it
            row["cpu_buffers"] = buffers
    return row


def available_rows(apple_silicon: bool | None = None) -> list[dict[str, Any]]:
    """``qvq models --available``: one row per short name (:mod:`qvq_local.catalogue`), the source for this
    machine, its download size and the fit verdict, estimated before anything is downloaded."""
    from qvq_local import catalogue
    from qvq_local.hardware import memory_bytes

    total, available = memory_bytes()
    rows = []
    for entry in catalogue.CATALOGUE.values():
        source = entry.source(apple_silicon)
        rows.append(
            {
                "name": entry.name,
                "title": entry.title,
                "source": source.ref,
                "format": source.format,
                "size": source.size,
                "size_checked": source.size_checked,
                **fit.catalogue_fit(entry, source, available, total),
            }
        )
    return rows


def _llama_buffers_for(model_file: Path) -> str | None:
    """Which llama.cpp CPU buffer types this GGUF's weights will be loaded into here (None: no llama)."""
    try:
        import llama_cpp
    except (ImportError, OSError):  # not installed, or its shared library does not load
        return None

    from qvq_local.backends import llama_buffers as lb
    from qvq_local.cpu import detect
    from qvq_local.formats.gguf import GgufHeaderError, read_gguf_header

    try:
        tensors = read_gguf_header(model_file).tensors
        plan = lb.plan_for_model(lb.requested_mode(None), detect(), lb.current_build(llama_cpp), tensors)
    except (OSError, GgufHeaderError, InputError) as exc:
        return f"unknown ({exc})"
    return plan.describe()


def report(
    model_ref: str | None = None, n_ctx: int | None = None, probe_gpu: bool = True, selftest: bool = False
) -> dict[str, Any]:
    """Everything ``qvq doctor`` shows, as a dict (``--json`` prints it as is)."""
    from qvq_local import config, hardware
    from qvq_local.backends import registry

    facts = hardware.describe(probe_gpu=probe_gpu)
    if probe_gpu:  # what each backend's library says of this machine (llama.cpp's GPU offload, buffers)
        facts = registry.machine_facts(facts)
    out: dict[str, Any] = {"machine": facts, "backends": backend_report()}
    if selftest:
        from qvq_local import selftest as st

        out["selftest"] = [r.as_dict() for r in st.run()]
    try:
        out["settings"] = config.effective()
    except Exception as exc:  # noqa: BLE001 - a broken config file is reported, not fatal here
        out["settings_error"] = str(exc)
    out["detail"] = detail_report(facts, (out.get("settings") or {}).get("detail"))
    ref = model_ref or (out.get("settings") or {}).get("model")
    if ref:
        findings = model_integrity(str(ref))
        out["integrity"] = [{"level": f.level, "path": f.path, "message": f.message} for f in findings]
        out["integrity_errors"] = sum(f.level == "error" for f in findings)
        try:
            out["model"] = model_fit(
                str(ref),
                n_ctx,
                facts.get("memory_available_bytes"),
                facts.get("memory_total_bytes"),
                (facts.get("nvidia") or {}).get("memory"),
                facts.get("metal_working_set_bytes"),
            )
        except ModelError as exc:
            out["model_error"] = str(exc)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            if not out["integrity_errors"]:
                raise
            # a broken model (what the integrity findings describe) cannot be sized either
            out["model_error"] = f"{ref}: cannot estimate its memory needs ({type(exc).__name__}: {exc})"
    return out


def detail_report(facts: dict[str, Any], stored: str | None) -> dict[str, Any]:
    """The image detail ``qvq ask`` uses here (:mod:`qvq_local.detail`): the ``detail`` setting's level, else
    this machine's default, with why; each level's image tokens (QVQ's grid) and, on a CPU, its estimated
    encode time per image."""
    from qvq_local import detail

    machine = detail.Machine.from_facts(facts)
    default = detail.machine_default(machine)
    chosen = detail.resolve(stored, machine, source="the detail setting")
    out: dict[str, Any] = {
        **chosen.as_dict(),
        "max_image_tokens": detail.max_tokens(chosen.level),
        "machine_default": default.as_dict(),
        "levels": {level: detail.max_tokens(level) for level in detail.LEVELS},
    }
    if machine.encoder == "cpu":
        out["cpu_encode_s_estimate"] = {
            level: round(seconds, 1)
            for level in detail.LEVELS
            if (seconds := detail.estimate_cpu_encode_s(level, machine.cpu_count)) is not None
        }
    return out


def detail_line(row: dict[str, Any]) -> str:
    """doctor's line on the image detail: the level, its token budget, where it comes from."""
    level = f"{row['level']} (<= {row['max_image_tokens']:,} image tokens per image)"
    if row["source"] == "machine":
        where = f"this machine's default: {row['reason']}"
    else:
        default = row["machine_default"]
        where = f"from {row['source']}; this machine's default is {default['level']} ({default['reason']})"
    estimates = row.get("cpu_encode_s_estimate") or {}
    shown = row["source"] != "machine" and row["level"] in estimates  # a default's reason gives it already
    cost = f"; ~{estimates[row['level']]:g} s to encode one image here (estimated)" if shown else ""
    return f"{level}, {where}{cost}. Change it with --detail or `qvq config set detail LEVEL`"


def model_integrity(ref: str) -> list[Any]:
    """Header-only completeness checks of ``ref`` (:func:`qvq_local.integrity.check_model`): a download
    that stopped half-way, a missing shard or a projector from another model is named here, in plain
    words, instead of failing deep inside a backend at load time."""
    from qvq_local.integrity import check_model

    return check_model(ref)


# ----------------------------------------------------------------------------- printing
def print_doctor(model: str | None, context: int | None, as_json: bool, selftest: bool = False) -> int:
    """Print ``qvq doctor``'s report (a table, or JSON with ``as_json``); the exit code (:func:`exit_code`)."""
    import json

    if context is not None and context <= 0:
        raise InputError(f"--context must be above 0, got {context}")
    if selftest and not as_json and sys.stderr.isatty():
        from rich.console import Console

        with Console(stderr=True).status("self-test: a tiny model through each backend…", spinner="dots"):
            data = report(model, context, selftest=True)
    else:
        data = report(model, context, selftest=selftest)
    if as_json:
        print(json.dumps(data, indent=2, default=str))
        return exit_code(data)
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()
    m = data["machine"]
    table = Table(show_header=False, box=None, padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    table.add_row("platform", f"{m['os']} {m['os_release']} ({m['machine']}), Python {m['python']}")
    cpu = m.get("cpu") or {}
    table.add_row(
        "cpu",
        f"{cpu.get('model') or cpu.get('arch', '?')}, {m.get('cpu_count')} cores; "
        f"features: {' '.join(cpu.get('features') or []) or 'none of AVX2/AVX-512/AMX/NEON reported'}",
    )
    table.add_row(
        "memory",
        f"{memory_size(m.get('memory_total_bytes'))} total, {memory_size(m.get('memory_available_bytes'))} available",
    )
    gpu = []
    if m.get("llama_gpu_offload") is not None:
        gpu.append("llama.cpp GPU offload " + ("yes" if m["llama_gpu_offload"] else "no (CPU only)"))
    if m.get("cuda"):
        gpu.append("CUDA")
    if m.get("metal"):
        gpu.append("Metal")
    nvidia = m.get("nvidia") or {}
    if nvidia.get("present"):
        names = ", ".join(nvidia.get("gpus") or []) or "NVIDIA GPU"
        driver = f" (driver {nvidia['driver']})" if nvidia.get("driver") else ""
        gpu.insert(0, f"{names}{driver}")
    table.add_row("gpu", ", ".join(gpu) or "none found")
    if m.get("llama_backends"):
        table.add_row("llama.cpp build", ", ".join(m["llama_backends"]))
    if m.get("llama_cpu_buffers"):
        table.add_row("llama.cpp weights", escape(m["llama_cpu_buffers"]))
    for row in data["backends"]:
        versions = ", ".join(f"{k} {v}" for k, v in row["versions"].items() if v)
        state = (
            f"[green]installed[/green] ({versions})"
            if row["installed"]
            else f"[red]not installed[/red] (missing {', '.join(row['missing'])}; "
            + escape(row["install_hint"] + ")")
        )
        table.add_row(f"backend {row['backend']}", state)
    table.add_row("default backend", str(m.get("default_backend") or m.get("default_backend_error")))
    table.add_row("convert target", str(m.get("default_convert_target")))
    settings = data.get("settings") or {}
    table.add_row("default model", str(settings.get("model") or "(none: qvq config set model REF)"))
    if data.get("detail"):
        table.add_row("image detail", escape(detail_line(data["detail"])))
    if data.get("settings_error"):
        table.add_row("settings", f"[red]{escape(data['settings_error'])}[/red]")
    console.print(table)
    if m.get("gpu_warning"):
        console.print(f"[yellow]warning:[/yellow] {escape(m['gpu_warning'])}", soft_wrap=True)
    for row in data.get("selftest") or []:
        colour = {"pass": "green", "skipped": "yellow"}.get(row["status"], "red")
        console.print(
            f"self-test {row['backend']:<6} [{colour}]{row['status']}[/{colour}] "
            f"({row['seconds']:.1f} s): {escape(row['detail'])}",
            soft_wrap=True,
            highlight=False,
        )
    if "model" in data:
        row = data["model"]
        mt = Table(
            show_header=False, box=None, padding=(0, 2), title=f"model {row['name']}", title_justify="left"
        )
        mt.add_column(style="bold")
        mt.add_column()
        mt.add_row("family", escape(row.get("family") or "unknown"))
        mt.add_row("format", escape(f"{row['format']} ({row['quantization']}) at {row['path']}"))
        mt.add_row("weights", memory_size(row["weights_bytes"]))
        if row.get("cpu_buffers"):
            mt.add_row("llama.cpp buffers", escape(row["cpu_buffers"]))
        mt.add_row(
            "KV cache",
            f"{memory_size(row['kv_cache_bytes'])} for {row['context_tokens']} tokens of context "
            f"(trained for {row['trained_context']})",
        )
        mt.add_row("overhead", memory_size(row["overhead_bytes"]))
        colour = {True: "green", False: "red"}.get(row["fits"], "yellow")
        mt.add_row(
            "needs",
            f"{memory_size(row['needed_bytes'])} of {memory_size(row['available_bytes'])} available: "
            f"[{colour}]{row['verdict']}[/{colour}]",
        )
        if row.get("gpu"):
            mt.add_row("gpu", escape(gpu_fit_line(row["gpu"])))
        if row.get("metal"):
            mt.add_row("metal", escape(metal_fit_line(row["metal"])))
        console.print(mt)
    elif data.get("model_error") and not data.get("integrity_errors"):  # else the findings below say why
        console.print(f"[red]model: {escape(data['model_error'])}[/red]", soft_wrap=True)
    findings = data.get("integrity") or []
    if findings:
        console.print("[bold]model files[/bold]")
        colours = {"ok": "green", "warning": "yellow", "error": "red"}
        for f in findings:
            colour = colours.get(f["level"], "white")
            # one line per finding whatever the terminal width: a path must stay copyable
            line = f"  [{colour}]{f['level']:<7}[/{colour}] {escape(f['path'])}: {escape(f['message'])}"
            console.print(line, soft_wrap=True, highlight=False)
    return exit_code(data)


def metal_fit_line(metal: dict[str, Any]) -> str:
    """doctor's line on a model and the memory Metal lets the GPU wire on a Mac."""
    have = f"Metal may wire {memory_size(metal['working_set_bytes'])} of this Mac's memory"
    needs = f"the model needs {memory_size(metal['needed_bytes'])}"
    if metal["fits"]:
        return f"{have}; {needs}: it fits"
    if metal.get("sysctl"):
        return f"{have}; {needs}: raise the limit until the next restart with `{metal['sysctl']}`"
    if metal.get("total_bytes"):
        return f"{have}; {needs}: too much for this Mac, whose system needs the rest"
    return f"{have}; {needs}: more than Metal may use"


def gpu_fit_line(gpu: dict[str, Any]) -> str:
    """doctor's line on a GGUF's layers and the NVIDIA GPUs' free memory."""
    where = f"{', '.join(gpu['gpus'])} ({memory_size(gpu['free_bytes'])} free)"
    if gpu["fits"]:
        return f"all {gpu['layers']} layers and the vision encoder fit on {where}: needs {memory_size(gpu['needed_bytes'])}"
    if not gpu["gpu_layers"]:
        return (
            f"needs {memory_size(gpu['needed_bytes'])}; not one layer fits on {where}:"
            " --gpu-layers 0 runs it on the CPU"
        )
    return (
        f"needs {memory_size(gpu['needed_bytes'])}, more than {where}: --gpu-layers {gpu['gpu_layers']} puts"
        f" {gpu['gpu_layers']} of {gpu['layers']} layers there and runs the rest on the CPU"
    )


def exit_code(data: dict[str, Any]) -> int:
    """``qvq doctor``'s exit code once the report is printed: 3 (as a ModelError would) when the integrity
    checks found a model that will not load, 4 when a backend crashed or failed its self-test, each with
    one ``error:`` line on stderr naming the first problem; else 0."""
    errors = [f for f in data.get("integrity") or [] if f["level"] == "error"]
    if not errors:
        bad = [r for r in data.get("selftest") or [] if r["status"] in ("crash", "fail")]
        if bad:
            print(f"error: self-test of the {bad[0]['backend']} backend: {bad[0]['detail']}", file=sys.stderr)
            return EXIT_SELFTEST_FAILED
        return 0

    first = errors[0]
    more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    print(f"error: {first['path']}: {first['message']}{more}", file=sys.stderr)
    return ModelError.exit_code
