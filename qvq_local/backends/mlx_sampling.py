"""What an MLX session and the chains forked from it share: the sampler and the detokenizer.

* :class:`Sampler` draws the next token from a logits vector in transformers' order of processors (token
  mask, repetition penalty over the tokens seen, temperature, top-k, top-p, a seeded draw), keeping its
  own history and random key; a session and each of its chains own one;
* :class:`Detokenizer` turns ids into text pieces that never split a UTF-8 character.

``qvq_local.backends.mlx_session`` (one question) and ``mlx_chains`` (the chains forked from it) both
build on this module; neither reaches into the other's private parts.
"""

from __future__ import annotations

from typing import Any

from qvq_local.backends.base import SamplingParams, TokenMask

#: A token whose bytes never complete a character is flushed after this many held tokens (U+FFFD).
MAX_HELD_TOKENS = 8


class Sampler:
    """One sequence's sampling state: settings, the ids its repetition penalty sees, its random key.

    ``window``: the penalty looks at the last ``window`` ids only (None: the whole context).
    """

    def __init__(
        self, mx: Any, sampling: SamplingParams, window: int | None = None, history: list[int] | None = None
    ):
        self.mx = mx
        self.sampling = sampling
        self.window = window
        self.history: list[int] = list(history or [])  # every token in the context (prompt, generated, fed)
        self._seen: set[int] = set()  # distinct ids of history[:_seen_count]
        self._seen_count = 0
        self._seen_ids = None
        self._mask: TokenMask | None = None
        self._mask_add = None  # mx.array [vocab]: 0, or -inf on the ids of self._mask
        self._key = mx.random.key(int(sampling.seed or 0))

    def fork(self, seed: int) -> Sampler:
        """A sampler for a chain: the same settings, window and history so far, its own seed."""
        from dataclasses import replace

        return Sampler(self.mx, replace(self.sampling, seed=seed), self.window, self.history)

    def accept(self, ids: list[int]) -> None:
        """Ids that entered the context (prompt, sampled, fed): the repetition penalty sees them."""
        self.history.extend(ids)

    def _penalised_ids(self):
        """Distinct ids the repetition penalty applies to (whole context unless a window was set)."""
        mx = self.mx
        if self.window is not None:
            return mx.array(sorted(set(self.history[-self.window :])), dtype=mx.int32)
        if self._seen_count != len(self.history):  # cheap incremental update of the distinct set
            fresh = set(self.history[self._seen_count :]) - self._seen
            self._seen_count = len(self.history)
            if fresh or self._seen_ids is None:
                self._seen.update(fresh)
                self._seen_ids = mx.array(sorted(self._seen), dtype=mx.int32)
        return self._seen_ids

    def _mask_vector(self, mask: TokenMask, vocab: int):
        """-inf on the masked ids, 0 elsewhere, ``vocab`` long (built once per mask object)."""
        if mask is not self._mask:
            import numpy as np

            add = np.zeros(vocab, dtype=np.float32)
            add[np.asarray(mask.ids, dtype=np.int64)] = -np.inf
            self._mask, self._mask_add = mask, self.mx.array(add)
        return self._mask_add

    def sample(self, logits: Any, banned: TokenMask | None = None):
        """The next token id (mx scalar) from ``logits`` (left untouched), HF order of processors.

        ``banned`` ids get -inf before any processor, so no setting can pick them.
        """
        mx = self.mx
        s = self.sampling
        logits = logits * 1.0  # a copy: the processors below must not touch the caller's logits
        if banned is not None and len(banned):
            logits = logits + self._mask_vector(banned, logits.shape[-1])
        penalty = float(s.repetition_penalty or 1.0)
        if penalty != 1.0 and self.history:
            seen = self._penalised_ids()
            picked = logits[seen]
            logits[seen] = mx.where(picked < 0, picked * penalty, picked / penalty)
        temperature = float(s.temperature or 0.0)
        top_k = int(s.top_k or 0)
        if temperature <= 0.0 or top_k == 1:
            return mx.argmax(logits)
        logits = logits / temperature
        vocab = logits.shape[-1]
        if 0 < top_k < vocab:
            kth = mx.sort(logits)[vocab - top_k]
            logits = mx.where(logits < kth, -mx.inf, logits)
        top_p = float(s.top_p if s.top_p is not None else 1.0)
        if 0.0 < top_p < 1.0:
            order = mx.argsort(-logits)
            sorted_logits = logits[order]
            probs = mx.softmax(sorted_logits)
            before = mx.cumsum(probs) - probs  # mass strictly above each token
            keep_sorted = before < top_p  # the first token is always kept
            keep = mx.zeros_like(keep_sorted)
            keep[order] = keep_sorted
            logits = mx.where(keep, logits, -mx.inf)
        self._key, sub = mx.random.split(self._key)
        return mx.random.categorical(logits, key=sub)


class Detokenizer:
    """Turns ids into text pieces that never split a UTF-8 character.

    Byte-level BPE tokens can end in the middle of a multi-byte character; decoding such a tail yields
    U+FFFD.  Ids are held until their decoded text no longer ends in U+FFFD, then emitted together.
    """

    def __init__(self, tokenizer: Any):
        self._tokenizer = tokenizer
        self._held: list[int] = []

    def push(self, token_id: int) -> str:
        self._held.append(token_id)
        text = self._tokenizer.decode(self._held, skip_special_tokens=False)
        if text.endswith("\ufffd") and len(self._held) < MAX_HELD_TOKENS:
            return ""
        self._held = []
        return text

    def flush(self) -> str:
        if not self._held:
            return ""
        text = self._tokenizer.decode(self._held, skip_special_tokens=False)
        self._held = []
        return text

    def drop(self) -> None:
        self._held = []


__all__ = ["MAX_HELD_TOKENS", "Detokenizer", "Sampler"]
