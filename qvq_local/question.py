"""One question on a loaded model, from its images to the final Result: the pipeline behind
:meth:`qvq_local.model.Model.stream`.

In order: the images are bounded on the grid of the model's family (:func:`qvq_local.images.prepare_images`),
the prompt is rendered from the model's own chat template with its family's control tokens checked
(:func:`qvq_local.prompt.build_prompt`), the context is sized for prompt + image tokens + both budgets
(:func:`qvq_local.budgets.size_context`: :class:`~qvq_local.errors.ContextOverflow` before any decoding when
they cannot fit), a session opens (forked into N chains with ``samples`` > 1), the prompt is prefilled
through the prefix cache, ``Started`` is emitted and then whatever the reasoning controller (or the chains'
vote) emits; the final ``Result`` gets what only this layer knows (model, backend, images, settings, load
and prefill timings).  What the loaded model can do beyond the Session protocol (count tokens, list its
vocabulary, fork chains, reuse a prefix, leave the budget to a server) is its backend's registry
capabilities: this module asks the registry, never the object.

Ctrl-C: wherever ``KeyboardInterrupt`` lands (inside the generator while it decodes, or in the caller's
loop body), the stream still ends with ``Finished(stop_reason="interrupted")`` holding the partial thought
and answer, and then the interrupt propagates (:func:`qvq_local.driver.drive` handles both places).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from qvq_local import prefix_cache
from qvq_local.backends import registry
from qvq_local.backends.base import ChatTurn, Prompt
from qvq_local.budgets import DEFAULT_ANSWER_BUDGET, FORCE_MARGIN, size_context
from qvq_local.errors import InputError
from qvq_local.events import Event, Finished, Forced, ImageInfo, Result, Started, TextDelta, Timings
from qvq_local.images import PreparedImage, prepare_images
from qvq_local.prompt import build_prompt
from qvq_local.splitter import (
    THINKING_SWITCH,
    default_forced_text,
    default_markers,
    has_thinking_switch,
    question_language,
    thought_is_open,
)

if TYPE_CHECKING:  # pragma: no cover
    from qvq_local.settings import AskSettings


def stream_question(
    model: Any, images: Any, question: str, options: AskSettings, lock: Any
) -> Iterator[Event]:
    """The events of one question on ``model`` (a :class:`qvq_local.model.Model`) about ``images``,
    with its settings built and checked, ``options.max_pixels`` filled and the language lock decided
    (``lock``: :func:`qvq_local.lang.decide`'s); the last event is always ``Finished``."""
    t_start = time.perf_counter()
    tracker = _Tracker()
    session = None
    chains: list = []
    started: Started | None = None
    settings: dict[str, Any] = {}
    infos: list[ImageInfo] = []
    try:
        loaded = model.loaded
        family = model.family  # its image grid, system prompt and sampling are the defaults
        prepared = prepare_images(images, options.max_pixels, factor=family.image_factor)
        infos = [replace(p.info) for p in prepared]
        for info in infos:  # the backend's own count is the one that fills its context
            info.tokens = int(loaded.image_token_estimate(*info.size))
        default_system = family.system_prompt or None  # Qwen3-VL's templates have none
        system_text = default_system if options.system is None else (options.system or None)
        remote_template = model.spec.has(registry.CHAT_MESSAGES)  # a server applies its own template
        text = build_prompt(
            loaded.chat_template,
            question,
            len(prepared),
            system_text,
            family=family,
            variables=None if remote_template else _thinking_switch(loaded.chat_template, options),
        )
        thinking = (
            options.think is not False if remote_template else thought_is_open(text, loaded.chat_template)
        )

        image_tokens = sum(info.tokens for info in infos)
        text_tokens = _count_text_tokens(model, text)
        if text_tokens is None:
            text_tokens = len(text.encode("utf-8"))  # an upper bound: a token is at least one byte
        n_ctx, thought_cap = size_context(
            model.context_length,
            text_tokens,
            image_tokens,
            think_budget=options.think_budget,
            answer_budget=options.answer_budget,
            max_pixels=options.max_pixels,
        )
        resolved = options.sampling.resolved(getattr(loaded, "generation_config", {}) or {}, family.sampling)
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
            "thinking": thinking,
        }
        thought_mask, lock_info = model.language_mask(lock)
        settings["lang_lock"] = {"mode": options.lang_lock, **lock_info}
        samples = options.samples
        if samples > 1 and not _holds_recurrent_state(model):
            model.cache_notice(
                f"{_label(options, 'samples')} {samples}: the {model.backend} backend cannot copy"
                f" {family.name}'s recurrent state per chain; running one chain"
            )
            samples = 1
        if samples > 1:
            from qvq_local.chains import chain_sampling

            sampling = chain_sampling(options.sampling, resolved)
            resolved = sampling.resolved(getattr(loaded, "generation_config", {}) or {}, family.sampling)
            settings.update({k: getattr(resolved, k) for k in ("temperature", "top_p", "top_k")})
            settings["samples"] = samples
            if not model.spec.has(registry.CHAINS):
                forking = " or ".join(s.title for s in registry.with_capability(registry.CHAINS))
                raise InputError(
                    f"{_label(options, 'samples')} {samples} needs a backend that decodes chains in one batch"
                    f" ({forking or 'none is registered'}); the {model.backend} backend runs one chain"
                    " at a time"
                )
            # the prompt's cells are shared; each chain gets the room one question would have
            prompt_cells = text_tokens + image_tokens
            session = loaded.new_session(
                sampling,
                n_ctx=prompt_cells + samples * (n_ctx - prompt_cells),
                n_seq=samples,
            )
        else:
            session = loaded.new_session(options.sampling, n_ctx=n_ctx)
        t_prefill = time.perf_counter()
        chat = None
        if model.spec.has(registry.CHAT_MESSAGES):  # a server that applies its own template
            chat = ChatTurn(
                question=question,
                system=system_text,
                think_budget=options.think_budget,
                max_new_tokens=thought_cap + FORCE_MARGIN + (options.answer_budget or DEFAULT_ANSWER_BUDGET),
                think=options.think,
            )
        stats, cached = prefix_cache.prefill(
            session,
            Prompt(
                text=text,
                images=[p.image for p in prepared],
                image_paths=[p.info.path for p in prepared],
                chat=chat,
            ),
            _prefix_key(model, text, prepared, options.max_pixels),
            model.prefix_cache,
            model.disk_cache,
            model.cache_notice,
        )
        settings["prefix_cache"] = cached.as_dict()
        if stats.image_tokens_per_image and len(stats.image_tokens_per_image) == len(infos):
            for info, tokens in zip(infos, stats.image_tokens_per_image):
                info.tokens = int(tokens)
        started = Started(
            model=model.name,
            backend=model.backend,
            quantization=model.quantization,
            images=infos,
            prompt_tokens=stats.prompt_tokens,
            think_budget=options.think_budget,
            answer_budget=options.answer_budget,
            image_encode_s=stats.image_encode_s,
            prefill_s=stats.prefill_s,
        )
        tracker.see(started)
        yield started
        if samples > 1:
            chains = session.fork(samples)
        for event in _reason(
            model,
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
            thinking,
        ):
            if isinstance(event, Finished) and cached.state is not None:
                # the disk write waits for the answer, so it never delays the first token
                # (in place: the Result holds this inner dict)
                settings["prefix_cache"].update(prefix_cache.store(cached, model.disk_cache).as_dict())
            yield event
    except KeyboardInterrupt:
        # Ctrl-C outside the controller (image loading, prefill, or between events)
        if tracker.finished is None:
            tracker.finished = _partial(model, tracker, started, infos, settings, t_start)
            yield Finished(tracker.finished)
        raise
    finally:
        for chain in chains:
            chain.close()
        if session is not None:
            session.close()


def _label(options: AskSettings, name: str) -> str:
    """How the caller spells option ``name`` (``--samples`` on the command line, ``samples`` in Python)."""
    from qvq_local.settings import API_LABELS

    return str({**API_LABELS, **options.labels}[name])


def _holds_recurrent_state(model: Any) -> bool:
    """False for a model with a recurrent state (``Family.recurrent_state``) on a backend that cannot
    snapshot or copy it (the registry's ``recurrent_state`` capability): no prefix reuse, one chain."""
    return not model.family.recurrent_state or model.spec.has(registry.RECURRENT_STATE)


def _thinking_switch(chat_template: str | None, options: AskSettings) -> dict[str, bool] | None:
    """The template variable that switches thinking as ``options.think`` asks (None: the template's
    default).  Asking a template without the switch not to think is refused in one line; asking it to
    think changes nothing (such models think, or do not, as they were made)."""
    if options.think is None:
        return None
    if not has_thinking_switch(chat_template):
        if options.think:
            return None
        name = _label(options, "think").split("/")[-1]
        raise InputError(
            f"{name}: this model's chat template has no thinking switch ({THINKING_SWITCH}); it thinks as it"
            " was made to (a think budget still cuts the thought short)"
        )
    return {THINKING_SWITCH: options.think}


def _prefix_key(model: Any, text: str, prepared: list[PreparedImage], max_pixels: int | None) -> str | None:
    """The prefix cache key for this prompt, or None when nothing is to be cached or reused."""
    if model.prefix_cache is None and model.disk_cache is None:
        return None
    if not model.spec.has(registry.PREFIX_STATE):
        return None
    if not _holds_recurrent_state(model):
        model.cache_notice(
            f"prefix cache: the {model.backend} backend cannot snapshot {model.family.name}'s recurrent"
            " state; running without it"
        )
        return None
    loaded = model.loaded
    prefix = prefix_cache.prefix_text(text, model.family.image_block)
    if not prefix:
        return None
    identity = dict(loaded.prefix_identity())
    files = identity.pop("files", ())
    return prefix_cache.prefix_key(
        model=prefix_cache.model_identity(model.path, *files),
        backend=model.backend,
        prefix=prefix,
        template=loaded.chat_template,
        images=[p.image for p in prepared],
        max_pixels=max_pixels,
        # how the KV cache is computed (MLX: float32 on CPU, the model's dtype on a GPU; llama.cpp: GPU)
        extra=identity,
    )


def _reason(
    model: Any,
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
    thinking: bool = True,
) -> Iterator[Event]:
    """Run the controller and pass its events on (``thinking``: the prompt leaves the thought open).

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
    on_server = model.spec.has(registry.SERVER_BUDGET) and bool(model.loaded.budget_on_server)
    config = ReasoningConfig(
        think_budget=None if on_server else options.think_budget,
        answer_budget=options.answer_budget,
        max_tokens=options.max_tokens,
        loop=LoopSettings() if options.loop_detection and not on_server else None,
        forced_text=forced_text,
        answer_markers=markers,
        thinking=thinking,
    )
    timings = Timings(
        load_s=model.load_s,
        image_encode_s=started.image_encode_s,
        prefill_s=started.prefill_s,
        prefill_tok_s=started.prompt_tokens / started.prefill_s if started.prefill_s else 0.0,
    )
    base = {
        "model": model.name,
        "backend": model.backend,
        "quantization": model.quantization,
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


def _partial(model: Any, tracker: _Tracker, started: Started | None, infos, settings, t_start) -> Result:
    """The Result of a question stopped by Ctrl-C: whatever was produced, stop reason "interrupted"."""
    from qvq_local.boxed import extract_boxed

    answer = "".join(tracker.answer)
    timings = Timings(load_s=model.load_s, total_s=time.perf_counter() - t_start)
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
        model=model.name,
        backend=model.backend,
        quantization=model.quantization,
        images=infos,
        settings=settings,
    )


def _count_text_tokens(model: Any, text: str) -> int | None:
    """Tokens of the prompt's text (image pads left out) without opening a session; None when the backend
    cannot count them (no ``tokenizer`` capability)."""
    if not model.spec.has(registry.TOKENIZER):
        return None
    return len(model.loaded.tokenize(text.replace(model.family.image_pad, ""), special=True))


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
