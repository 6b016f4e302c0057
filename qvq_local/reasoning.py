"""The reasoning controller: policy on top of a backend Session.

A backend only makes tokens.  This module alone decides what is thought and what is answer, when thinking
has gone on long enough, and when it has gone round in circles.  It is backend-independent and is tested
with a scripted fake session (``tests/fakes.py``).

Rules, in the order a user meets them:

* **Thought and answer.**  The stream is thought until the first *answer marker* completes, answer after
  it.  Default markers: QVQ's ``**Final Answer**`` (also ``**Final Answer:**`` and the lower-case
  ``answer`` variants), its Chinese ``**答案**`` and ``**最终答案**`` (each also with ``：`` or ``:``
  inside the bold), and ``</think>`` (Qwen3-VL-Thinking opens ``<think>`` in the prompt, so only the
  closing tag appears; an opening ``<think>`` at the very start of the output is dropped too).  For a
  model whose chat template opens ``<think>``, the API passes ``</think>`` alone (:func:`default_markers`).
  The marker is the boundary and belongs to neither side: ``Result.answer`` is just the answer, ready to
  print, however many paragraphs it has.  When several markers could match, the one that *ends* first in
  the text wins (the streaming order), the longer one on a tie.  Leading and trailing whitespace of each
  side is dropped, and so is a colon between the marker and the answer (``**答案**：B``).
* **No marker at all.**  When the model stops by itself (EOS) without ever writing a marker and nothing was
  forced, the last paragraph (the text after the last blank line) is taken as the answer and everything
  before it as thought; a reply with no blank line is all answer (a plain, non-reasoning reply).  The text
  deltas streamed during the run said "thought" for that text; ``Finished.result`` is authoritative.
* **Budget.**  With ``think_budget=N`` thinking runs to N tokens, then up to ``grace_tokens`` more until a
  sentence or line ends, then the controller feeds ``forced_text`` (:func:`default_forced_text`: QVQ's
  marker or ``</think>``, in the language of the question) into the session ONCE (the KV cache is
  kept, images are not touched) and lets the answer run to ``answer_budget`` tokens.  Thinking is also cut
  early, the same way, when the context or ``max_tokens`` would otherwise leave no room for an answer.
  If the model writes a marker itself first, nothing is forced.
* **Loops.**  :class:`LoopDetector` watches the text; a loop while thinking is treated like an exhausted
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

import re
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace

from qvq_local.boxed import extract_boxed
from qvq_local.errors import InputError
from qvq_local.events import Finished, Forced, Phase, Result, StopReason, TextDelta, Timings
from qvq_local.families import DEFAULT_FAMILY

#: The sentence the forced text starts with, by question language: one the model can continue from.
OUT_OF_TIME: dict[str, str] = {
    "en": "I have run out of time to think, so I will answer now.",
    "zh": "我的思考时间用完了，现在直接给出答案。",
}

#: The answer markers of the default model family (QVQ's "**Final Answer**" and Chinese "**答案**" forms,
#: declared by ``qvq_local.families``), by question language.
QVQ_MARKERS = DEFAULT_FAMILY.answer_markers["en"]
#: QVQ's answer markers for questions in Chinese (its published Chinese demo replies).
QVQ_ZH_MARKERS = DEFAULT_FAMILY.answer_markers["zh"]

DEFAULT_FORCED_TEXT = f"\n\n{OUT_OF_TIME['en']}\n\n{QVQ_MARKERS[0]}\n\n"
"""Fed into the session when thinking is cut: a sentence the model can continue from, then the marker."""

ZH_FORCED_TEXT = f"\n\n{OUT_OF_TIME['zh']}\n\n{QVQ_ZH_MARKERS[0]}\n\n"
"""The same for a question in Chinese: QVQ answers those under its Chinese marker ``**答案**``."""

THINK_TAG_FORCED_TEXT = f"\n\n{OUT_OF_TIME['en']}\n</think>\n\n"
"""The forced text for models that think inside ``<think>...</think>`` (Qwen3-VL-Thinking and the like)."""

ZH_THINK_TAG_FORCED_TEXT = f"\n\n{OUT_OF_TIME['zh']}\n</think>\n\n"
"""The think-tag forced text for a question in Chinese."""

THINK_CLOSE = "</think>"
THINK_OPEN = "<think>"
DEFAULT_ANSWER_MARKERS: tuple[str, ...] = QVQ_MARKERS + QVQ_ZH_MARKERS + (THINK_CLOSE,)
#: Markers for a model whose chat template opens ``<think>``: only the closing tag ends its thought
#: (a "**Final Answer**" heading inside the think block is still thought).
THINK_TAG_MARKERS: tuple[str, ...] = (THINK_CLOSE,)

_SENTENCE_END = ".!?。！？"
# CJK Unified Ideographs, extension A and the compatibility block
_CJK = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_LATIN_WORD = re.compile(r"(?<![\\A-Za-z])[A-Za-z]+")
# what may stand between an answer marker and the answer: whitespace and a colon ("**答案**：", "**Final Answer**:")
_ANSWER_LEAD = re.compile(r"^[\s:：]+")
_CLOSERS = "\"')]}*_$`”’»"


# --------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class LoopSettings:
    """How :class:`LoopDetector` decides that the model is going round in circles.

    A *periodic loop*: the end of the text is one span of ``min_span``..``max_span`` characters repeated
    back to back at least ``repeats`` times, covering at least ``min_chars`` characters (short spans must
    repeat more often: a 20-character span needs 10 copies at the default 200).  A *sentence loop*: one
    sentence of at least ``sentence_min_chars`` characters occurs ``sentence_repeats`` times among the
    last ``sentence_window`` sentences (catches A B A C A B ... cycles).
    """

    min_span: int = 20
    max_span: int = 400
    repeats: int = 3
    min_chars: int = 200
    check_every: int = 16
    sentence_min_chars: int = 50
    sentence_repeats: int = 4
    sentence_window: int = 64

    def __post_init__(self) -> None:
        for name in (
            "min_span",
            "max_span",
            "repeats",
            "min_chars",
            "check_every",
            "sentence_min_chars",
            "sentence_repeats",
            "sentence_window",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"loop setting {name} must be a positive integer, got {value!r}")
        if self.repeats < 2 or self.sentence_repeats < 2:
            raise InputError("loop settings repeats and sentence_repeats must be at least 2")
        if self.max_span < self.min_span:
            raise InputError(f"loop setting max_span ({self.max_span}) is below min_span ({self.min_span})")


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


def question_language(question: str) -> str:
    """``"zh"`` when the question is written in Chinese, else ``"en"``: a pure, cheap guess.

    Chinese when its CJK ideographs outnumber its Latin words (one ideograph carries about what one
    English word does), so a Chinese question that names "GDP" or a variable ``x`` is still Chinese and an
    English question that quotes a Chinese word is still English.  LaTeX commands (``\\frac``) are not
    words.  Japanese kana and Korean hangul are not counted as Chinese.
    """
    if not isinstance(question, str):
        return "en"
    from qvq_local.lang import question_scripts

    if question_scripts(question) & {"kana", "hangul"}:  # Japanese or Korean: kanji/hanja are not Chinese
        return "en"
    ideographs = len(_CJK.findall(question))
    words = len(_LATIN_WORD.findall(question))
    return "zh" if ideographs > words else "en"


def uses_think_tags(chat_template: str | None) -> bool:
    """True when the model's chat template opens ``<think>`` (its thought ends with ``</think>``)."""
    return bool(chat_template) and THINK_OPEN in chat_template


def default_forced_text(chat_template: str | None, question: str | None = None) -> str:
    """The forced transition that suits a model and a question.

    ``</think>`` when the model's chat template uses think tags (the model was trained to close them;
    QVQ's marker inside an open think block would be more thought), QVQ's marker otherwise; the sentence
    before it, and QVQ's marker, in the language of the question (:func:`question_language`).
    """
    chinese = question is not None and question_language(question) == "zh"
    if uses_think_tags(chat_template):
        return ZH_THINK_TAG_FORCED_TEXT if chinese else THINK_TAG_FORCED_TEXT
    return ZH_FORCED_TEXT if chinese else DEFAULT_FORCED_TEXT


def default_markers(chat_template: str | None) -> tuple[str, ...]:
    """The answer markers that suit a model: ``</think>`` alone for a think-tag model, else all defaults."""
    return THINK_TAG_MARKERS if uses_think_tags(chat_template) else DEFAULT_ANSWER_MARKERS


# ------------------------------------------------------------------------------------------ splitter


def find_marker(s: str, markers: tuple[str, ...]) -> tuple[int, int, str] | None:
    """The marker occurrence that ends first (the longer one on a tie): ``(start, end, marker)`` or None.

    The one rule both the whole-text split and the streaming splitter use to pick the boundary.
    """
    best: tuple[int, int, str] | None = None  # (end, -len, marker)
    for marker in markers:
        i = s.find(marker)
        if i >= 0:
            key = (i + len(marker), -len(marker), marker)
            if best is None or key < best:
                best = key
    if best is None:
        return None
    end, neg_len, marker = best
    return end + neg_len, end, marker


def split_text(text: str, markers: tuple[str, ...] = DEFAULT_ANSWER_MARKERS) -> tuple[str, str, str | None]:
    """Split a whole text at once: ``(thought, answer, marker or None)``.

    The reference the streaming splitter must agree with.  Without a marker, all text is thought (the
    no-marker rule of the controller is applied separately, by :func:`infer_answer`).
    """
    s = text
    if s.lstrip().startswith(THINK_OPEN):
        s = s.lstrip()[len(THINK_OPEN) :]
    found = find_marker(s, markers)
    if found is None:
        return s.strip(), "", None
    start, end, marker = found
    return s[:start].strip(), _ANSWER_LEAD.sub("", s[end:]).rstrip(), marker


def infer_answer(text: str) -> tuple[str, str]:
    """The no-marker rule: the last paragraph is the answer, the rest thought; one paragraph is all answer."""
    text = text.strip()
    head, sep, tail = text.rpartition("\n\n")
    if not sep:
        return "", text
    return head.strip(), tail.strip()


class ThoughtAnswerSplitter:
    """Splits a stream fed in arbitrary pieces into ``(phase, text)`` pieces, as early as it safely can.

    Guarantee: joining the thought pieces and the answer pieces of a whole run (including :meth:`finish`)
    gives exactly ``split_text(whole_text)``.  It holds back only what it must: the longest tail that could
    still become a marker, trailing whitespace (it may turn out to end a side), and, at the very start,
    text that could still become ``<think>``.  Each call costs O(piece + longest marker x markers).
    """

    def __init__(self, markers: tuple[str, ...] = DEFAULT_ANSWER_MARKERS):
        self.markers = tuple(dict.fromkeys(m for m in markers if m))
        if not self.markers:
            raise InputError("the splitter needs at least one non-empty answer marker")
        self._longest = max(len(m) for m in self.markers)
        self.phase: Phase = "thought"
        self.marker: str | None = None  # the marker that ended the thought (None when forced or none seen)
        self._pending = ""  # received, not yet emitted
        self._at_start = True  # still deciding whether the output opens with <think>
        self._emitted = {"thought": False, "answer": False}
        self._parts: dict[str, list[str]] = {"thought": [], "answer": []}

    # the text so far, per side
    @property
    def thought(self) -> str:
        return "".join(self._parts["thought"])

    @property
    def answer(self) -> str:
        return "".join(self._parts["answer"])

    def feed(self, text: str) -> list[tuple[Phase, str]]:
        """Add generated text; return the pieces that are now certain."""
        if not text:
            return []
        self._pending += text
        return self._process(final=False)

    def force_answer(self) -> list[tuple[Phase, str]]:
        """End the thought now (the controller forced an answer whose text had no marker)."""
        out: list[tuple[Phase, str]] = []
        if self.phase == "thought":
            self._at_start = False
            self._emit(out, "thought", self._pending, final=True)
            self._pending = ""
            self.phase = "answer"
        return out

    def finish(self) -> list[tuple[Phase, str]]:
        """The stream ended: release everything still held back."""
        return self._process(final=True)

    # ---------------------------------------------------------------------------------- internals
    def _process(self, *, final: bool) -> list[tuple[Phase, str]]:
        out: list[tuple[Phase, str]] = []
        if self._at_start:
            head = self._pending.lstrip()
            if not final and len(head) < len(THINK_OPEN) and THINK_OPEN.startswith(head):
                return out  # could still become "<think>"
            self._at_start = False
            if head.startswith(THINK_OPEN):
                self._pending = head[len(THINK_OPEN) :]
        if self.phase == "thought":
            found = find_marker(self._pending, self.markers)
            if found is None:
                keep = 0 if final else self._marker_prefix_len(self._pending)
                cut = len(self._pending) - keep
                held = self._pending[cut:]
                self._pending = self._emit(out, "thought", self._pending[:cut], final=final) + held
                return out
            start, end, marker = found
            self._emit(out, "thought", self._pending[:start], final=True)
            self._pending = self._pending[end:]
            self.phase = "answer"
            self.marker = marker
        self._pending = self._emit(out, "answer", self._pending, final=final)
        return out

    def _emit(self, out: list, phase: Phase, text: str, *, final: bool) -> str:
        """Emit ``text`` on ``phase``, less whitespace that may yet prove leading or trailing.

        Returns the trailing whitespace held back ("" when ``final``).
        """
        if not self._emitted[phase]:
            # a colon right after a marker is the marker's ("**答案**：B"); after forced text it is the model's
            text = _ANSWER_LEAD.sub("", text) if self.marker is not None else text.lstrip()
        body = text.rstrip()
        if body:
            self._emitted[phase] = True
            self._parts[phase].append(body)
            out.append((phase, body))
        return "" if final else text[len(body) :]

    def _marker_prefix_len(self, s: str) -> int:
        """Length of the longest tail of ``s`` that is a proper prefix of some marker."""
        for n in range(min(len(s), self._longest - 1), 0, -1):
            tail = s[-n:]
            if any(m.startswith(tail) for m in self.markers):
                return n
        return 0


# ------------------------------------------------------------------------------------- loop detector


@dataclass(frozen=True)
class LoopInfo:
    """What was found repeating."""

    kind: str  # "periodic" or "sentence"
    span: str  # the repeating text
    repeats: int  # how many times it occurred


class LoopDetector:
    """Notices a stream that keeps saying the same thing, cheaply.

    Only the last ``max_span * repeats`` characters (plus a little) are kept.  The periodic check runs once
    every ``check_every`` new characters and compares the tail with itself shifted by each span length
    (C-level string comparisons that fail at the first differing character), so the cost per character
    is small and does not grow with the length of the thought.  Sentence counting is incremental.
    """

    def __init__(self, settings: LoopSettings | None = None):
        self.s = settings or LoopSettings()
        self._window = max(self.s.max_span * self.s.repeats, self.s.min_chars + self.s.max_span)
        self._tail = ""
        self._since_check = 0
        self._sentence: list[str] = []
        self._sentence_len = 0
        self._recent: deque[str] = deque()
        self._counts: Counter[str] = Counter()
        self.detected: LoopInfo | None = None

    def reset(self) -> None:
        self.__init__(self.s)

    def feed(self, text: str) -> LoopInfo | None:
        """Add text; return a :class:`LoopInfo` the first time a loop is seen (and keep it in ``detected``)."""
        if self.detected is not None or not text:
            return None
        self._tail += text
        if len(self._tail) > self._window + 4 * self.s.check_every:
            self._tail = self._tail[-self._window :]
        self._since_check += len(text)
        found = self._feed_sentences(text)
        if found is None and self._since_check >= self.s.check_every:
            self._since_check = 0
            found = self._periodic()
        if found is not None:
            self.detected = found
        return found

    def _periodic(self) -> LoopInfo | None:
        tail = self._tail
        n = len(tail)
        s = self.s
        last = tail[-1:]
        for p in range(s.min_span, min(s.max_span, n // 2) + 1):
            if tail[n - 1 - p] != last or tail[n - p :] != tail[n - 2 * p : n - p]:
                continue
            copies = max(s.repeats, -(-s.min_chars // p))
            if copies * p > n:
                continue
            unit = tail[n - p :]
            if all(tail[n - (k + 1) * p : n - k * p] == unit for k in range(2, copies)):
                return LoopInfo("periodic", unit, copies)
        return None

    def _feed_sentences(self, text: str) -> LoopInfo | None:
        found = None
        start = 0
        for i, ch in enumerate(text):
            if ch in _SENTENCE_END or ch == "\n":
                self._sentence.append(text[start : i + 1])
                start = i + 1
                found = found or self._end_sentence()
        if start < len(text):
            piece = text[start:]
            self._sentence.append(piece)
            self._sentence_len += len(piece)
            if self._sentence_len > 4096:  # a run-on "sentence": forget it rather than grow
                self._sentence, self._sentence_len = [], 0
        return found

    def _end_sentence(self) -> LoopInfo | None:
        sentence = " ".join("".join(self._sentence).split())
        self._sentence, self._sentence_len = [], 0
        if len(sentence) < self.s.sentence_min_chars:
            return None
        self._recent.append(sentence)
        self._counts[sentence] += 1
        if len(self._recent) > self.s.sentence_window:
            old = self._recent.popleft()
            self._counts[old] -= 1
            if not self._counts[old]:
                del self._counts[old]
        if self._counts[sentence] >= self.s.sentence_repeats:
            return LoopInfo("sentence", sentence, self._counts[sentence])
        return None


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
    return bool(body) and body[-1] in _SENTENCE_END


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
        if self.stop == "answer" and self.splitter.marker is None and not self.forced:
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
        allowed = {"model", "backend", "quantization", "images"}
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
