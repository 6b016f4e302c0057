"""Thought and answer: the markers between them, the forced text that ends a thought, and the splitter.

The reasoning controller (:mod:`qvq_local.reasoning`) feeds this module the model's text and asks it what is
thought and what is answer; the rules are these:

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
  before it as thought (:func:`infer_answer`); a reply with no blank line is all answer (a plain,
  non-reasoning reply).
* **Forced text.**  When the controller cuts thinking it feeds :func:`default_forced_text`: a sentence the
  model can continue from, in the language of the question (:func:`question_language`), then QVQ's marker,
  or ``</think>`` for a model whose template opens ``<think>``.

:class:`ThoughtAnswerSplitter` splits a stream as it comes; :func:`split_text` splits a whole text at once
and is the reference the streaming splitter must agree with.  :func:`reply_answer` keeps the answer of an
earlier reply in a conversation.
"""

from __future__ import annotations

import re

from qvq_local.errors import InputError
from qvq_local.events import Phase
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

# CJK Unified Ideographs, extension A and the compatibility block
_CJK = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_LATIN_WORD = re.compile(r"(?<![\\A-Za-z])[A-Za-z]+")
# what may stand between an answer marker and the answer: whitespace and a colon ("**答案**：", "**Final Answer**:")
_ANSWER_LEAD = re.compile(r"^[\s:：]+")


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


#: The chat-template variable that switches thinking on and off (Qwen3's and Qwen3.5's templates: off, the
#: assistant turn opens an empty ``<think>\n\n</think>\n\n``).
THINKING_SWITCH = "enable_thinking"


def has_thinking_switch(chat_template: str | None) -> bool:
    """True when the model's chat template can be told to think or not (it reads ``enable_thinking``)."""
    return bool(chat_template) and THINKING_SWITCH in chat_template


def thought_is_open(prompt_text: str, chat_template: str | None) -> bool:
    """Whether the model thinks first after ``prompt_text`` (a rendered prompt): a think-tag model does
    unless the prompt closed its think block itself (thinking switched off); a model without think tags
    (QVQ) always does, in prose, up to its answer marker."""
    if not uses_think_tags(chat_template):
        return True
    return not prompt_text.rstrip().endswith(THINK_CLOSE)


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


def reply_answer(text: str, markers: tuple[str, ...] = DEFAULT_ANSWER_MARKERS) -> str:
    """The answer of an earlier reply, as the model is shown it again in a conversation: its reasoning
    dropped, as Qwen's templates drop it (everything up to QVQ's answer marker, or a ``<think>`` block),
    so it reads as ``Result.answer`` does.  A reply without a marker is taken whole (a client that sends
    back ``content`` sends the answer alone already)."""
    _, answer, marker = split_text(text, markers)
    return answer if marker is not None else text.strip()


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
