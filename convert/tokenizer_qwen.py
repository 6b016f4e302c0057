"""Qwen's real byte-level BPE tokenizer, built from the vocabulary file the ``dashscope`` package ships.

No hub is reachable, but ``dashscope`` (on PyPI; this project's ``dev`` extra) carries Qwen's vocabulary
as ``dashscope/resources/qwen.tiktoken``: 151,643 lines ``base64(bytes) rank``, the rank being the token
id and the merge priority at once.  That is the vocabulary of Qwen2 / Qwen2-VL / QVQ ("Hello" 9707,
" world" 1879, "system" 8948), with the special tokens starting at 151,643.  The file is read from the
installed package, never copied into this repository, and the runtime does not need it.

A Hugging Face ``tokenizer.json`` needs merges, which the tiktoken format leaves implicit.  They follow
from the ranks: each multi-byte token was made by exactly one merge, the one the BPE procedure itself
arrives at when it encodes the token's bytes with the lower-ranked tokens only (it ends with two parts,
and those are the merge).  That gives 151,387 merges (one per token of two or more bytes), the count of
Qwen2's published ``merges.txt``, in rank order.
"""

from __future__ import annotations

import base64
import functools
import importlib.util
from pathlib import Path

from qvq_local.errors import InputError
from qvq_local.families import DEFAULT_FAMILY
from qvq_local.formats.byte_level import to_byte_level

VOCAB_RESOURCE = ("resources", "qwen.tiktoken")
INSTALL_HINT = "pip install dashscope (it is in qvq-local's dev extra)"


def vocab_file() -> Path | None:
    """Path of ``qwen.tiktoken`` inside the installed ``dashscope`` package (None when not installed).

    ``find_spec`` locates the package without importing it (importing dashscope pulls in its HTTP stack).
    """
    try:
        spec = importlib.util.find_spec("dashscope")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        path = Path(root).joinpath(*VOCAB_RESOURCE)
        if path.is_file():
            return path
    return None


def available() -> bool:
    return vocab_file() is not None


def require_vocab_file() -> Path:
    path = vocab_file()
    if path is None:
        raise InputError(
            "the real Qwen tokenizer needs the dashscope package's qwen.tiktoken", hint=INSTALL_HINT
        )
    return path


def read_ranks(path: Path) -> dict[bytes, int]:
    """``qwen.tiktoken`` as {token bytes: rank}; a malformed line is a one-line InputError."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                b64, rank = line.split()
                ranks[base64.b64decode(b64, validate=True)] = int(rank)
            except ValueError:
                raise InputError(f"line {n} is not 'base64 rank'", path=path) from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise InputError("ranks are not the ids 0..n-1 without gaps", path=path)
    return ranks


def _merge_of(token: bytes, rank: int, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The pair the BPE procedure joins last when it encodes ``token`` using tokens ranked below it."""
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best_i, best_rank = -1, rank
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < best_rank:
                best_i, best_rank = i, r
        if best_i < 0:
            break
        parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    if len(parts) != 2:
        raise InputError(f"token {rank} cannot be built from lower-ranked tokens: not a BPE vocabulary")
    return parts[0], parts[1]


def vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level vocabulary {text: id} and the merges in rank order, recovered from the ranks."""
    vocab = {to_byte_level(tok): rank for tok, rank in ranks.items()}
    merges = []
    for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(tok) > 1:
            a, b = _merge_of(tok, rank, ranks)
            merges.append((to_byte_level(a), to_byte_level(b)))
    return vocab, merges


@functools.lru_cache(maxsize=1)
def load() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The real vocabulary and merges (read and recovered once per process; a few seconds)."""
    ranks = read_ranks(require_vocab_file())
    base = DEFAULT_FAMILY.base_vocab  # every Qwen family's: the specials start right after the vocabulary
    if len(ranks) != base:
        raise InputError(f"has {len(ranks)} tokens, Qwen's vocabulary has {base}", path=vocab_file())
    return vocab_and_merges(ranks)
