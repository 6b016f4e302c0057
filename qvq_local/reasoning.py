"""The reasoning controller: policy on top of a backend Session.

A backend only makes tokens.  This module alone decides, with the splitter and the loop detector it
drives, what is thought and what is answer, when thinking has gone on long enough, and when it has gone
round in circles.  It is backend-independent and is tested
with a scripted fake session (``tests/fakes.py``).

Rules, in the order a user meets them (what is thought and what is answer, and the forced text that
ends a thought, are :mod:`qvq_local.splitter`'s; what counts as a loop is :mod:`qvq_local.loops`'):

* **Thought and answer.**  The stream is thought until the first answer marker completes, answer after it;
  when the model stops by itself without a marker and nothing was forced, the last paragraph is the
  answer.  The text deltas streamed during the run said "thought" for that text; ``Finished.result`` is
  authoritative.
* **Budget.**  With ``think_budget=N`` thinking runs to N tokens, then up to ``grace_tokens`` more until a
  sentence or line ends, then the controller feeds ``forced_text`` (:func:`~qvq_local.splitter.default_forced_text`: QVQ's
  marker or ``</think>``, in the language of the question) into the session ONCE (the KV cache is
  kept, images are not touched) and lets the answer run to ``answer_budget`` tokens.  Thinking is also cut
  early, the same way, when the context or ``max_tokens`` would otherwise leave no room for an answer.
  If the model writes a marker itself first, nothing is forced.
* **Loops.**  :class:`~qvq_local.loops.LoopDetector` watches the text; a loop while thinking is treated like an exhausted
  budget (``Forced.reason == "loop"``); a loop inside the answer stops generation (stop reason ``loop``).
* **Stop reasons.**  ``answer``: the model ended (EOS) on its own; ``budget``/``loop``: an answer was
  forced for that reason and the model then ended it; ``max_tokens``: the answer budget, ``max_tokens`` or
  the context ran out; ``interrupted``: KeyboardInterrupt (see :func:`run_reasoning`); ``cut``: thinking was
  cut but the (remote) session cannot continue the reply, so there is no answer (the ``openai`` backend
  against a server that cannot continue an assistant message).

Events: the forced text is announced by a :class:`~qvq_local.events.Forced` event and then streamed as
ordinary ``TextDelta`` pieces with ``tokens=0`` (its sentence lands at the end of the thought, its marker is
dropped), so joining the deltas of each phase reproduces ``Result.thought`` and ``Result.answer`` exactly,
except in the no-marker case above and after an interruption (the text the splitter still held back, at
most a few characters, is only in the Result).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace

from qvq_local.boxed import extract_boxed
from qvq_local.errors import InputError
from qvq_local.events import Finished, Forced, Phase, Result, StopReason, TextDelta, Timings
from qvq_local.loops import SENTENCE_END, LoopDetector, LoopSettings
from qvq_local.splitter import (
    DEFAULT_ANSWER_MARKERS,
    DEFAULT_FORCED_TEXT,
    ThoughtAnswerSplitter,
    infer_answer,
)

_CLOSERS = "\"')]}*_$`”’»"


def _check_count(name: str, value, *, allow_none: bool, allow_zero: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{name} must be a whole number of tokens, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        need = "zero or more" if allow_zero else "a positive number of"
        raise InputError(f"{name} must be {need} tokens, got {value}")


@dataclass(frozen=True)
class ReasoningConfig:
    """What the controller does with one question.  Invalid values raise InputError at construction.

    ``think_budget``: thought tokens before the answer is forced (None: no budget; thinking still stops
    early enough to leave the answer room in the context and under ``max_tokens``).
    ``answer_budget``: answer tokens (after the marker) before stopping with ``max_tokens`` (None: no limit).
    ``grace_tokens``: after the budget, how many more tokens may go by waiting for a sentence or line end.
    ``max_tokens``: a hard cap on all generated tokens (None: only the context limits it).
    ``answer_markers``: strings that end the thought (see the module docstring); ``extra_marker`` adds one
    of the user's own.  ``loop``: loop detection settings, None to switch it off.
    ``answer_reserve``: tokens kept free for the answer when thinking is cut by the context or
    ``max_tokens`` rather than by ``think_budget``.  ``ignore_eos``: keep generating past EOS (benchmarks).
    ``thinking``: the model thinks first (False: the prompt closed the thought, a template's thinking
    switched off; every token is answer and ``think_budget`` has nothing to cut).
    """

    think_budget: int | None = None
    answer_budget: int | None = 1024
    grace_tokens: int = 32
    max_tokens: int | None = None
    forced_text: str = DEFAULT_FORCED_TEXT
    answer_markers: tuple[str, ...] = DEFAULT_ANSWER_MARKERS
    extra_marker: str | None = None
    loop: LoopSettings | None = field(default_factory=LoopSettings)
    answer_reserve: int = 256
    ignore_eos: bool = False
    thinking: bool = True

    def __post_init__(self) -> None:
        _check_count("think budget", self.think_budget, allow_none=True)
        _check_count("answer budget", self.answer_budget, allow_none=True)
        _check_count("grace tokens", self.grace_tokens, allow_none=False, allow_zero=True)
        _check_count("max tokens", self.max_tokens, allow_none=True)
        _check_count("answer reserve", self.answer_reserve, allow_none=False, allow_zero=True)
        if not isinstance(self.forced_text, str) or not self.forced_text.strip():
            raise InputError("forced text must be a non-empty string")
        markers = tuple(self.answer_markers)
        if self.extra_marker is not None:
            markers = markers + (self.extra_marker,)
        for marker in markers:
            if not isinstance(marker, str) or not marker.strip():
                raise InputError(f"answer marker must be a non-empty string, got {marker!r}")
        object.__setattr__(self, "answer_markers", tuple(self.answer_markers))

    @property
    def markers(self) -> tuple[str, ...]:
        """All answer markers in effect, the user's extra one included, without duplicates."""
        out = list(self.answer_markers)
        if self.extra_marker is not None:
            out.append(self.extra_marker)
        return tuple(dict.fromkeys(out))

    def to_settings(self) -> dict:
        """The settings as plain data, for ``Result.settings`` and ``--json``."""
        data = asdict(self)
        data["answer_markers"] = list(self.markers)
        data.pop("extra_marker")
        return data


# ---------------------------------------------------------------------------------------- controller


def _at_boundary(text: str) -> bool:
    """True when ``text`` (the thought so far) ends a line or a sentence."""
    if not text:
        return True
    if text.endswith("\n"):
        return True
    body = text.rstrip(" \t")
    if body == text and body.endswith(".") and body[-2:-1].isdigit():
        return False  # "3." may go on as "3.14": wait for the space that ends the sentence
    body = body.rstrip(_CLOSERS)
    return bool(body) and body[-1] in SENTENCE_END


def _join_forced(previous: str, forced: str) -> str:
    """Drop leading newlines of ``forced`` that the model's own text already ended with."""
    lead = len(forced) - len(forced.lstrip("\n"))
    have = len(previous) - len(previous.rstrip("\n"))
    return forced[min(lead, have) :]


#: Yielded after every step by ``run_reasoning(..., stepped=True)``: lets a driver of several controllers
#: (:mod:`qvq_local.chains`) advance each by exactly one token.  Never reaches a renderer.
STEPPED = object()


class _Run:
    """One question's controller state; :func:`run_reasoning` drives it."""

    stepped = False  # yield STEPPED after each step

    def __init__(
        self,
        session,
        config: ReasoningConfig,
        result_base: dict | None,
        started_at: float | None,
        clock: Callable[[], float],
        thought_mask=None,
    ):
        self.session = session
        self.thought_mask = thought_mask if thought_mask is not None and len(thought_mask) else None
        self.cfg = config
        self.base = dict(result_base or {})
        self.clock = clock
        self.t_start = clock()
        self.t0 = started_at if started_at is not None else self.t_start
        self.splitter = ThoughtAnswerSplitter(config.markers)
        if not config.thinking:  # thinking switched off: the answer starts at the first token
            self.splitter.force_answer()
        self.loop = LoopDetector(config.loop) if config.loop is not None else None
        self.prompt_tokens = int(self.base.pop("prompt_tokens", session.n_past))
        self.thought_tokens = 0
        self.answer_tokens = 0
        self.generated = 0
        self.pending_tokens = {"thought": 0, "answer": 0}
        self.forced: list[Forced] = []
        self.forced_reason: str | None = None
        self.stop: StopReason | None = None
        self.decode_s = 0.0
        self.first_token_at: float | None = None
        self.raw_tail = ""  # last characters the model wrote (for sentence/line ends)
        self.think_limit, self.deadline = self._limits()

    def _limits(self) -> tuple[int | None, int | None]:
        """``(think_limit, deadline)`` in thought tokens (None: no limit).

        ``deadline``: the thought must be cut by then so that the forced text and an answer still fit under
        ``max_tokens`` and in the context: each hard limit minus ``answer_reserve`` answer tokens (capped by
        ``answer_budget``), the reserve shrinking to half the limit where the limit is tight.
        ``think_limit``: where the search for a sentence end begins: ``think_budget``, and at the latest
        ``grace_tokens`` (at most half the deadline) before the deadline.  With ``answer_reserve=0`` and
        ``grace_tokens=0``, ``max_tokens`` is a plain cap and nothing is forced by it (benchmarks).
        """
        cfg = self.cfg
        answer_room = cfg.answer_reserve
        if cfg.answer_budget is not None:
            answer_room = min(answer_room, cfg.answer_budget)
        hard = []
        if cfg.max_tokens is not None:
            hard.append(cfg.max_tokens)
        n_ctx = getattr(self.session, "n_ctx", None)
        if n_ctx:
            hard.append(n_ctx - self.session.n_past - self.session.count_tokens(cfg.forced_text))
        deadline = None
        if hard:
            deadline = max(0, min(h - min(answer_room, max(h, 0) // 2) for h in hard))
        limits = []
        if cfg.think_budget is not None:
            limits.append(cfg.think_budget)
        if deadline is not None:
            limits.append(deadline - min(cfg.grace_tokens, deadline // 2))
        return (min(limits) if limits else None), deadline

    # -- events
    def _deltas(self, pieces: list[tuple[Phase, str]], *, count: bool = True) -> Iterator[TextDelta]:
        for phase, text in pieces:
            n = 0
            if phase == "answer" and self.pending_tokens["thought"]:
                # thought tokens whose text was only whitespace or the marker: account for them first
                yield TextDelta("thought", "", self.pending_tokens["thought"])
                self.pending_tokens["thought"] = 0
            if count:
                n, self.pending_tokens[phase] = self.pending_tokens[phase], 0
            yield TextDelta(phase, text, n)

    def loop_events(self) -> Iterator:
        cfg, session = self.cfg, self.session
        pending_force: str | None = None  # why the thought will be cut, once it is decided
        grace_left = 0
        loop_seen = False
        while True:
            in_answer = self.splitter.phase == "answer"
            if cfg.max_tokens is not None and self.generated >= cfg.max_tokens:
                self.stop = "max_tokens"
                return
            if session.n_past >= session.n_ctx:
                self.stop = "max_tokens"
                return
            if in_answer and cfg.answer_budget is not None and self.answer_tokens >= cfg.answer_budget:
                self.stop = "max_tokens"
                return
            if not in_answer and pending_force is None:
                if loop_seen:
                    pending_force, grace_left = "loop", cfg.grace_tokens
                elif self.think_limit is not None and self.thought_tokens >= self.think_limit:
                    pending_force, grace_left = "budget", cfg.grace_tokens
            if not in_answer and pending_force is not None:
                past_deadline = self.deadline is not None and self.thought_tokens >= self.deadline
                if grace_left <= 0 or past_deadline or _at_boundary(self.raw_tail):
                    if not (yield from self._force(pending_force)):
                        return
                    pending_force = None
                    continue

            t = self.clock()
            if self.thought_mask is not None and not in_answer:
                token = session.step(banned=self.thought_mask)  # the language lock holds while thinking
            else:
                token = session.step()
            now = self.clock()
            self.decode_s += now - t
            self.generated += 1
            if self.first_token_at is None:
                self.first_token_at = now
            if token.is_eos and not cfg.ignore_eos:
                # a session may know better why it ended (a remote server that cut the reply, or cannot
                # continue one after the forced text: ``stop_reason`` "max_tokens" or "cut")
                self.stop = getattr(session, "stop_reason", None) or self.forced_reason or "answer"
                return
            text = "" if token.is_eos else token.text
            pieces = self.splitter.feed(text)
            phase = self.splitter.phase
            if phase == "thought":
                self.thought_tokens += 1
                if pending_force is not None:
                    grace_left -= 1
            else:
                self.answer_tokens += 1
                pending_force = None  # the model wrote a marker itself (perhaps during the grace window)
            self.pending_tokens[phase] += 1
            self.raw_tail = (self.raw_tail + text)[-64:]
            yield from self._deltas(pieces)

            if self.loop is not None and text and self.loop.feed(text) is not None:
                if phase == "answer":
                    self.stop = "loop"
                    return
                loop_seen = True
            if self.stepped:
                yield STEPPED

    def _force(self, reason: str) -> Iterator:
        """Feed the forced transition once; False when there is no room for it (stop instead)."""
        session = self.session
        text = _join_forced(self.raw_tail, self.cfg.forced_text)
        if session.n_past + session.count_tokens(text) >= session.n_ctx:
            self.stop = "max_tokens"
            return False
        t = self.clock()
        session.feed(text)
        seconds = self.clock() - t
        event = Forced(reason, text, at_token=self.thought_tokens, seconds=seconds)  # type: ignore[arg-type]
        self.forced.append(event)
        self.forced_reason = reason
        yield event
        pieces = self.splitter.feed(text) + self.splitter.force_answer()
        yield from self._deltas(pieces, count=False)
        self.raw_tail = ""
        if self.loop is not None:
            self.loop.reset()
        return True

    def final_pieces(self) -> list[tuple[Phase, str]]:
        return self.splitter.finish()

    def final_deltas(self, pieces: list[tuple[Phase, str]]) -> Iterator[TextDelta]:
        yield from self._deltas(pieces)
        for phase in ("thought", "answer"):
            if self.pending_tokens[phase]:  # tokens whose text was only whitespace or nothing
                yield TextDelta(phase, "", self.pending_tokens[phase])  # type: ignore[arg-type]
                self.pending_tokens[phase] = 0

    def result(self) -> Result:
        thought, answer = self.splitter.thought, self.splitter.answer
        thought_tokens, answer_tokens = self.thought_tokens, self.answer_tokens
        answer_source = "marker" if self.splitter.marker else ("forced" if self.forced else "none")
        if not self.cfg.thinking:
            answer_source = "no_thought"
        elif self.stop == "answer" and self.splitter.marker is None and not self.forced:
            thought, answer = infer_answer(thought)
            answer_source = "last_paragraph"
            if answer:
                answer_tokens = min(self.thought_tokens, self.session.count_tokens(answer))
                thought_tokens = self.thought_tokens - answer_tokens
        boxed = extract_boxed(answer)
        if boxed is None:
            boxed = extract_boxed(thought)
        end = self.clock()
        timings = replace(self.base.get("timings") or Timings())
        timings.decode_s = self.decode_s
        timings.decode_tok_s = self.generated / self.decode_s if self.decode_s > 0 else 0.0
        if self.first_token_at is not None:
            timings.first_token_s = self.first_token_at - self.t0
        timings.forced_step_s = sum(f.seconds for f in self.forced)
        timings.total_s = end - self.t0
        settings = dict(self.base.get("settings") or {})
        settings.update(self.cfg.to_settings())
        settings["answer_source"] = answer_source
        settings["think_limit"] = self.think_limit
        settings["think_deadline"] = self.deadline
        allowed = {"model", "backend", "quantization", "images", "clip"}
        extra = {k: v for k, v in self.base.items() if k in allowed}
        return Result(
            thought=thought,
            answer=answer,
            boxed=boxed,
            stop_reason=self.stop or "max_tokens",
            thought_tokens=thought_tokens,
            answer_tokens=answer_tokens,
            prompt_tokens=self.prompt_tokens,
            forced=list(self.forced),
            timings=timings,
            settings=settings,
            **extra,
        )


def run_reasoning(
    session,
    config: ReasoningConfig | None = None,
    *,
    result_base: dict | None = None,
    started_at: float | None = None,
    clock: Callable[[], float] = time.perf_counter,
    thought_mask=None,
    stepped: bool = False,
) -> Iterator[TextDelta | Forced | Finished]:
    """Generate from an already prefilled ``session`` and yield ``TextDelta``/``Forced`` events, then one
    ``Finished`` carrying the :class:`~qvq_local.events.Result`.

    ``result_base`` fills the Result fields the controller cannot know: ``model``, ``backend``,
    ``quantization``, ``images``, ``settings`` (merged with the config's), ``prompt_tokens`` (default:
    ``session.n_past`` at the start) and ``timings`` (a ``Timings`` with load/image/prefill figures; the
    controller fills first_token_s, decode_s, decode_tok_s, forced_step_s and total_s).  ``started_at``
    is the ``clock()`` value when prefill began, so first_token_s and total_s include prefill.
    ``thought_mask`` (a :class:`~qvq_local.backends.base.TokenMask`, e.g. the language lock of
    :mod:`qvq_local.lang`) is passed to every ``step()`` while the model thinks, never in the answer.

    Interruption: a KeyboardInterrupt raised inside ``session.step()``/``feed()`` (Ctrl-C while the
    generator runs), or thrown in with ``gen.throw(KeyboardInterrupt)`` by a caller that caught Ctrl-C
    while drawing an event, ends the run with exactly one more event, ``Finished`` with
    ``stop_reason="interrupted"`` and everything produced so far; the interrupt is not re-raised, so the
    caller decides (the CLI saves the partial result and exits 130)::

        gen = run_reasoning(session, cfg)
        try:
            for event in gen:
                draw(event)
        except KeyboardInterrupt:
            event = gen.throw(KeyboardInterrupt)   # -> Finished(stop_reason="interrupted")

    The session is neither prefilled nor closed here; that is the caller's job.  ``stepped=True`` also
    yields :data:`STEPPED` after each generated token (for :func:`qvq_local.chains.run_chains`).
    """
    run = _Run(session, config or ReasoningConfig(), result_base, started_at, clock, thought_mask)
    run.stepped = stepped
    try:
        yield from run.loop_events()
        pieces = run.final_pieces()
        deltas = list(run.final_deltas(pieces))
    except KeyboardInterrupt:
        run.stop = "interrupted"
        run.final_pieces()
        yield Finished(run.result())
        return
    try:
        yield from deltas
    except KeyboardInterrupt:
        run.stop = "interrupted"
    yield Finished(run.result())
