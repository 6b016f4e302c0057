"""The wiring behind ``qvq ask``: options in, renderer chosen, events driven.

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
    own type when the model is loaded.  ``mmproj``: a GGUF model's vision projector (``--mmproj``).  The
    rest (images, model, output) is this command's own.
    """

    args: list[str] = field(default_factory=list)  # IMAGE... QUESTION
    attach: list[str] = field(default_factory=list)
    model: str | None = None
    backend: str | None = None
    mmproj: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    load_options: dict[str, Any] = field(default_factory=dict)
    as_json: bool = False
    hide_thinking: bool = False
    save: Path | None = None
    cache: bool = True  # reuse/keep the image prefix's KV state in QVQ_HOME/cache (--no-cache: off)
    frames: bool = False  # --frames: the IMAGE... arguments (files, or one folder) are one clip's frames


def flag(name: str) -> str:
    """How ``qvq ask`` spells an option: ``gpu_layers`` -> ``--gpu-layers``."""
    return "--" + name.replace("_", "-")


def split_args(args: list[str], attach: list[str]) -> tuple[list[str], str]:
    """``IMAGE... QUESTION`` plus ``-a`` images -> (images, question)."""
    if not args:
        raise InputError(
            'give one or more images and a question, e.g. qvq ask chart.png "What is shown?" '
            '(or a clip: qvq ask clip.mp4 "What happens?")'
        )
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
            ".mp4",
            ".mov",
            ".mkv",
            ".webm",
            ".avi",
        ):
            raise InputError(f"no question given after the image {question!r}")
        raise InputError("no image given: pass one or more images before the question (or -a IMAGE)")
    if not question.strip():
        raise InputError("the question is empty")
    from qvq_local.settings import check_text

    check_text(question, "the question")  # before a model is loaded for it
    return images, question


#: The question's options ``qvq config`` has defaults for (the rest default to AskSettings' own).
STORED_DEFAULTS = ("think_budget", "answer_budget", "max_pixels", "detail")
#: Options that say one thing together, the images' bound: one given on the command line keeps the others'
#: stored defaults out (``--detail high`` is not overruled by a stored ``max_pixels``).
IMAGE_BOUND = ("max_pixels", "detail")


def build_settings(request: AskRequest) -> AskSettings:
    """The one settings object of this question: the options given, then ``qvq config``'s defaults for
    those left out, checked once.  The images' bound (``--max-pixels``, ``--detail``) is one choice: when
    either is given, neither comes from the settings; within one place, a pixel bound wins over a level.

    A value that came from the options is named by its flag in a message (``--think-budget must be above
    0``), one that came from the settings file by its key (``the think_budget setting must be above 0``).
    """
    from qvq_local import config
    from qvq_local.budgets import DEFAULT_ANSWER_BUDGET
    from qvq_local.settings import CLI_LABELS, AskSettings

    labels = dict(CLI_LABELS)
    values = dict(request.options)
    bound_given = any(values.get(name) is not None for name in IMAGE_BOUND)
    missing = [
        name
        for name in STORED_DEFAULTS
        if values.get(name) is None and not (bound_given and name in IMAGE_BOUND)
    ]
    if missing:
        stored = config.effective()
        for name in missing:
            values[name] = stored.get(name)
            if values[name] is not None:  # a value the settings file gave is named by its key
                labels[name] = f"the {name} setting"
    if values.get("answer_budget") is None:
        values["answer_budget"] = DEFAULT_ANSWER_BUDGET
    if values.get("speculate") is None:  # --draft alone asks for its guesses; nothing: plain decoding
        values["speculate"] = "draft" if request.load_options.get("draft") else "off"
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


def load_model(request: AskRequest, how: LoadRequest):
    """Load the model as ``qvq ask`` does (a spinner on a terminal, the backend's notices after); the
    question's settings bound its images, so the model gets no bound of its own here."""
    from qvq_local.api import load

    kw: dict[str, Any] = {"backend": how.backend, "labels": dict(how.labels), **how.options}
    if request.mmproj is not None:
        kw["mmproj"] = request.mmproj
        kw["labels"]["mmproj"] = "--mmproj"
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
    image), ctypes prints and drops it.  :func:`qvq_local.driver.drive` polls the flag after every event.
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


def read_media(paths: list[str], *, frames: bool = False) -> Any:
    """What the question is about, checked before a model loads: a clip (its header read: a missing PyAV,
    a corrupt file or one without video fails here), ``--frames`` (the files, or a folder's images, exist),
    or images (read and checked, bounded once the model's grid is known)."""
    from qvq_local.images import read_images
    from qvq_local.video import frame_files, probe_video
    from qvq_local.video_prompt import ClipInput, split_media

    if frames:
        files = frame_files(paths)
        for file in files:
            if not file.is_file():
                raise InputError("no such image file", path=file)
        return ClipInput(frames=tuple(paths))
    clip, images = split_media(paths)
    if clip is not None:
        probe_video(clip.path)
        return clip
    return read_images(images)


def run_ask(request: AskRequest) -> int:
    """Run one question; return the exit code (0, or 130 after Ctrl-C).  QvqError propagates."""
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
    sources = read_media(images, frames=request.frames)  # a bad file fails before a model loads

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
    from qvq_local.driver import drive

    try:
        model = load_model(request, how)
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
