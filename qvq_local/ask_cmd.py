"""The wiring behind ``qvq ask`` and ``qvq doctor``: options in, renderer chosen, events driven.

Kept out of ``cli.py`` so the Typer module stays argument parsing only, and so this logic can be called
(and tested) without Typer.  Order matters for a good experience: the images are checked *before* the
model is loaded (a typo in a file name should not cost a minute of loading), and the transcript folder is
checked before any generation.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qvq_local.errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    from typing_extensions import Self

    from qvq_local.settings import AskSettings

EXIT_INTERRUPTED = 130


@dataclass
class AskOptions:
    """What ``qvq ask`` was given, unchecked.  :func:`build_settings` makes the question's settings of it;
    the rest (images, model, output) is this command's own."""

    args: list[str] = field(default_factory=list)  # IMAGE... QUESTION
    attach: list[str] = field(default_factory=list)
    model: str | None = None
    backend: str | None = None
    think_budget: int | None = None
    answer_budget: int | None = None
    max_pixels: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    system: str | None = None
    loop_detection: bool = True
    lang_lock: str = "auto"
    as_json: bool = False
    hide_thinking: bool = False
    save: Path | None = None
    cpu_buffers: str | None = None
    gpu_layers: str | None = None
    cache: bool = True  # reuse/keep the image prefix's KV state in QVQ_HOME/cache (--no-cache: off)
    # --backend openai: the server, its key and its kind (None: the base_url / server_kind settings)
    base_url: str | None = None
    api_key: str | None = None
    server_kind: str | None = None
    samples: int = 1


def split_args(args: list[str], attach: list[str]) -> tuple[list[str], str]:
    """``IMAGE... QUESTION`` plus ``-a`` images -> (images, question)."""
    if not args:
        raise InputError('give one or more images and a question, e.g. qvq ask chart.png "What is shown?"')
    question = args[-1]
    images = [*args[:-1], *attach]
    if not images:
        if Path(question).suffix.lower() in (
            ".png",
            ".jpg",
            ".jpeg",
            ".webp",
            ".gif",
            ".bmp",
            ".tif",
            ".tiff",
        ):
            raise InputError(f"no question given after the image {question!r}")
        raise InputError("no image given: pass one or more images before the question (or -a IMAGE)")
    if not question.strip():
        raise InputError("the question is empty")
    from qvq_local.settings import check_text

    check_text(question, "the question")  # before a model is loaded for it
    return images, question


def build_settings(opts: AskOptions) -> AskSettings:
    """The one settings object of this question: the options given, then ``qvq config``'s defaults (the
    backend from ``$QVQ_BACKEND`` first) for those left out, checked once.

    A value that came from the options is named by its flag in a message (``--think-budget must be above
    0``), one that came from the settings file by its key (``the think_budget setting must be above 0``).
    """
    from qvq_local import config
    from qvq_local.backends.base import SamplingParams
    from qvq_local.settings import CLI_LABELS, DEFAULT_ANSWER_BUDGET, AskSettings

    labels = dict(CLI_LABELS)
    stored: dict[str, Any] | None = None
    values: dict[str, Any] = {}
    for name in ("backend", "think_budget", "answer_budget", "max_pixels"):
        value = getattr(opts, name)
        if value is None:
            if stored is None:
                stored = config.effective()
            value = stored.get(name)
            labels[name] = f"the {name} setting"
        values[name] = value
    return AskSettings(
        think_budget=values["think_budget"],
        answer_budget=DEFAULT_ANSWER_BUDGET if values["answer_budget"] is None else values["answer_budget"],
        max_pixels=values["max_pixels"],
        sampling=SamplingParams(
            temperature=opts.temperature,
            top_p=opts.top_p,
            top_k=opts.top_k,
            repetition_penalty=opts.repetition_penalty,
            seed=opts.seed,
        ),
        system=opts.system,
        loop_detection=opts.loop_detection,
        lang_lock=opts.lang_lock,
        backend=values["backend"] or "auto",
        cpu_buffers=opts.cpu_buffers,
        gpu_layers=opts.gpu_layers,
        samples=opts.samples,
        labels=labels,
    )


def _make_renderer(opts: AskOptions, model: Any):
    from qvq_local.render import JsonRenderer, LiveRenderer, PlainRenderer

    if opts.as_json:
        return JsonRenderer(sys.stdout)
    if sys.stdout.isatty():
        return LiveRenderer(
            hide_thinking=opts.hide_thinking,
            model=model.name,
            backend=model.backend,
            quantization=model.quantization,
        )
    return PlainRenderer(sys.stdout, sys.stderr, hide_thinking=opts.hide_thinking)


def _load_model(opts: AskOptions, settings: AskSettings):
    from qvq_local.api import load

    kw = {
        "backend": settings.backend,
        "max_pixels": settings.max_pixels,
        "cpu_buffers": settings.cpu_buffers,
        "n_gpu_layers": settings.gpu_layers,
    }
    if opts.base_url or opts.api_key or opts.server_kind:
        kw.update(base_url=opts.base_url, api_key=opts.api_key, server_kind=opts.server_kind)
    if sys.stderr.isatty() and not opts.as_json:
        from rich.console import Console

        with Console(stderr=True).status("loading the model…", spinner="dots"):
            model = load(opts.model, progress=True, **kw)
    else:
        model = load(opts.model, progress=False, **kw)
    _warn_gpu_unused(model)
    return model


def _use_disk_cache(model: Any, enabled: bool) -> None:
    """One question per process: the prefix cache lives on disk (QVQ_HOME/cache), not in memory."""
    from qvq_local import prefix_cache

    model.prefix_cache = None
    model.disk_cache = prefix_cache.disk_cache(lambda line: print(line, file=sys.stderr)) if enabled else None


def _warn_gpu_unused(model: Any) -> None:
    """One stderr line when an NVIDIA GPU sits idle because llama-cpp-python was built without CUDA."""
    if model.backend != "llama" or getattr(model.loaded, "gpu_offload", True):
        return
    from qvq_local.hardware import detect_nvidia, gpu_build_warning

    warning = gpu_build_warning(detect_nvidia(run_smi=False), ())
    if warning:
        print(f"warning: {warning}", file=sys.stderr)


class SigintFlag:
    """While active, Ctrl-C both raises KeyboardInterrupt (as usual) and sets a flag that stays set.

    The flag matters when the KeyboardInterrupt is lost: Python raises it in whatever Python code runs
    next, and if that is a callback invoked from C (llama.cpp calls a Python log hook while it encodes an
    image), ctypes prints and drops it.  :func:`qvq_local.api.drive` polls the flag after every event.
    """

    def __init__(self) -> None:
        self.set = False
        self._previous = None
        self._previous_hook = None

    def _handler(self, signum, frame) -> None:
        self.set = True
        raise KeyboardInterrupt

    def _unraisable(self, unraisable) -> None:
        """Keep ctypes from printing a traceback for the Ctrl-C it swallowed; the flag carries it."""
        if isinstance(unraisable.exc_value, KeyboardInterrupt):
            self.set = True
            return
        (self._previous_hook or sys.__unraisablehook__)(unraisable)

    def __enter__(self) -> Self:
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
            self._previous_hook = sys.unraisablehook
            sys.unraisablehook = self._unraisable
        return self

    def __exit__(self, *exc: object) -> None:
        import signal

        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            sys.unraisablehook = self._previous_hook or sys.__unraisablehook__
            self._previous = None


def run_ask(opts: AskOptions) -> int:
    """Run one question; return the exit code (0, or 130 after Ctrl-C).  QvqError propagates."""
    from qvq_local.api import prepare_images

    images, question = split_args(opts.args, opts.attach)
    settings = build_settings(opts)
    if opts.save is not None:
        folder = opts.save.parent if str(opts.save.parent) else Path(".")
        if not folder.is_dir():
            raise InputError("the folder for --save does not exist", path=folder)
        if opts.save.is_dir():
            raise InputError("--save needs a file name, this is a folder", path=opts.save)
    prepared = prepare_images(images, settings.max_pixels)  # fail on a bad image before loading a model

    with SigintFlag() as sigint:
        return _ask_loaded(opts, settings, question, prepared, sigint)


def _ask_loaded(
    opts: AskOptions, settings: AskSettings, question: str, prepared: list, sigint: SigintFlag
) -> int:
    from qvq_local.api import drive

    try:
        model = _load_model(opts, settings)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    if sigint.set:  # Ctrl-C while the model loaded, swallowed inside a C callback
        model.close()
        return EXIT_INTERRUPTED
    _use_disk_cache(model, opts.cache)
    handlers = []
    if opts.save is not None:
        from qvq_local.transcript import TranscriptSink

        handlers.append(TranscriptSink(opts.save, question).handle)
    renderer = None
    try:
        events = model.stream_settings(prepared, question, settings)
        renderer = _make_renderer(opts, model)
        handlers.append(renderer.handle)
        drive(events, *handlers, stop_requested=lambda: sigint.set)
    except KeyboardInterrupt:
        if renderer is not None:
            renderer.close()
        if opts.save is not None and opts.save.exists():
            print(f"partial transcript saved to {opts.save}", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if renderer is not None:
            renderer.close()
        model.close()
    return 0


# ---------------------------------------------------------------- doctor


def _human(n: int | None) -> str:
    if n is None:
        return "?"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def print_doctor(model: str | None, context: int | None, as_json: bool, selftest: bool = False) -> None:
    import json

    from qvq_local.doctor import report

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
        _doctor_exit(data)
        return
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
        f"{_human(m.get('memory_total_bytes'))} total, {_human(m.get('memory_available_bytes'))} available",
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
        fit = data["model"]
        mt = Table(
            show_header=False, box=None, padding=(0, 2), title=f"model {fit['name']}", title_justify="left"
        )
        mt.add_column(style="bold")
        mt.add_column()
        mt.add_row("family", escape(fit.get("family") or "unknown"))
        mt.add_row("format", escape(f"{fit['format']} ({fit['quantization']}) at {fit['path']}"))
        mt.add_row("weights", _human(fit["weights_bytes"]))
        if fit.get("cpu_buffers"):
            mt.add_row("llama.cpp buffers", escape(fit["cpu_buffers"]))
        mt.add_row(
            "KV cache",
            f"{_human(fit['kv_cache_bytes'])} for {fit['context_tokens']} tokens of context "
            f"(trained for {fit['trained_context']})",
        )
        mt.add_row("overhead", _human(fit["overhead_bytes"]))
        colour = {True: "green", False: "red"}.get(fit["fits"], "yellow")
        mt.add_row(
            "needs",
            f"{_human(fit['needed_bytes'])} of {_human(fit['available_bytes'])} available: "
            f"[{colour}]{fit['verdict']}[/{colour}]",
        )
        if fit.get("gpu"):
            mt.add_row("gpu", escape(gpu_fit_line(fit["gpu"])))
        if fit.get("metal"):
            mt.add_row("metal", escape(metal_fit_line(fit["metal"])))
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
    _doctor_exit(data)


def metal_fit_line(metal: dict[str, Any]) -> str:
    """doctor's line on a model and the memory Metal lets the GPU wire on a Mac."""
    have = f"Metal may wire {_human(metal['working_set_bytes'])} of this Mac's memory"
    needs = f"the model needs {_human(metal['needed_bytes'])}"
    if metal["fits"]:
        return f"{have}; {needs}: it fits"
    if metal.get("sysctl"):
        return f"{have}; {needs}: raise the limit until the next restart with `{metal['sysctl']}`"
    if metal.get("total_bytes"):
        return f"{have}; {needs}: too much for this Mac, whose system needs the rest"
    return f"{have}; {needs}: more than Metal may use"


def gpu_fit_line(gpu: dict[str, Any]) -> str:
    """doctor's line on a GGUF's layers and the NVIDIA GPUs' free memory."""
    where = f"{', '.join(gpu['gpus'])} ({_human(gpu['free_bytes'])} free)"
    if gpu["fits"]:
        return f"all {gpu['layers']} layers and the vision encoder fit on {where}: needs {_human(gpu['needed_bytes'])}"
    if not gpu["gpu_layers"]:
        return (
            f"needs {_human(gpu['needed_bytes'])}; not one layer fits on {where}:"
            " --gpu-layers 0 runs it on the CPU"
        )
    return (
        f"needs {_human(gpu['needed_bytes'])}, more than {where}: --gpu-layers {gpu['gpu_layers']} puts"
        f" {gpu['gpu_layers']} of {gpu['layers']} layers there and runs the rest on the CPU"
    )


#: ``qvq doctor --selftest`` exit code when a backend crashed or failed its self-test.
EXIT_SELFTEST_FAILED = 4


def _doctor_exit(data: dict[str, Any]) -> None:
    """Exit 3 (as a ModelError would) when the integrity checks found a model that will not load, after
    the report is printed, with one ``error:`` line on stderr naming the first problem; exit 4 when a
    backend crashed or failed its self-test."""
    import typer

    errors = [f for f in data.get("integrity") or [] if f["level"] == "error"]
    if not errors:
        bad = [r for r in data.get("selftest") or [] if r["status"] in ("crash", "fail")]
        if bad:
            print(f"error: self-test of the {bad[0]['backend']} backend: {bad[0]['detail']}", file=sys.stderr)
            raise typer.Exit(EXIT_SELFTEST_FAILED)
        return

    from qvq_local.errors import ModelError

    first = errors[0]
    more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    print(f"error: {first['path']}: {first['message']}{more}", file=sys.stderr)
    raise typer.Exit(ModelError.exit_code)
