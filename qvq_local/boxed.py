"""The one ``\\boxed{...}`` parser: the result's boxed value and the renderer's highlighting both come from it.

QVQ ends an English answer with ``$$ \\boxed{-29} $$`` (display math), other replies use ``\\[ ... \\]``,
inline ``$...$``, ``\\dfrac{..}{..}`` and ``\\text{...}`` inside the box.  :func:`find_boxed` returns every
outermost complete box with both its position (for highlighting) and its value (for ``Result.boxed``),
so the two can never disagree.  Pure text, standard library only.

Rules:

* ``\\boxed`` followed by optional spaces, tabs or newlines and ``{`` opens a box (``\\boxed {5}`` counts;
  ``\\boxedx{1}`` does not).  Braces are balanced, nested ones included; ``\\{`` and ``\\}`` (any
  backslash-escaped character) are literal, so ``\\boxed{a\\}b}`` holds ``a\\}b``.
* A box whose closing brace never comes (an answer cut by a token limit) is skipped; a complete box
  inside it still counts.  A box inside another box is part of the outer one's value.
* The value is the content, stripped; when the whole content is one ``\\text{...}`` (or ``\\textbf``,
  ``\\mathrm``, ``\\mathbf``), the value is what that wraps: ``\\boxed{\\text{B}}`` gives ``B``.
* ``outer_start``/``outer_end`` widen the span over math delimiters that hold nothing but the box
  (``$$ .. $$``, ``$ .. $``, ``\\[ .. \\]``, ``\\( .. \\)``, whitespace allowed), so a renderer can
  replace the whole display formula.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_BOXED = "\\boxed"
_SPACE = " \t\r\n"
# (opener, closer), longest first so "$$" is not read as two "$"
_MATH = (("$$", "$$"), ("\\[", "\\]"), ("\\(", "\\)"), ("$", "$"))
_WRAPPER = re.compile(r"\\(?:text|textbf|mathrm|mathbf)\s*\{")
_DOLLARS = re.compile(r"(?<!\\)(\$\$|\$)")


@dataclass(frozen=True)
class Boxed:
    """One complete ``\\boxed{...}`` in a text."""

    start: int  # index of the backslash of \boxed
    end: int  # index after the closing brace
    content: str  # exactly what stands between the braces
    value: str  # the answer it holds (see the module docstring)
    outer_start: int  # start, widened over math delimiters around the box alone
    outer_end: int  # end, likewise


def _brace_matches(text: str) -> dict[int, int]:
    """Index of each ``{`` that is closed -> index of its ``}``; escaped braces are skipped.  One pass."""
    match: dict[int, int] = {}
    stack: list[int] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            stack.append(i)
        elif ch == "}" and stack:
            match[stack.pop()] = i
        i += 1
    return match


def _value(content: str) -> str:
    """The content stripped, and unwrapped when it is a single ``\\text{...}``-like group."""
    value = content.strip()
    m = _WRAPPER.match(value)
    if m and value.endswith("}"):
        inner_open = m.end() - 1
        if _brace_matches(value).get(inner_open) == len(value) - 1:
            return value[m.end() : -1].strip()
    return value


def _widen(text: str, start: int, end: int, floor: int) -> tuple[int, int]:
    """Widen ``[start, end)`` over a delimiter pair that encloses only it (and whitespace)."""
    left = start
    while left > floor and text[left - 1] in _SPACE:
        left -= 1
    right = end
    while right < len(text) and text[right] in _SPACE:
        right += 1
    for opener, closer in _MATH:
        at = left - len(opener)
        if at < floor or not text.startswith(opener, at) or not text.startswith(closer, right):
            continue
        if opener == "$" and ((left >= 2 and text[left - 2] == "$") or text.startswith("$$", right)):
            continue  # one "$" of a "$$" pair
        if opener.startswith("$") and not _opens(text, at, opener):
            continue  # that "$$" closes an earlier formula
        return at, right + len(closer)
    return start, end


def _opens(text: str, at: int, dollars: str) -> bool:
    """True when the ``$``/``$$`` at ``at`` opens a formula: an even number of the same kind precede it."""
    return sum(1 for m in _DOLLARS.finditer(text, 0, at) if m.group() == dollars) % 2 == 0


def find_boxed(text: str) -> list[Boxed]:
    """Every outermost complete ``\\boxed{...}`` in ``text``, in order (see the module docstring)."""
    if not isinstance(text, str) or _BOXED not in text:
        return []
    match = _brace_matches(text)
    found: list[Boxed] = []
    floor = 0  # nothing before the end of the previous box is looked at again
    pos = text.find(_BOXED)
    n = len(text)
    while pos >= 0:
        j = pos + len(_BOXED)
        close = None
        if j >= n or not text[j].isalpha():
            while j < n and text[j] in _SPACE:
                j += 1
            if j < n and text[j] == "{":
                close = match.get(j)
        if close is None:
            pos = text.find(_BOXED, pos + 1)
            continue
        content = text[j + 1 : close]
        outer = _widen(text, pos, close + 1, floor)
        found.append(Boxed(pos, close + 1, content, _value(content), *outer))
        floor = outer[1]
        pos = text.find(_BOXED, floor)
    return found


def extract_boxed(text: str) -> str | None:
    """The value of the last complete box in ``text`` (the one that closes last), or None."""
    boxes = find_boxed(text)
    return boxes[-1].value if boxes else None
