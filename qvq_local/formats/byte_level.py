"""GPT-2's byte-level token spelling: how byte-level BPE vocabularies (Qwen's among them) write bytes.

A byte-level BPE vocabulary (``tokenizer.json``'s ``model.vocab``, ``vocab.json``, a GGUF's
``tokenizer.ggml.tokens``) spells every byte as one printable character: the printable Latin-1 bytes as
themselves, the other 68 as the characters from U+0100 on, in byte order.  A token's text is therefore
not its bytes; these two functions convert between the spellings.  The runtime uses them to know the
bytes each token id writes (token masks), the synthesiser to write Qwen's real vocabulary.
"""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=1)
def _byte_chars() -> tuple[str, ...]:
    """GPT-2's byte -> printable character table that byte-level BPE vocabularies are written in."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table = {}
    extra = 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return tuple(table[b] for b in range(256))


@functools.lru_cache(maxsize=1)
def _byte_of_char() -> dict[str, int]:
    return {c: b for b, c in enumerate(_byte_chars())}


def to_byte_level(data: bytes) -> str:
    """The byte-level spelling of ``data`` (one character per byte)."""
    chars = _byte_chars()
    return "".join(chars[b] for b in data)


def byte_level_to_bytes(token: str) -> bytes:
    """The bytes a byte-level BPE token string stands for (characters outside the table: their UTF-8)."""
    table = _byte_of_char()
    out = bytearray()
    for c in token:
        b = table.get(c)
        if b is None:
            out += c.encode("utf-8")
        else:
            out.append(b)
    return bytes(out)


__all__ = ["byte_level_to_bytes", "to_byte_level"]
