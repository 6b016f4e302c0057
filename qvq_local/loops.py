"""Loop detection: notices a stream that keeps saying the same thing, cheaply.

The reasoning controller (:mod:`qvq_local.reasoning`) feeds :class:`LoopDetector` the text as it comes; a
loop while thinking is treated like an exhausted budget (``Forced.reason == "loop"``), a loop inside the
answer stops generation (stop reason ``loop``).  :class:`LoopSettings` says what counts as one: a span
repeated back to back, or one sentence coming back again and again.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass

from qvq_local.errors import InputError

#: Characters that end a sentence (the loop detector's sentences; the controller's grace window waits
#: for one before it forces the answer).
SENTENCE_END = ".!?。！？"


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
            if ch in SENTENCE_END or ch == "\n":
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
