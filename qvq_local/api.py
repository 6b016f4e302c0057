"""The Python API the CLI is a thin shell over.

    import qvq_local
    model = qvq_local.load("~/models/qvq-q4")                 # or a name from `qvq models`, a hub id
    for event in model.stream(["chart.png"], "Which bar is highest?", think_budget=512):
        ...                                                   # Started, TextDelta, Forced, Finished
    result = model.ask("chart.png", "Which bar is highest?", think_budget=512)
    print(result.answer, result.boxed, result.stop_reason, result.timings)

``load`` resolves the reference (``qvq_local.models``), picks the backend (``qvq_local.hardware``), checks
that backend's load options (its own type, named in ``qvq_local.backends.registry``) and loads the weights
once.  What a loaded model can do beyond the Session protocol (count tokens, list its vocabulary, fork
chains, reuse a prefix, leave the budget to a server) is its backend's registry capabilities: this module
asks the registry, never the object.  ``Model.stream`` does one question: it loads and bounds the images, renders the
prompt from the model's own chat template, sizes the context for prompt + image tokens + both budgets
(refusing with :class:`ContextOverflow` before any decoding when they cannot fit), prefills, emits
``Started`` and then whatever the reasoning controller emits, and fills the final ``Result`` with what
only this layer knows (model, backend, images, settings, load and prefill timings).

Ctrl-C: wherever ``KeyboardInterrupt`` lands (inside the generator while it decodes, or in the caller's
loop body), the stream still ends with ``Finished(stop_reason="interrupted")`` holding the partial thought
and answer, and then the interrupt propagates.  Callers that draw events use :func:`drive`, which
handles both places; ``Model.ask`` uses it and attaches the partial result to the re-raised interrupt as
``exc.result``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qvq_local import prefix_cache
from qvq_local.backends import registry
from qvq_local.backends.base import ChatTurn, Prompt
from qvq_local.budgets import DEFAULT_ANSWER_BUDGET, FORCE_MARGIN, size_context
from qvq_local.errors import InputError, ModelError
from qvq_local.events import Event, Finished, Forced, ImageInfo, Result, Started, TextDelta, Timings

if TYPE_CHECKING:  # pragma: no cover
    from typing_extensions import Self

    from qvq_local.settings import AskSettings

NO_MODEL_HELP = (
    "no model given and no default model configured: pass --model REF, or set one with "
    "`qvq config set model REF` (or QVQ_MODEL=REF). To try the pipeline with random weights: "
    "`qvq synth .demo/tiny` then `qvq convert .demo/tiny`; for the real model: `qvq pull qvq` "
    "then `qvq config set model qvq` (`qvq models --available` shows its size and whether it fits)"
)


@dataclass
class PreparedImage:
    """An image already loaded and bounded (``qvq_local.images.load_image``), ready for a prompt."""

    image: Any  # PIL.Image.Image, RGB
    info: ImageInfo


@dataclass
class SourceImage:
    """An image file read and checked, at its own size (not bounded yet): what ``qvq ask`` holds while
    the model loads, so that a bad file fails before the load and the image is bounded once, on the grid
    of the model's family, by :func:`prepare_images`."""

    image: Any  # PIL.Image.Image, RGB, EXIF orientation applied
    path: str


def read_images(images: Any) -> list[SourceImage]:
    """Read and check each image (a single path is accepted as well as a list) without bounding it.

    Raises ``InputError`` naming the first bad file (missing, not an image, corrupt, empty, too large).
    """
    from qvq_local.images import MAX_SOURCE_PIXELS, load_image

    if isinstance(images, (str, Path)):
        images = [images]
    sources = []
    for item in images:
        if not isinstance(item, (str, Path)):
            raise InputError(f"expected an image path, got {type(item).__name__}")
        image, info = load_image(item, MAX_SOURCE_PIXELS, 1, factor=1)  # 1-pixel grid: kept as it is
        sources.append(SourceImage(image, info.path))
    if not sources:
        raise InputError("no image given: QVQ answers questions about images, pass at least one")
    return sources


def _bound(source: SourceImage, max_pixels: int | None, factor: int | None) -> PreparedImage:
    """``source`` bounded as :func:`qvq_local.images.load_image` bounds a file (same sizes, same filter)."""
    from PIL import Image

    from qvq_local.images import DEFAULT_MAX_PIXELS, FACTOR, bound_size, image_tokens

    grid = factor or FACTOR
    original = source.image.size
    size = bound_size(*original, max_pixels=max_pixels or DEFAULT_MAX_PIXELS, factor=grid)
    image = source.image if size == original else source.image.resize(size, Image.Resampling.BICUBIC)
    info = ImageInfo(path=source.path, original_size=original, size=size, tokens=image_tokens(*size, grid))
    return PreparedImage(image, info)


def prepare_images(
    images: Any, max_pixels: int | None = None, factor: int | None = None
) -> list[PreparedImage]:
    """Load, validate and bound each image; a single path is accepted as well as a list, and a
    :class:`SourceImage` (read already) is only bounded.

    ``factor``: the model family's image-token side (None: the default family's), so that an image is
    resized once, to sides the model's processor keeps.

    Raises ``InputError`` naming the first bad file (missing, not an image, corrupt, empty).
    """
    from qvq_local.images import load_image

    if isinstance(images, (str, Path, PreparedImage, SourceImage)):
        images = [images]
    prepared: list[PreparedImage] = []
    for item in images:
        if isinstance(item, SourceImage):
            prepared.append(_bound(item, max_pixels, factor))
            continue
        if isinstance(item, PreparedImage):
            w, h = item.info.size
            if not factor or (w % factor == 0 and h % factor == 0) or not Path(item.info.path).is_file():
                prepared.append(item)
                continue
            item = item.info.path  # bounded for another family's grid (before the model was known): redo
        if not isinstance(item, (str, Path)):
            raise InputError(f"expected an image path, got {type(item).__name__}")
        kw = {"factor": factor} if factor else {}
        image, info = load_image(item, max_pixels, **kw) if max_pixels else load_image(item, **kw)
        prepared.append(PreparedImage(image, info))
    if not prepared:
        raise InputError("no image given: QVQ answers questions about images, pass at least one")
    return prepared


def _count_text_tokens(spec: registry.BackendSpec, loaded: Any, text: str) -> int | None:
    """Tokens of the prompt's text (image pads left out) without opening a session; None when the backend
    cannot count them (no ``tokenizer`` capability)."""
    if not spec.has(registry.TOKENIZER):
        return None
    return len(loaded.tokenize(text.replace(_family_of(loaded).image_pad, ""), special=True))


def _family_of(loaded: Any) -> Any:
    """The loaded model's family (llama.cpp models carry it; MLX ones name it by model_type)."""
    from qvq_local.families import DEFAULT_FAMILY, family_for_model_type

    family = getattr(loaded, "family", None)
    if family is None:
        family = family_for_model_type((getattr(loaded, "config", None) or {}).get("model_type"))
    return family or DEFAULT_FAMILY


class _Tracker:
    """What the stream has produced so far, to build a partial Result on Ctrl-C."""

    def __init__(self) -> None:
        self.thought: list[str] = []
        self.answer: list[str] = []
        self.thought_tokens = 0
        self.answer_tokens = 0
        self.forced: list[Forced] = []
        self.finished: Result | None = None

    def see(self, event: Event) -> None:
        if isinstance(event, TextDelta):
            if event.phase == "thought":
                self.thought.append(event.text)
                self.thought_tokens += event.tokens
            else:
                self.answer.append(event.text)
                self.answer_tokens += event.tokens
        elif isinstance(event, Forced):
            self.forced.append(event)
        elif isinstance(event, Finished):
            self.finished = event.result


class Model:
    """A loaded model.  Open with :func:`load`; close with :meth:`close` or a ``with`` block.

    ``spec``: its backend's registry entry (what the loaded object can do is asked of it).
    """

    def __init__(
        self,
        loaded: Any,
        *,
        name: str,
        spec: registry.BackendSpec,
        quantization: str,
        path: Path | None = None,
        max_pixels: int | None = None,
        load_s: float = 0.0,
    ):
        self.loaded = loaded
        self.name = name
        self.spec = spec
        self.backend = spec.name
        self.quantization = quantization
        self.path = path
        self.max_pixels = max_pixels
        self.load_s = load_s
        self._vocab_scripts = None  # qvq_local.lang.VocabScripts of this model's tokenizer, built once
        self.lang_index_s = 0.0  # seconds that took
        # Prefix reuse (qvq_local.prefix_cache): the KV state after the system prompt and image(s) is kept
        # in memory across asks (LRU, capped in bytes); set ``disk_cache`` to keep it on disk too (the CLI
        # does), either to None to turn that part off.  ``cache_notice`` gets one-line notices.
        from qvq_local.prefix_cache import MemoryCache

        self.prefix_cache: MemoryCache | None = MemoryCache()
        self.disk_cache = None  # qvq_local.prefix_cache.DiskCache | None
        self.cache_notice: Callable[[str], None] = lambda line: None

    @property
    def context_length(self) -> int:
        return int(getattr(self.loaded, "context_length", 0) or 0)

    def __repr__(self) -> str:
        return f"Model({self.name!r}, backend={self.backend!r}, quantization={self.quantization!r})"

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.loaded is not None:
            self.loaded.close()
            self.loaded = None

    def notices(self) -> list[str]:
        """Warnings about how the model was loaded, one line each (its backend's ``load_notices`` hook)."""
        hook = self.spec.hook(registry.LOAD_NOTICES)
        return list(hook(self.loaded)) if hook is not None and self.loaded is not None else []

    # ------------------------------------------------------------------ one question
    def stream(self, images: Any, question: str, **options: Any) -> Iterator[Event]:
        """Ask ``question`` about ``images`` (paths or :class:`PreparedImage`); yield events as they come.

        The options (keywords) are :class:`qvq_local.settings.AskSettings`' with the sampling ones flat:
        ``think_budget`` caps thought tokens (None: up to :data:`qvq_local.budgets.DEFAULT_MAX_THOUGHT`, or
        what the context holds); ``answer_budget`` caps answer tokens.  ``system`` replaces the model family's system prompt
        (QVQ's for Qwen2-VL models; Qwen3-VL has none; ``""`` leaves the template's own default).  Sampling
        values left at None come from the model's generation_config.  ``forced_text`` (fed when thinking is
        cut) defaults to what suits the model and
        the question: ``</think>`` when the chat template opens ``<think>``, else QVQ's marker, after a
        sentence in the question's language (:func:`qvq_local.splitter.default_forced_text`).
        ``lang_lock`` (auto|on|off, see :mod:`qvq_local.lang`) keeps the thought in the question's scripts.
        ``samples`` > 1 runs that many reasoning chains from one prefill, decoded in one batch, each with
        its own budget, loop stop and forced answer; events of each chain come as ``ChainEvent`` and the
        ``Finished`` Result is the majority ``\\boxed{}`` answer's chain with every chain under ``chains``
        (:mod:`qvq_local.chains`; the backends with the registry's ``chains`` capability).  ``max_tokens``
        caps thought and answer together.
        The options become one :class:`qvq_local.settings.AskSettings` (:meth:`~AskSettings.build`),
        checked there (``InputError`` before anything runs; an unknown option is a ``TypeError``).  The
        last event is always ``Finished``.
        """
        from qvq_local.settings import AskSettings

        return self.stream_settings(images, question, AskSettings.build(options))

    def stream_settings(self, images: Any, question: str, settings: AskSettings) -> Iterator[Event]:
        """:meth:`stream` with its options already built and checked (:class:`qvq_local.settings.AskSettings`).

        ``settings.max_pixels`` None means the bound this model was loaded with.
        """
        from qvq_local import lang

        if self.loaded is None:
            raise ModelError("this model was closed; load it again")
        if not isinstance(question, str) or not question.strip():
            raise InputError("the question is empty")
        lock = lang.decide(question, settings.lang_lock)
        if settings.max_pixels is None and self.max_pixels is not None:
            settings = replace(settings, max_pixels=self.max_pixels)
        return self._stream(images, question, settings, lock)

    def language_mask(self, lock) -> tuple[Any, dict]:
        """The token mask for a language lock, and what to record in the settings.

        The script table is built once per loaded model (its tokenizer) and kept; each lock's mask once
        per script set.  A backend that cannot list its vocabulary runs unlocked, and says so.
        """
        if lock is None:
            return None, {"scripts": None}
        if not self.spec.has(registry.VOCABULARY):
            return None, {"scripts": None, "unavailable": "the backend cannot list its vocabulary"}
        if self._vocab_scripts is None:
            from qvq_local.lang import VocabScripts

            t = time.perf_counter()
            self._vocab_scripts = VocabScripts(self.loaded.token_pieces())
            self.lang_index_s = time.perf_counter() - t
        mask = self._vocab_scripts.mask(lock.allowed)
        return mask, {"scripts": sorted(lock.allowed), "masked": mask.label, "masked_tokens": len(mask)}

    def _stream(self, images, question, options: AskSettings, lock) -> Iterator[Event]:
        from qvq_local.prompt import build_prompt
        from qvq_local.splitter import default_forced_text, default_markers, question_language

        t_start = time.perf_counter()
        tracker = _Tracker()
        session = None
        chains: list = []
        started: Started | None = None
        settings: dict[str, Any] = {}
        infos: list[ImageInfo] = []
        try:
            loaded = self.loaded
            family = _family_of(loaded)  # its image grid, system prompt and sampling are the defaults
            prepared = prepare_images(images, options.max_pixels, factor=family.image_factor)
            infos = [replace(p.info) for p in prepared]
            for info in infos:  # the backend's own count is the one that fills its context
                info.tokens = int(loaded.image_token_estimate(*info.size))
            default_system = family.system_prompt or None  # Qwen3-VL's templates have none
            system_text = default_system if options.system is None else (options.system or None)
            text = build_prompt(loaded.chat_template, question, len(prepared), system_text)

            image_tokens = sum(info.tokens for info in infos)
            text_tokens = _count_text_tokens(self.spec, loaded, text)
            if text_tokens is None:
                text_tokens = len(text.encode("utf-8"))  # an upper bound: a token is at least one byte
            n_ctx, thought_cap = size_context(
                self.context_length,
                text_tokens,
                image_tokens,
                think_budget=options.think_budget,
                answer_budget=options.answer_budget,
                max_pixels=options.max_pixels,
            )
            resolved = options.sampling.resolved(
                getattr(loaded, "generation_config", {}) or {}, family.sampling
            )
            # how thinking ends suits the model (its template) and the question (its language)
            forced_text = options.forced_text
            if forced_text is None:
                forced_text = default_forced_text(loaded.chat_template, question)
            markers = default_markers(loaded.chat_template)
            settings = {
                "think_budget": options.think_budget,
                "answer_budget": options.answer_budget,
                "max_thought_tokens": thought_cap,
                "max_pixels": options.max_pixels,
                "temperature": resolved.temperature,
                "top_p": resolved.top_p,
                "top_k": resolved.top_k,
                "repetition_penalty": resolved.repetition_penalty,
                "seed": resolved.seed,
                "n_ctx": n_ctx,
                "loop_detection": options.loop_detection,
                "system": system_text,
                "question_language": question_language(question),
            }
            thought_mask, lock_info = self.language_mask(lock)
            settings["lang_lock"] = {"mode": options.lang_lock, **lock_info}
            if options.samples > 1:
                from qvq_local.chains import chain_sampling

                sampling = chain_sampling(options.sampling, resolved)
                resolved = sampling.resolved(getattr(loaded, "generation_config", {}) or {}, family.sampling)
                settings.update({k: getattr(resolved, k) for k in ("temperature", "top_p", "top_k")})
                settings["samples"] = options.samples
                if not self.spec.has(registry.CHAINS):
                    from qvq_local.settings import API_LABELS

                    name = {**API_LABELS, **options.labels}["samples"]
                    forking = " or ".join(s.title for s in registry.with_capability(registry.CHAINS))
                    raise InputError(
                        f"{name} {options.samples} needs a backend that decodes chains in one batch"
                        f" ({forking or 'none is registered'}); the {self.backend} backend runs one chain"
                        " at a time"
                    )
                # the prompt's cells are shared; each chain gets the room one question would have
                prompt_cells = text_tokens + image_tokens
                session = loaded.new_session(
                    sampling,
                    n_ctx=prompt_cells + options.samples * (n_ctx - prompt_cells),
                    n_seq=options.samples,
                )
            else:
                session = loaded.new_session(options.sampling, n_ctx=n_ctx)
            t_prefill = time.perf_counter()
            chat = None
            if self.spec.has(registry.CHAT_MESSAGES):  # a server that applies its own template
                chat = ChatTurn(
                    question=question,
                    system=system_text,
                    think_budget=options.think_budget,
                    max_new_tokens=thought_cap
                    + FORCE_MARGIN
                    + (options.answer_budget or DEFAULT_ANSWER_BUDGET),
                )
            stats, cached = prefix_cache.prefill(
                session,
                Prompt(
                    text=text,
                    images=[p.image for p in prepared],
                    image_paths=[p.info.path for p in prepared],
                    chat=chat,
                ),
                self._prefix_key(text, prepared, options.max_pixels),
                self.prefix_cache,
                self.disk_cache,
                self.cache_notice,
            )
            settings["prefix_cache"] = cached.as_dict()
            if stats.image_tokens_per_image and len(stats.image_tokens_per_image) == len(infos):
                for info, tokens in zip(infos, stats.image_tokens_per_image):
                    info.tokens = int(tokens)
            started = Started(
                model=self.name,
                backend=self.backend,
                quantization=self.quantization,
                images=infos,
                prompt_tokens=stats.prompt_tokens,
                think_budget=options.think_budget,
                answer_budget=options.answer_budget,
                image_encode_s=stats.image_encode_s,
                prefill_s=stats.prefill_s,
            )
            tracker.see(started)
            yield started
            if options.samples > 1:
                chains = session.fork(options.samples)
            for event in self._reason(
                session,
                tracker,
                started,
                settings,
                t_prefill,
                options,
                forced_text,
                markers,
                thought_mask,
                chains,
            ):
                if isinstance(event, Finished) and cached.state is not None:
                    # the disk write waits for the answer, so it never delays the first token
                    # (in place: the Result holds this inner dict)
                    settings["prefix_cache"].update(prefix_cache.store(cached, self.disk_cache).as_dict())
                yield event
        except KeyboardInterrupt:
            # Ctrl-C outside the controller (image loading, prefill, or between events)
            if tracker.finished is None:
                tracker.finished = self._partial(tracker, started, infos, settings, t_start)
                yield Finished(tracker.finished)
            raise
        finally:
            for chain in chains:
                chain.close()
            if session is not None:
                session.close()

    def _prefix_key(self, text: str, prepared: list[PreparedImage], max_pixels: int | None) -> str | None:
        """The prefix cache key for this prompt, or None when nothing is to be cached or reused."""
        if self.prefix_cache is None and self.disk_cache is None:
            return None
        if not self.spec.has(registry.PREFIX_STATE):
            return None
        loaded = self.loaded
        prefix = prefix_cache.prefix_text(text, _family_of(loaded).image_block)
        if not prefix:
            return None
        identity = dict(loaded.prefix_identity())
        files = identity.pop("files", ())
        return prefix_cache.prefix_key(
            model=prefix_cache.model_identity(self.path, *files),
            backend=self.backend,
            prefix=prefix,
            template=loaded.chat_template,
            images=[p.image for p in prepared],
            max_pixels=max_pixels,
            # how the KV cache is computed (MLX: float32 on CPU, the model's dtype on a GPU; llama.cpp: GPU)
            extra=identity,
        )

    def _reason(
        self,
        session,
        tracker: _Tracker,
        started: Started,
        settings: dict,
        t_prefill: float,
        options: AskSettings,
        forced_text: str,
        markers: tuple[str, ...],
        thought_mask=None,
        chains: list | None = None,
    ) -> Iterator[Event]:
        """Run the controller and pass its events on.

        The controller answers Ctrl-C (raised inside it, or thrown into it) with one last
        ``Finished(stop_reason="interrupted")`` and does not re-raise; this layer forwards a Ctrl-C that
        lands at its own ``yield`` into the controller, passes that Finished on, then re-raises the
        interrupt so the caller stops (the CLI exits 130).
        """
        from qvq_local.loops import LoopSettings
        from qvq_local.reasoning import ReasoningConfig, run_reasoning

        # a remote server that applies the budget and the loop stop itself (``qvq serve``, QVQ-Max) gets
        # them in its request (the session reads them from the prompt); counting them here too would cut
        # the thought twice
        on_server = self.spec.has(registry.SERVER_BUDGET) and bool(self.loaded.budget_on_server)
        config = ReasoningConfig(
            think_budget=None if on_server else options.think_budget,
            answer_budget=options.answer_budget,
            max_tokens=options.max_tokens,
            loop=LoopSettings() if options.loop_detection and not on_server else None,
            forced_text=forced_text,
            answer_markers=markers,
        )
        timings = Timings(
            load_s=self.load_s,
            image_encode_s=started.image_encode_s,
            prefill_s=started.prefill_s,
            prefill_tok_s=started.prompt_tokens / started.prefill_s if started.prefill_s else 0.0,
        )
        base = {
            "model": self.name,
            "backend": self.backend,
            "quantization": self.quantization,
            "images": started.images,
            "settings": settings,
            "prompt_tokens": started.prompt_tokens,
            "timings": timings,
        }
        if chains:
            from qvq_local.chains import run_chains

            controller = run_chains(
                chains, config, result_base=base, started_at=t_prefill, thought_mask=thought_mask
            )
        else:
            controller = run_reasoning(
                session, config, result_base=base, started_at=t_prefill, thought_mask=thought_mask
            )
        throw = False
        while True:
            try:
                event = controller.throw(KeyboardInterrupt()) if throw else next(controller)
            except StopIteration:
                return
            throw = False
            if on_server and isinstance(event, Finished):  # the budget asked for, kept by the server
                event.result.settings.update(think_budget=options.think_budget, budget_kept_by="server")
            tracker.see(event)
            try:
                yield event
            except KeyboardInterrupt:
                if tracker.finished is not None:
                    raise
                throw = True
                continue
            if isinstance(event, Finished) and event.result.stop_reason == "interrupted":
                raise KeyboardInterrupt

    def _partial(self, tracker: _Tracker, started: Started | None, infos, settings, t_start) -> Result:
        """The Result of a question stopped by Ctrl-C: whatever was produced, stop reason "interrupted"."""
        from qvq_local.boxed import extract_boxed

        answer = "".join(tracker.answer)
        timings = Timings(load_s=self.load_s, total_s=time.perf_counter() - t_start)
        if started is not None:
            timings.image_encode_s, timings.prefill_s = started.image_encode_s, started.prefill_s
        return Result(
            thought="".join(tracker.thought),
            answer=answer,
            boxed=extract_boxed(answer),
            stop_reason="interrupted",
            thought_tokens=tracker.thought_tokens,
            answer_tokens=tracker.answer_tokens,
            prompt_tokens=started.prompt_tokens if started else 0,
            forced=list(tracker.forced),
            timings=timings,
            model=self.name,
            backend=self.backend,
            quantization=self.quantization,
            images=infos,
            settings=settings,
        )

    def ask(self, images: Any, question: str, **options: Any) -> Result:
        """Ask and wait: the same options as :meth:`stream`; returns the final :class:`Result`.

        On Ctrl-C the ``KeyboardInterrupt`` propagates with the partial result as its ``result`` attribute.
        """
        return drive(self.stream(images, question, **options))


def drive(
    events: Iterable[Event],
    *handlers: Callable[[Event], None],
    stop_requested: Callable[[], bool] | None = None,
) -> Result:
    """Pass every event to each handler and return the final Result.

    On Ctrl-C the partial ``Finished`` is still delivered to the handlers (even when the interrupt landed
    in a handler rather than in the generator), then the ``KeyboardInterrupt`` is re-raised with the
    partial result attached as ``result``.

    ``stop_requested`` is polled after each event; when it returns True the run is interrupted as if by
    Ctrl-C.  The CLI passes a flag its SIGINT handler sets, because a ``KeyboardInterrupt`` raised while a
    C library runs a Python callback (llama.cpp's log hook, for one) is swallowed by ctypes.
    """
    iterator = iter(events)
    result: Result | None = None

    def deliver(event: Event) -> None:
        nonlocal result
        if isinstance(event, Finished):
            result = event.result
        for handler in handlers:
            handler(event)

    try:
        for event in iterator:
            deliver(event)
            if stop_requested is not None and result is None and stop_requested():
                raise KeyboardInterrupt
    except KeyboardInterrupt as interrupt:
        if result is None or result.stop_reason != "interrupted":
            final = _finish_interrupted(iterator, result)
            if final is not None:
                try:
                    deliver(final)
                except KeyboardInterrupt:
                    pass
        interrupt.result = result  # type: ignore[attr-defined]
        raise
    if result is None:  # pragma: no cover - a stream always ends with Finished
        raise RuntimeError("the event stream ended without a Finished event")
    return result


def _finish_interrupted(iterator: Iterator[Event], result: Result | None) -> Finished | None:
    """Get the partial Finished out of a generator the interrupt did not reach (it landed in a handler)."""
    if result is not None:
        return None  # the question had finished; the interrupt came while drawing the end
    throw = getattr(iterator, "throw", None)
    if throw is None:
        return None
    try:
        event = throw(KeyboardInterrupt())
    except (KeyboardInterrupt, StopIteration):
        return None
    return event if isinstance(event, Finished) else None


def load(
    ref: str | Path | None = None,
    *,
    backend: str = "auto",
    max_pixels: int | None = None,
    download: bool = True,
    progress: bool = False,
    labels: Mapping[str, str] | None = None,
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
    spells each option in messages (the CLI passes its flags).

    The options are checked before anything is resolved or downloaded.  Raises ``ModelError`` (unknown or
    broken model, wrong format for the backend), ``BackendUnavailable`` (the backend's library is missing,
    naming the pip line) or ``InputError`` (a bad option, or one the backend does not take).
    """
    from qvq_local import config, hardware, hub
    from qvq_local.formats.manifest import normalize_quantization

    name = registry.canonical(backend)  # the one place the API maps what the caller typed to a name
    given = {k: v for k, v in options.items() if v is not None}
    labels = dict(labels or {})
    if name != registry.AUTO and registry.BACKENDS[name].has(registry.REMOTE):
        spec = registry.BACKENDS[name]
        checked = _options_of(spec, given, labels, config)
        t0 = time.perf_counter()
        remote = spec.open_model(str(ref) if ref is not None and str(ref).strip() else None, checked)
        return Model(
            remote,
            name=remote.name,
            spec=spec,
            quantization=remote.quantization,
            max_pixels=max_pixels,
            load_s=time.perf_counter() - t0,
        )
    # every backend that may run the model gets its options checked now, before a download
    candidates = (
        [registry.BACKENDS[name]]
        if name != registry.AUTO
        else [registry.BACKENDS[n] for n in registry.names()]
    )
    checked_for: dict[str, Any] = {}
    if name == registry.AUTO:
        for option in given:
            if not any(option in spec.options_type().names() for spec in candidates):
                owners = [s.name for s in registry.BACKENDS.values() if option in s.options_type().names()]
                whose = (
                    f"an option of the {' and '.join(owners)} backend" if owners else "no backend's option"
                )
                raise InputError(f"{labels.get(option, option)} is {whose}: name the backend to use it")
    for spec in candidates:
        taken = spec.options_type().names()
        own = {k: v for k, v in given.items() if k in taken} if name == registry.AUTO else given
        checked_for[spec.name] = _options_of(spec, own, labels, config)
    if ref is None or not str(ref).strip():
        ref = config.default_model()
        if ref is None:
            raise ModelError(NO_MODEL_HELP)
    resolved = hub.resolve(ref, download=download, progress=progress)
    chosen = hardware.choose_backend(name, {resolved.format}, model_path=resolved.path)
    spec = registry.BACKENDS[chosen]
    t0 = time.perf_counter()
    loaded = spec.open_model(resolved, checked_for[chosen])
    load_s = time.perf_counter() - t0
    quantization = normalize_quantization(getattr(loaded, "quantization", "") or resolved.quantization)
    return Model(
        loaded,
        name=resolved.name,
        spec=spec,
        quantization=quantization,
        path=resolved.path,
        max_pixels=max_pixels,
        load_s=load_s,
    )


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
    with load(model, backend=backend, max_pixels=options.pop("max_pixels", None)) as loaded:
        return loaded.ask(images, question, **options)


__all__ = [
    "Model",
    "PreparedImage",
    "SourceImage",
    "ask",
    "drive",
    "load",
    "prepare_images",
    "read_images",
]
