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
class AskRequest:
    """What ``qvq ask`` was given, unchecked, grouped by where each value goes (a value None: not given).

    ``options``: the question's, by :meth:`qvq_local.settings.AskSettings.build`'s names (``think_budget``,
    ``temperature``...); :func:`build_settings` makes the question's settings of them.  ``load_options``:
    the backend's load options by name (``gpu_layers``, ``base_url``...), checked by the chosen backend's
    own type when the model is loaded.  The rest (images, model, output) is this command's own.
    """

    args: list[str] = field(default_factory=list)  # IMAGE... QUESTION
    attach: list[str] = field(default_factory=list)
    model: str | None = None
    backend: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    load_options: dict[str, Any] = field(default_factory=dict)
    as_json: bool = False
    hide_thinking: bool = False
    save: Path | None = None
    cache: bool = True  # reuse/keep the image prefix's KV state in QVQ_HOME/cache (--no-cache: off)


def flag(name: str) -> str:
    """How ``qvq ask`` spells an option: ``gpu_layers`` -> ``--gpu-layers``."""
    return "--" + name.replace("_", "-")


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
    return images, question


#: The question's options ``qvq config`` has defaults for (the rest default to AskSettings' own).
STORED_DEFAULTS = ("think_budget", "answer_budget", "max_pixels")


def build_settings(request: AskRequest) -> AskSettings:
    """The one settings object of this question: the options given, then ``qvq config``'s defaults for
    those left out, checked once.

    A value that came from the options is named by its flag in a message (``--think-budget must be above
    0``), one that came from the settings file by its key (``the think_budget setting must be above 0``).
    """
    from qvq_local import config
    from qvq_local.settings import CLI_LABELS, DEFAULT_ANSWER_BUDGET, AskSettings

    labels = dict(CLI_LABELS)
    values = dict(request.options)
    missing = [name for name in STORED_DEFAULTS if values.get(name) is None]
    if missing:
        stored = config.effective()
        for name in missing:
            values[name] = stored.get(name)
            labels[name] = f"the {name} setting"
    if values.get("answer_budget") is None:
        values["answer_budget"] = DEFAULT_ANSWER_BUDGET
    return AskSettings.build(values, labels)


@dataclass(frozen=True)
class LoadRequest:
    """How ``qvq ask`` loads its model: the backend as given (``--backend``, else the stored setting, else
    auto; :func:`qvq_local.api.load` maps it to its name, once), the load options given (checked there by
    the chosen backend's own type) and their flags for messages."""

    backend: str
    options: dict[str, Any]
    labels: dict[str, str]


def load_request(request: AskRequest) -> LoadRequest:
    """The backend from ``--backend``, else ``qvq config``'s (``$QVQ_BACKEND`` first; stored by its
    canonical name), else auto; the load options given, each labelled with its flag."""
    from qvq_local import config

    backend = request.backend if request.backend is not None else config.get("backend")
    given = {k: v for k, v in request.load_options.items() if v is not None}
    return LoadRequest(backend or "auto", given, {name: flag(name) for name in given})


def _make_renderer(request: AskRequest, model: Any):
    from qvq_local.render import JsonRenderer, LiveRenderer, PlainRenderer

    if request.as_json:
        return JsonRenderer(sys.stdout)
    if sys.stdout.isatty():
        return LiveRenderer(
            hide_thinking=request.hide_thinking,
            model=model.name,
            backend=model.backend,
            quantization=model.quantization,
        )
    return PlainRenderer(sys.stdout, sys.stderr, hide_thinking=request.hide_thinking)


def _load_model(request: AskRequest, how: LoadRequest, settings: AskSettings):
    from qvq_local.api import load

    kw = {"backend": how.backend, "max_pixels": settings.max_pixels, "labels": how.labels, **how.options}
    if sys.stderr.isatty() and not request.as_json:
        from rich.console import Console

        with Console(stderr=True).status("loading the model…", spinner="dots"):
            model = load(request.model, progress=True, **kw)
    else:
        model = load(request.model, progress=False, **kw)
    show_notices(model)
    return model


def _use_disk_cache(model: Any, enabled: bool) -> None:
    """One question per process: the prefix cache lives on disk (QVQ_HOME/cache), not in memory."""
    from qvq_local import prefix_cache

    model.prefix_cache = None
    model.disk_cache = prefix_cache.disk_cache(lambda line: print(line, file=sys.stderr)) if enabled else None


def show_notices(model: Any) -> None:
    """One stderr line per warning the backend has about how the model loaded (an NVIDIA GPU sitting idle
    because llama-cpp-python was built without CUDA, say)."""
    for line in model.notices():
        print(f"warning: {line}", file=sys.stderr)


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


def run_ask(request: AskRequest) -> int:
    """Run one question; return the exit code (0, or 130 after Ctrl-C).  QvqError propagates."""
    from qvq_local.api import read_images

    images, question = split_args(request.args, request.attach)
    settings = build_settings(request)
    how = load_request(request)
    save = request.save
    if save is not None:
        folder = save.parent if str(save.parent) else Path(".")
        if not folder.is_dir():
            raise InputError("the folder for --save does not exist", path=folder)
        if save.is_dir():
            raise InputError("--save needs a file name, this is a folder", path=save)
    sources = read_images(images)  # fail on a bad image before loading a model; bounded once, for it

    with SigintFlag() as sigint:
        return _ask_loaded(request, how, settings, question, sources, sigint)


def _ask_loaded(
    request: AskRequest,
    how: LoadRequest,
    settings: AskSettings,
    question: str,
    sources: list,
    sigint: SigintFlag,
) -> int:
    from qvq_local.api import drive

    try:
        model = _load_model(request, how, settings)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    if sigint.set:  # Ctrl-C while the model loaded, swallowed inside a C callback
        model.close()
        return EXIT_INTERRUPTED
    _use_disk_cache(model, request.cache)
    handlers = []
    if request.save is not None:
        from qvq_local.transcript import TranscriptSink

        handlers.append(TranscriptSink(request.save, question).handle)
    renderer = None
    try:
        events = model.stream_settings(sources, question, settings)
        renderer = _make_renderer(request, model)
        handlers.append(renderer.handle)
        drive(events, *handlers, stop_requested=lambda: sigint.set)
    except KeyboardInterrupt:
        if renderer is not None:
            renderer.close()
        if request.save is not None and request.save.exists():
            print(f"partial transcript saved to {request.save}", file=sys.stderr)
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
