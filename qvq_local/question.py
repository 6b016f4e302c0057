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
from dataclasses import asdict, replace
from typing import TYPE_CHECKING, Any

from qvq_local import prefix_cache
from qvq_local.backends import registry
from qvq_local.backends.base import SERVER_DEFAULT, ChatTurn, Prompt
from qvq_local.budgets import DEFAULT_ANSWER_BUDGET, FORCE_MARGIN, size_context
from qvq_local.conversation import ASSISTANT, Turn
from qvq_local.errors import InputError
from qvq_local.events import (
    Event,
    Finished,
    Forced,
    ImageInfo,
    Result,
    Speculating,
    Started,
    TextDelta,
    Timings,
)
from qvq_local.images import PreparedImage, prepare_images
from qvq_local.prompt import build_prompt
from qvq_local.splitter import (
    THINKING_SWITCH,
    default_forced_text,
    default_markers,
    has_thinking_switch,
    question_language,
    reply_answer,
    thought_is_open,
)
from qvq_local.video import video_token_default
from qvq_local.video_prompt import clip_prompt, prefix_key_part, split_media

#: Text tokens a native clip adds per frame where its family writes each temporal patch's time before it
#: (``<12.5 seconds>`` and the block's start and end): a generous bound for sizing the context.
CLIP_TIME_TOKENS = 8

if TYPE_CHECKING:  # pragma: no cover
    from qvq_local.detail import ImageBound
    from qvq_local.settings import AskSettings


def stream_question(
    model: Any,
    images: Any,
    question: str,
    options: AskSettings,
    lock: Any,
    bound: ImageBound,
    history: tuple[Turn, ...] = (),
) -> Iterator[Event]:
    """The events of one question on ``model`` (a :class:`qvq_local.model.Model`) about ``images``,
    with its settings built and checked, the language lock decided (``lock``: :func:`qvq_local.lang.decide`'s)
    and the images' bound resolved (``bound``: :meth:`qvq_local.model.Model.image_bound`'s, its detail level
    or pixel bound on the family's grid); the last event is always ``Finished``.

    ``history``: the turns before the question, checked (:func:`qvq_local.conversation.check_history`).
    Their images come first in the prompt (``images`` may then be empty); the model sees each earlier
    reply's answer alone (:func:`qvq_local.splitter.reply_answer`).  The budgets are the new turn's."""
    t_start = time.perf_counter()
    tracker = _Tracker()
    session = None
    chains: list = []
    started: Started | None = None
    settings: dict[str, Any] = {}
    infos: list[ImageInfo] = []
    clip = None  # a clip in the question (qvq_local.video_prompt.ClipPrompt)
    try:
        loaded = model.loaded
        family = model.family  # its image grid, system prompt and sampling are the defaults
        markers = default_markers(loaded.chat_template)
        default_system = family.system_prompt or None  # Qwen3-VL's templates have none
        system_text = default_system if options.system is None else (options.system or None)
        remote_template = model.spec.has(registry.CHAT_MESSAGES)  # a server applies its own template
        switch = None if remote_template else _thinking_switch(loaded.chat_template, options)
        source, images = split_media(images)
        earlier = [image for turn in history for image in turn.images]
        if source is not None:
            if history:
                raise InputError(
                    "a clip is asked about in a conversation's first turn only: ask about it without the"
                    " earlier turns"
                )
            clip = clip_prompt(
                source,
                question,
                family=family,
                model_name=model.name,
                backend_takes_video=model.spec.has(registry.VIDEO_INPUT),
                options=options.video,
                chat_template=loaded.chat_template,
                system=system_text,
                machine=model.machine_class,
                variables=switch,
            )
            prepared = [] if clip.native else clip_frames(clip, loaded)
            text = clip.text
        else:
            prepared = prepare_images(
                earlier + images, bound.max_pixels, factor=bound.factor, min_pixels=bound.min_pixels
            )
            history = _answers_only(_with_images(history, prepared), markers)
            own = len(prepared) - len(earlier)  # the question's own images, after the earlier turns'
            text = build_prompt(
                loaded.chat_template,
                question,
                own,
                system_text,
                family=family,
                history=history,
                variables=switch,
            )
        infos = [replace(p.info) for p in prepared]
        for info in infos:  # the backend's own count is the one that fills its context
            info.tokens = int(loaded.image_token_estimate(*info.size))
        if clip is not None and not clip.native:
            clip.info.tokens = sum(info.tokens for info in infos)
        thinking = (
            options.think is not False if remote_template else thought_is_open(text, loaded.chat_template)
        )

        image_tokens = sum(info.tokens for info in infos) + (clip.info.tokens if clip and clip.native else 0)
        text_tokens = _count_text_tokens(model, text)
        if text_tokens is None:
            text_tokens = len(text.encode("utf-8"))  # an upper bound: a token is at least one byte
        elif clip is not None and clip.native and family.video_time == "text":
            text_tokens += CLIP_TIME_TOKENS * len(clip.clip.frames)  # each patch's written time and block
        remote = model.spec.has(registry.REMOTE)
        n_ctx, thought_cap = size_context(
            None if remote and not model.context_length else model.context_length,
            text_tokens,
            image_tokens,
            think_budget=options.think_budget,
            answer_budget=options.answer_budget,
            max_pixels=bound.max_pixels,
            labels=_labels(options),
        )
        resolved = options.sampling.resolved(getattr(loaded, "generation_config", {}) or {}, family.sampling)
        # how thinking ends suits the model (its template) and the question (its language)
        forced_text = options.forced_text
        if forced_text is None:
            forced_text = default_forced_text(loaded.chat_template, question)
        settings = {
            "think_budget": options.think_budget,
            "answer_budget": options.answer_budget,
            "max_thought_tokens": thought_cap,
            "max_pixels": bound.max_pixels,
            "detail": bound.as_dict(),
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
        if history:
            settings["earlier_turns"] = len(history)
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
            _speculation(model, options, settings)  # one chain only: auto is off with a note
            session = loaded.new_session(
                sampling,
                n_ctx=prompt_cells + samples * (n_ctx - prompt_cells),
                n_seq=samples,
            )
        else:
            session = loaded.new_session(
                options.sampling, n_ctx=n_ctx, **_speculation(model, options, settings)
            )
        if remote:  # what was sent, not what the model might use: unsent values are the server's own
            settings.update(
                {k: SERVER_DEFAULT if v is None else v for k, v in asdict(session.sampling).items()}
            )
        t_prefill = time.perf_counter()
        chat = None
        if model.spec.has(registry.CHAT_MESSAGES):  # a server that applies its own template
            cap = thought_cap + FORCE_MARGIN + (options.answer_budget or DEFAULT_ANSWER_BUDGET)
            if options.max_tokens is not None:
                cap = min(cap, options.max_tokens)
            # a cap is sent only where something known bounds it: a budget or max_tokens the caller set,
            # or a context the server states (the thought cap was sized to it); never a guess
            stated = (
                options.think_budget is not None or options.max_tokens is not None or model.context_length
            )
            chat = ChatTurn(
                question=question,
                system=system_text,
                think_budget=options.think_budget,
                answer_budget=options.answer_budget,
                max_new_tokens=cap if stated else None,
                history=tuple(replace(t, images=tuple(p.image for p in t.images)) for t in history),
                think=options.think,
            )
        stats, cached = prefix_cache.prefill(
            session,
            Prompt(
                text=text,
                images=[p.image for p in prepared],
                image_paths=[p.info.path for p in prepared],
                chat=chat,
                clip=clip.clip if clip is not None and clip.native else None,
                image_labels=clip.labels if clip is not None and not clip.native else [],
            ),
            _prefix_key(model, text, prepared, bound.max_pixels, clip=clip),
            model.prefix_cache,
            model.disk_cache,
            model.cache_notice,
            earlier=_earlier_keys(model, text, prepared, bound.max_pixels, len(earlier)),
        )
        settings["prefix_cache"] = cached.as_dict()
        if stats.image_tokens_per_image and len(stats.image_tokens_per_image) == len(infos):
            for info, tokens in zip(infos, stats.image_tokens_per_image):
                info.tokens = int(tokens)
        if clip is not None:
            clip.info.tokens = int(stats.image_tokens) or clip.info.tokens
            settings["video"] = {
                "mode": clip.info.mode,
                "fps": options.video.fps or family.video_fps,
                "max_frames": options.video.max_frames or family.video_max_frames,
                "video_tokens": options.video.video_tokens or video_token_default(model.machine_class),
            }
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
            detail=bound.label() if clip is None else "",  # a clip's frames follow its video tokens
            clip=clip.info if clip is not None else None,
        )
        tracker.see(started)
        yield started
        if samples > 1:
            chains = session.fork(samples)
        speculating = _SpecFigures(session, options.speculate) if _asked(model, options) else None
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
            if isinstance(event, Finished) and remote:
                _server_counts(session, event.result)
            if speculating is not None:
                figures = speculating.see(event)
                if figures is not None:
                    yield figures
            if isinstance(event, Finished) and speculating is not None:
                report = session.speculation_report()
                if report is not None:
                    event.result.settings["speculation"] = report
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


def _speculation(model: Any, options: AskSettings, settings: dict) -> dict:
    """The session's ``speculation=`` keyword for ``options.speculate`` (the registry's ``speculation``
    capability), or none.  Where it cannot run (one chain only; a backend without the capability) an
    explicit mode is refused in one line and ``auto`` is off with a note in ``settings``."""
    mode = options.speculate
    if mode == "off":
        return {}
    from qvq_local.settings import API_LABELS

    name = {**API_LABELS, **options.labels}["speculate"]
    why = None
    if options.samples > 1:
        why = "speculation runs on one chain, not with several samples"
    elif not model.spec.has(registry.SPECULATION):
        able = " or ".join(s.title for s in registry.with_capability(registry.SPECULATION))
        why = f"the {model.backend} backend cannot check guessed tokens ({able or 'none is registered'} can)"
    if why is None:
        from qvq_local.speculate.config import SpecSettings

        return {"speculation": SpecSettings(mode=mode, draft=getattr(model, "draft", None))}
    if mode != "auto":
        raise InputError(f"{name} {mode}: {why}")
    settings["speculation"] = {"mode": "off", "asked": mode, "notes": [f"speculation is off: {why}"]}
    return {}


def _asked(model: Any, options: AskSettings) -> bool:
    """Whether this question's session was asked to speculate (it reports what it did, or why not)."""
    return options.speculate != "off" and options.samples == 1 and model.spec.has(registry.SPECULATION)


class _SpecFigures:
    """``Speculating`` events now and then while a speculating session decodes, and one before ``Finished``."""

    EVERY = 16  # generated pieces between two events

    def __init__(self, session: Any, mode: str):
        self.session, self.mode, self.seen = session, mode, 0

    def see(self, event: Event) -> Speculating | None:
        if isinstance(event, TextDelta):
            self.seen += 1
            if self.seen % self.EVERY:
                return None
        elif not isinstance(event, Finished):
            return None
        return self.figures()

    def figures(self) -> Speculating | None:
        report = self.session.speculation_report()
        if report is None:
            return None
        on = report.get("mode") != "off" and (report.get("plan") != "auto" or bool(report.get("k")))
        return Speculating(
            mode=self.mode,
            on=on,
            tokens=int(report.get("tokens", 0)),
            steps=int(report.get("steps", 0)),
            accepted=int(report.get("accepted", 0)),
            drafted=int(report.get("drafted", 0)),
        )


def _labels(options: AskSettings) -> dict:
    """How the caller spells each option in messages (the API's names, then the caller's own)."""
    from qvq_local.settings import API_LABELS

    return {**API_LABELS, **options.labels}


def _with_images(history: tuple[Turn, ...], prepared: list[PreparedImage]) -> tuple[Turn, ...]:
    """The earlier turns with their images prepared (``prepared`` lists the history's first, in order)."""
    turns, at = [], 0
    for turn in history:
        n = len(turn.images)
        turns.append(replace(turn, images=tuple(prepared[at : at + n])))
        at += n
    return tuple(turns)


def _answers_only(history: tuple[Turn, ...], markers: tuple[str, ...]) -> tuple[Turn, ...]:
    """Earlier replies as the model is shown them again: their answers, the reasoning dropped."""
    return tuple(
        replace(turn, text=reply_answer(turn.text, markers)) if turn.role == ASSISTANT else turn
        for turn in history
    )


def _server_counts(session: Any, result: Result) -> None:
    """A remote question's Result with the server's own token counts where it sent them (the registry's
    ``remote`` capability: ``token_counts``, ``request_report``), and how they were counted."""
    counts = session.token_counts(result.thought_tokens, result.answer_tokens)
    if counts.prompt_tokens is not None:
        result.prompt_tokens = counts.prompt_tokens
    result.thought_tokens, result.answer_tokens = counts.thought_tokens, counts.answer_tokens
    result.settings["token_count"] = counts.how
    result.settings["remote"] = session.request_report()


def _prefix_key(
    model: Any,
    text: str,
    prepared: list[PreparedImage],
    max_pixels: int | None,
    images: int | None = None,
    clip: Any = None,
) -> str | None:
    """The prefix cache key for this prompt, or None when nothing is to be cached or reused; ``images``:
    for its prefix up to that many images (an earlier turn's last image) rather than all.  A clip's part
    is its sampled frames' pixels and times and how it went in (:func:`video_prompt.prefix_key_part`)."""
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
    native = clip is not None and clip.native
    block = model.family.video_block if native else model.family.image_block
    prefix = prefix_cache.prefix_text(text, block, images)
    if not prefix:
        return None
    prepared = prepared[:images] if images is not None else prepared
    identity = dict(loaded.prefix_identity())
    files = identity.pop("files", ())
    if clip is not None:
        identity["clip"] = prefix_key_part(clip)
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


def _earlier_keys(
    model: Any, text: str, prepared: list[PreparedImage], max_pixels: int | None, earlier: int
) -> list[tuple[int, str]]:
    """``(images, key)`` of the prompt's prefixes that end at the earlier turns' images, nearest first:
    where a backend can restore such a state and encode only the later images (``partial_prefix``)."""
    if not model.spec.has(registry.PARTIAL_PREFIX) or model.family.recurrent_state:
        # a recurrent state restored at an earlier turn's image is not yet checked against a fresh prefill:
        # such a model reuses only a whole prompt's prefix
        return []
    keys = []
    for images in range(min(earlier, len(prepared) - 1), 0, -1):
        key = _prefix_key(model, text, prepared, max_pixels, images)
        if key is not None:
            keys.append((images, key))
    return keys


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
    answer_on_server = on_server and bool(model.loaded.answer_budget_on_server)
    # a server that keeps the answer budget counts its tokens; its stream's pieces are not tokens, so the
    # answer is not counted here again, but the room kept for it in the context is the same
    room = (
        {"answer_reserve": min(ReasoningConfig.answer_reserve, options.answer_budget)}
        if (answer_on_server and options.answer_budget is not None)
        else {}
    )
    config = ReasoningConfig(
        think_budget=None if on_server else options.think_budget,
        answer_budget=None if answer_on_server else options.answer_budget,
        **room,
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
        "clip": started.clip,
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
            if answer_on_server:
                event.result.settings["answer_budget"] = options.answer_budget
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
        clip=started.clip if started is not None else None,
    )


def clip_frames(clip: Any, loaded: Any) -> list[PreparedImage]:
    """A clip going in as frames: each frame an image (already sized by the sampler) named by its time."""
    return [
        PreparedImage(
            frame,
            ImageInfo(
                path=f"{clip.clip.path} @ {t:.2f}s",
                original_size=tuple(clip.clip.source_size),
                size=frame.size,
                tokens=int(loaded.image_token_estimate(*frame.size)),
            ),
        )
        for frame, t in zip(clip.clip.frames, clip.clip.timestamps)
    ]


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
