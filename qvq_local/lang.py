"""Language lock: keep QVQ's thought in the scripts of the question (policy; the backends only mask ids).

QVQ's published limitations include language mixing: Chinese words inside English reasoning and the
reverse.  While the model thinks, the lock removes from sampling every token that could write a letter
of a script the question does not use.  Precisely:

* **Scripts.**  Every character has one: ``han`` (CJK ideographs, radicals, bopomofo, CJK punctuation and
  symbols, fullwidth forms), ``kana`` (hiragana, katakana, halfwidth katakana), ``hangul``, for any
  other letter of the BMP the first word of its Unicode name (``latin``, ``greek``, ``cyrillic``,
  ``arabic`` ...), and ``historic`` for the remaining letters beyond it.
  Digits, punctuation, symbols, whitespace, emoji, mathematical alphanumerics and letterlike symbols
  have none and are never masked.
* **The question's scripts.**  The scripts of its letters; a Latin or Greek run shorter than three letters
  or all in capitals (``x``, ``AB``, triangle ``ABC``, option ``C``) is a symbol, not a use of the script.
* **Allowed while locked.**  The question's scripts plus ``latin`` and ``greek`` always: Chinese reasoning
  writes variables, LaTeX commands (``\\frac``), code and units in Latin letters and math in Greek ones,
  and a token such as ``frac`` is the same token in prose and after a backslash, so no token-level rule
  can ban English words without breaking LaTeX and code.  So an English question bans CJK (and every other
  script), a Chinese one bans kana, hangul, Cyrillic ... but not Latin.
* **Tokens.**  A token is masked when its bytes contain a character of a banned script, or end in an
  incomplete UTF-8 sequence that could complete to one (byte-level BPE can spell a character in pieces:
  masking the lead piece makes every spelling unreachable).
* **Modes.**  ``off``: never.  ``on``: lock to the question's scripts (a question with no words: Latin).
  ``auto`` (default): lock only when the question uses exactly one script.

The per-token script table is computed once per tokenizer (:class:`VocabScripts`, a second or two for
Qwen's 151,643 tokens); each lock's mask is a sorted id array computed once per script set.
"""

from __future__ import annotations

import bisect
import functools
import unicodedata
from dataclasses import dataclass

from qvq_local.backends.base import TokenMask
from qvq_local.errors import InputError

MODES = ("auto", "on", "off")
#: Scripts never masked: math, LaTeX, code and units are written in them whatever the language.
ALWAYS_ALLOWED = frozenset({"latin", "greek"})
#: A Latin/Greek run shorter than this (or all capitals) in the question is a symbol, not a word.
MIN_WORD_LETTERS = 3

# Code point ranges with a script of their own, sorted and disjoint (kana and hangul halfwidth forms
# sit inside the fullwidth block, which is split around them).
_RANGES: tuple[tuple[int, int, str], ...] = (
    (0x1100, 0x11FF, "hangul"),
    (0x2E80, 0x2FFF, "han"),
    (0x3000, 0x303F, "han"),
    (0x3040, 0x30FF, "kana"),
    (0x3100, 0x312F, "han"),
    (0x3130, 0x318F, "hangul"),
    (0x3190, 0x31EF, "han"),
    (0x31F0, 0x31FF, "kana"),
    (0x3200, 0x33FF, "han"),
    (0x3400, 0x4DBF, "han"),
    (0x4E00, 0x9FFF, "han"),
    (0xA960, 0xA97F, "hangul"),
    (0xAC00, 0xD7FF, "hangul"),
    (0xF900, 0xFAFF, "han"),
    (0xFE30, 0xFE4F, "han"),
    (0xFF00, 0xFF64, "han"),
    (0xFF65, 0xFF9F, "kana"),
    (0xFFA0, 0xFFDC, "hangul"),
    (0xFFDD, 0xFFEF, "han"),
    (0x1AFF0, 0x1B16F, "kana"),
    (0x20000, 0x3FFFF, "han"),
)
_STARTS = [lo for lo, _, _ in _RANGES]
# Letters that are notation, not a language: super/subscripts, letterlike symbols, number forms,
# mathematical alphanumerics; and modifier letters (category Lm).
_NOTATION = ((0x2070, 0x209F), (0x2100, 0x218F), (0x1D400, 0x1D7FF))
# Unicode name words that name a script other than themselves.
_NAME_SCRIPT = {"MICRO": "greek", "FEMININE": "latin", "MASCULINE": "latin"}
#: Every other letter beyond the BMP (historic scripts) gets this one label.
HISTORIC = "historic"


def _range_script(cp: int) -> str | None:
    i = bisect.bisect_right(_STARTS, cp) - 1
    if i >= 0 and cp <= _RANGES[i][1]:
        return _RANGES[i][2]
    return None


@functools.lru_cache(maxsize=65536)
def char_script(c: str) -> str | None:
    """The script of one character (see the module docstring), None for characters of no script."""
    cp = ord(c)
    if cp < 0x80:
        return "latin" if c.isalpha() else None
    script = _range_script(cp)
    if script is not None:
        return script
    if not c.isalpha() or unicodedata.category(c) == "Lm":
        return None
    for lo, hi in _NOTATION:
        if lo <= cp <= hi:
            return None
    if cp > 0xFFFF:
        return HISTORIC
    word = unicodedata.name(c, "").split(" ", 1)[0]
    return _NAME_SCRIPT.get(word, word.lower()) if word else None


def question_scripts(question: str) -> frozenset[str]:
    """The scripts the question's words are written in (short Latin/Greek runs are symbols)."""
    found: set[str] = set()
    run_script, run = None, ""

    def close_run() -> None:
        if run_script is None:
            return
        if run_script not in ALWAYS_ALLOWED or (len(run) >= MIN_WORD_LETTERS and not run.isupper()):
            found.add(run_script)

    for c in question:
        script = char_script(c)
        if script is not None and not c.isalpha():
            script = None  # CJK punctuation says nothing about the language of the words
        if script != run_script:
            close_run()
            run_script, run = script, ""
        run += c
    close_run()
    return frozenset(found)


@dataclass(frozen=True)
class Lock:
    """A decided lock: the scripts the thought may use (``allowed``), and why."""

    mode: str
    question_scripts: frozenset[str]
    allowed: frozenset[str]


def check_mode(mode: str | None, label: str | None = None) -> str:
    """``mode`` (auto|on|off, case and spaces ignored, None: auto) normalised; InputError otherwise.

    ``label`` names the option in the message (``--lang-lock``); without one the message names the lock."""
    word = mode.strip().lower() if isinstance(mode, str) else ("auto" if mode is None else mode)
    if word not in MODES:
        if label:
            raise InputError(f"{label} must be one of {', '.join(MODES)}, got {word!r}")
        raise InputError(f"unknown language lock {mode!r}; choose one of {', '.join(MODES)}")
    return word


def decide(question: str, mode: str = "auto") -> Lock | None:
    """The lock for ``question`` under ``mode`` (auto|on|off), None when the thought is not locked."""
    mode = check_mode(mode)
    if mode == "off":
        return None
    scripts = question_scripts(question)
    if mode == "auto" and len(scripts) != 1:
        return None
    return Lock(mode, scripts, (scripts or frozenset({"latin"})) | ALWAYS_ALLOWED)


# ------------------------------------------------------------------------------------------ tokens


def _fragment_range(frag: bytes) -> tuple[int, int] | None:
    """Code points an incomplete UTF-8 sequence (lead byte + some continuation bytes) can complete to."""
    lead = frag[0]
    if 0xC0 <= lead < 0xE0:
        n, value = 2, lead & 0x1F
    elif 0xE0 <= lead < 0xF0:
        n, value = 3, lead & 0x0F
    elif 0xF0 <= lead < 0xF8:
        n, value = 4, lead & 0x07
    else:
        return None
    for b in frag[1:]:
        value = (value << 6) | (b & 0x3F)
    left = 6 * (n - len(frag))
    return value << left, ((value + 1) << left) - 1


@functools.lru_cache(maxsize=1)
def _bmp_scripts() -> tuple:
    """The script of every BMP code point (surrogates: None), computed once."""
    return tuple(None if 0xD800 <= cp <= 0xDFFF else char_script(chr(cp)) for cp in range(0x10000))


@functools.lru_cache(maxsize=4096)
def _fragment_scripts(frag: bytes) -> frozenset[str]:
    """Every script a character that starts with ``frag`` can have."""
    rng = _fragment_range(frag)
    if rng is None:
        return frozenset()
    lo, hi = rng
    out = set(_bmp_scripts()[lo : min(hi, 0xFFFF) + 1]) if lo <= 0xFFFF else set()
    if hi > 0xFFFF:
        lo, hi = max(lo, 0x10000), min(hi, 0x10FFFF)
        if hi - lo < 4096:  # a lead byte and a continuation byte or more: exact
            out.update(char_script(chr(cp)) for cp in range(lo, hi + 1))
        else:  # a bare 4-byte lead: by range (a million code points would take seconds to name)
            out.update(script for a, b, script in _RANGES if a <= hi and lo <= b)
            if lo <= 0x1FFFF:
                out.add(HISTORIC)
    out.discard(None)
    return frozenset(out)


def _split_tail(piece: bytes) -> tuple[bytes, bytes]:
    """``(complete part, trailing incomplete UTF-8 sequence)`` of a token's bytes."""
    for back in range(1, min(4, len(piece)) + 1):
        b = piece[-back]
        if b < 0x80:
            break
        if b >= 0xC0:  # a lead byte: is its sequence cut off by the end of the token?
            need = 2 if b < 0xE0 else 3 if b < 0xF0 else 4
            if need > back:
                return piece[:-back], piece[-back:]
            break
    return piece, b""


def piece_scripts(piece: bytes) -> frozenset[str]:
    """Every script a token's bytes can write (complete characters and a cut-off last character)."""
    if piece.isascii():
        return frozenset({"latin"}) if any(65 <= b <= 90 or 97 <= b <= 122 for b in piece) else frozenset()
    body, tail = _split_tail(piece)
    out = {s for c in body.decode("utf-8", "replace") if (s := char_script(c)) is not None}
    if tail:
        out |= _fragment_scripts(tail)
    return frozenset(out)


class VocabScripts:
    """For one tokenizer: the token ids that can write each script (computed once, from the bytes)."""

    def __init__(self, pieces: list[bytes]):
        import numpy as np

        by_script: dict[str, list[int]] = {}
        for tid, piece in enumerate(pieces):
            if piece:
                for script in piece_scripts(piece):
                    by_script.setdefault(script, []).append(tid)
        self.n_tokens = len(pieces)
        self.ids = {s: np.asarray(v, dtype=np.int32) for s, v in by_script.items()}
        self._masks: dict[frozenset[str], TokenMask] = {}

    @property
    def scripts(self) -> frozenset[str]:
        return frozenset(self.ids)

    def mask(self, allowed: frozenset[str]) -> TokenMask:
        """The ids to ban so that only ``allowed`` scripts (and script-less characters) can be written."""
        import numpy as np

        allowed = frozenset(allowed)
        if allowed not in self._masks:
            banned = [v for s, v in self.ids.items() if s not in allowed]
            ids = np.unique(np.concatenate(banned)) if banned else np.zeros(0, dtype=np.int32)
            label = ",".join(sorted(s for s in self.ids if s not in allowed))
            self._masks[allowed] = TokenMask(ids=ids.astype(np.int32), label=label)
        return self._masks[allowed]
