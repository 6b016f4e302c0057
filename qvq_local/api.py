"""The Python API the CLI is a thin shell over: :func:`load` opens a model, :func:`ask` asks once.

    import qvq_local
    model = qvq_local.load("~/models/qvq-q4")                 # or a name from `qvq models`, a hub id
    for event in model.stream(["chart.png"], "Which bar is highest?", think_budget=512):
        ...                                                   # Started, TextDelta, Forced, Finished
    result = model.ask("chart.png", "Which bar is highest?", think_budget=512)
    print(result.answer, result.boxed, result.stop_reason, result.timings)

``load`` resolves the reference (``qvq_local.hub``), picks the backend (``qvq_local.hardware``), checks
that backend's load options (its own type, named in ``qvq_local.backends.registry``) and loads the weights
once, into a :class:`qvq_local.model.Model`.  One question on it runs in :mod:`qvq_local.question`;
:func:`qvq_local.driver.drive` drives its events to the Result, Ctrl-C included.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from qvq_local.backends import registry
from qvq_local.detail import check_level
from qvq_local.errors import InputError, ModelError
from qvq_local.events import Result
from qvq_local.model import Model

NO_MODEL_HELP = (
    "no model given and no default model configured: pass --model REF, or set one with "
    "`qvq config set model REF` (or QVQ_MODEL=REF). To try the pipeline with random weights: "
    "`qvq synth .demo/tiny` then `qvq convert .demo/tiny`; for the real model: `qvq pull qvq` "
    "then `qvq config set model qvq` (`qvq models --available` shows its size and whether it fits)"
)


def load(
    ref: str | Path | None = None,
    *,
    backend: str = "auto",
    max_pixels: int | None = None,
    detail: str | None = None,
    mmproj: str | Path | None = None,
    download: bool = True,
    progress: bool = False,
    labels: Mapping[str, str] | None = None,
    draft: str | Path | None = None,
    **options: Any,
) -> Model:
    """Resolve ``ref`` (a GGUF file, an MLX or HF folder, a name from ``qvq models``, a hub id; None: the
    configured default), choose the backend and load the weights.

    ``options`` are the chosen backend's load options, by name (its type in the registry; a value None
    is not given): ``backend="llama"`` takes ``gpu_layers`` (text layers on the GPU; None:
    ``$QVQ_GPU_LAYERS``, else all where llama.cpp has a GPU backend; -1 or "all": all; 0: CPU only) and
    ``cpu_buffers`` (auto | all | no-amx | none), both explained in :mod:`qvq_local.backends.llama_buffers`;
    ``backend="mlx"`` takes none.  ``backend="openai"`` talks to an OpenAI-compatible server instead:
    ``ref`` is the model's name there (None: the one it serves) and its options are ``base_url`` (e.g.
    ``http://127.0.0.1:8000/v1``), ``api_key`` (None: ``$QVQ_API_KEY``/``$OPENAI_API_KEY``, for QVQ-Max
    ``$DASHSCOPE_API_KEY``) and ``server_kind`` (auto | qvq | qvq-max | vllm | llama-server | generic;
    :mod:`qvq_local.backends.openai_remote`).  An option not given takes the ``qvq config`` setting of the
    same name where there is one (``base_url``, ``server_kind``).  With ``backend="auto"`` each option must
    be one some local backend takes; the one chosen gets those it takes.  ``labels``: how the caller
    spells each option in messages (the CLI passes its flags).  ``draft``: a small model sharing the
    tokenizer (a Qwen2-VL / Qwen2.5 of the same format), loaded through the same backend with the same
    options, whose guesses questions asked with ``speculate="draft"`` or ``"auto"`` check
    (:mod:`qvq_local.speculate`; the backend needs the registry's ``speculation`` capability).

    ``max_pixels`` / ``detail``: how the model's questions bound their images when a question says
    nothing (a pixel bound wins over a level; neither: the default level of the machine that encodes,
    :mod:`qvq_local.detail`).  ``mmproj``: the vision projector of a GGUF model, a file (instead of the one
    beside the model), or for a hub repo a projector's file name or type there (``f16``).

    The options are checked before anything is resolved or downloaded.  Raises ``ModelError`` (unknown or
    broken model, wrong format for the backend), ``BackendUnavailable`` (the backend's library is missing,
    naming the pip line) or ``InputError`` (a bad option, or one the backend does not take).
    """
    from qvq_local import config, hardware, hub
    from qvq_local.formats.manifest import normalize_quantization

    name = registry.canonical(backend)  # the one place the API maps what the caller typed to a name
    given = {k: v for k, v in options.items() if v is not None}
    labels = dict(labels or {})
    if detail is not None:
        check_level(detail, labels.get("detail", "detail"))  # before anything is resolved
    if name != registry.AUTO and registry.BACKENDS[name].has(registry.REMOTE):
        spec = registry.BACKENDS[name]
        if draft is not None:
            raise InputError(f"{labels.get('draft', 'draft')}: the {spec.title} backend cannot check guesses")
        if mmproj is not None:
            raise InputError(
                f"{labels.get('mmproj', 'mmproj')} goes with a local GGUF model; the {spec.name} backend's"
                " server holds its own vision tower"
            )
        checked = _options_of(spec, given, labels, config)
        t0 = time.perf_counter()
        remote = spec.open_model(str(ref) if ref is not None and str(ref).strip() else None, checked)
        return Model(
            remote,
            name=remote.name,
            spec=spec,
            quantization=remote.quantization,
            max_pixels=max_pixels,
            detail=detail,
            load_s=time.perf_counter() - t0,
        )
    # every backend that may run the model gets its options checked now, before a download
    candidates = (
        [registry.BACKENDS[name]]
        if name != registry.AUTO
        else [registry.BACKENDS[n] for n in registry.names()]
    )
    shared = registry.share_options([spec.name for spec in candidates], given, labels)
    checked_for = {spec.name: _options_of(spec, shared[spec.name], labels, config) for spec in candidates}
    if ref is None or not str(ref).strip():
        ref = config.default_model()
        if ref is None:
            raise ModelError(NO_MODEL_HELP)
    resolved = hub.resolve(ref, download=download, progress=progress, mmproj=mmproj)
    chosen = hardware.choose_backend(name, {resolved.format}, model_path=resolved.path)
    spec = registry.BACKENDS[chosen]
    t0 = time.perf_counter()
    loaded = spec.open_model(resolved, checked_for[chosen])
    load_s = time.perf_counter() - t0
    quantization = normalize_quantization(getattr(loaded, "quantization", "") or resolved.quantization)
    model = Model(
        loaded,
        name=resolved.name,
        spec=spec,
        quantization=quantization,
        path=resolved.path,
        max_pixels=max_pixels,
        detail=detail,
        load_s=load_s,
    )
    if draft is not None and str(draft).strip():
        try:
            model.draft = _load_draft(spec, draft, checked_for[chosen], labels, download, progress)
        except BaseException:
            model.close()
            raise
    return model


def _load_draft(
    spec: registry.BackendSpec, ref: str | Path, options: Any, labels: dict, download: bool, progress: bool
) -> Any:
    """The draft model, opened by the target's backend with its options (a draft must share the backend:
    its session runs beside the target's)."""
    from qvq_local import hub

    label = labels.get("draft", "draft")
    if not spec.has(registry.SPECULATION):
        raise InputError(f"{label}: the {spec.title} backend cannot check guesses")
    resolved = hub.resolve(ref, download=download, progress=progress)
    if resolved.format not in spec.formats:
        raise InputError(
            f"{label} {ref}: a {resolved.format} model, but the model runs on {spec.title}"
            f" ({', '.join(sorted(spec.formats))}); give a draft of the same format"
        )
    return spec.open_model(resolved, options)


def _options_of(
    spec: registry.BackendSpec, given: dict[str, Any], labels: dict[str, str], config: Any
) -> Any:
    """The backend's checked load options: ``given``, plus for each option not given the ``qvq config``
    setting of the same name where one exists and is set (a bad stored value is then named by its
    setting, not by the caller's option)."""
    values, labels = dict(given), dict(labels)
    for option in spec.options_type().names():
        if option not in values and option in config.SETTINGS:
            stored = config.get(option)
            if stored is not None:
                values[option] = stored
                labels[option] = f"the {option} setting"
    return spec.build_options(values, labels)


def ask(
    images: Any, question: str, *, model: str | Path | None = None, backend: str = "auto", **options: Any
) -> Result:
    """One-shot convenience: load ``model``, ask, close."""
    with load(model, backend=backend) as loaded:
        return loaded.ask(images, question, **options)


__all__ = ["ask", "load"]
