"""N reasoning chains from one llama.cpp prefill, decoded together in one batch (mechanism only).

:meth:`LlamaSession.fork` turns a prefilled session into ``n`` :class:`LlamaChain` objects, each a full
``Session`` (``step``/``feed``/``count_tokens``) for the reasoning controller.  How it works:

* the prompt's KV cells (system prompt, image, question) are filled once, for sequence 0, and shared with
  sequences 1..n-1 by ``llama_memory_seq_cp`` (the cache is opened with ``kv_unified`` so a copy adds a
  sequence id to the same cells rather than copying them);
* a chain's ``step()`` samples from its own logits and *queues* the token; the queue of every chain is
  decoded in one ``llama_decode`` batch (one token per sequence, each at its own position) the next time
  any chain needs logits it does not have yet.  Driven in lockstep (one step per chain per round, as
  :mod:`qvq_local.chains` does), every decode carries one token of every running chain;
* each decode's logits are copied out per chain, so a chain can sample later even after a decode that did
  not include it;  sampling runs the chain's own llama.cpp sampler chain (repetition penalty history, seed
  ``seed + i``, language mask) over that copy, exactly as ``llama_sampler_sample`` does over the context;
* each chain has its own share of the context: ``n_ctx`` of a chain = prompt cells + (free cells // n),
  so a chain behaves as a separate session of that size would.

Nothing here decides anything: budgets, loop stops and forced answers are the controller's, per chain.
"""

from __future__ import annotations

import codecs
import ctypes
import weakref
from typing import Any

from qvq_local.backends.base import SamplingParams, Token, TokenMask
from qvq_local.backends.llamacpp import _LOG, PENALTY_LAST_N, LlamaSession, _libs
from qvq_local.errors import InputError


def fork_chains(session: LlamaSession, n: int) -> list[LlamaChain]:
    """``n`` chains continuing ``session`` (prefilled, opened with ``n_seq >= n``); see the module docstring."""
    llama_cpp, _ = _libs()
    session._check_open()
    if not session.prefilled:
        raise RuntimeError("call prefill() before fork()")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InputError(f"the number of chains must be a positive whole number, got {n!r}")
    if n > session.n_seq:
        raise InputError(f"this session was opened for {session.n_seq} chain(s), not {n}")
    if getattr(session, "_forked", False):
        raise RuntimeError("fork() was already called on this session")
    session._forked = True
    mem = llama_cpp.llama_get_memory(session._ctx)
    for seq in range(1, n):
        llama_cpp.llama_memory_seq_cp(mem, 0, seq, -1, -1)
    logits = session.last_logits()
    share = (session.n_ctx - session.n_cells) // n
    group = _Group(session)
    seed = int(session.sampling.seed or 0)
    group.chains = [
        LlamaChain(group, seq, _with_seed(session.sampling, seed + seq), logits, session.n_cells + share)
        for seq in range(n)
    ]
    return list(group.chains)


def _with_seed(sp: SamplingParams, seed: int) -> SamplingParams:
    from dataclasses import replace

    return replace(sp, seed=seed)


class _Group:
    """The chains of one session and their shared decode queue."""

    def __init__(self, session: LlamaSession):
        self.session = session
        self.chains: list[LlamaChain] = []
        self.decodes = 0  # llama_decode calls made for the chains (tests check the batching)
        self.batched_tokens = 0  # tokens those calls carried

    def flush(self) -> None:
        """Decode every chain's queued tokens in as few batches as n_batch allows; copy out the logits."""
        import numpy as np

        llama_cpp, _ = _libs()
        session = self.session
        session._check_open()
        entries: list[tuple[LlamaChain, int, int, bool]] = []
        for chain in self.chains:
            queued = chain._queue
            for j, (tok, pos) in enumerate(queued):
                entries.append((chain, tok, pos, j == len(queued) - 1))
            chain._queue = []
        batch, n_batch, n_vocab = session._batch, session.n_batch, session.model.n_vocab
        for start in range(0, len(entries), n_batch):
            part = entries[start : start + n_batch]
            batch.n_tokens = len(part)
            for i, (chain, tok, pos, last) in enumerate(part):
                batch.token[i] = tok
                batch.pos[i] = pos
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = chain.seq
                batch.logits[i] = 1 if last else 0
            rc = llama_cpp.llama_decode(session._ctx, batch)
            _LOG.reraise()
            if rc != 0:
                session._decode_failed(rc, len(part))
            self.decodes += 1
            self.batched_tokens += len(part)
            session.n_cells += len(part)
            for i, (chain, _tok, _pos, last) in enumerate(part):
                if last:
                    ptr = llama_cpp.llama_get_logits_ith(session._ctx, i)
                    chain._logits[:] = np.ctypeslib.as_array(ptr, shape=(n_vocab,))


class LlamaChain:
    """One reasoning chain of a forked session (implements ``Session``; see the module docstring)."""

    backend = "llama"
    images_encoded = 0  # the image was encoded once, by the session the chains were forked from

    # The sampler chain, its mask, the context check and the token text are the session's own code.
    _build_sampler = LlamaSession._build_sampler
    _use_mask = LlamaSession._use_mask
    _need_cells = LlamaSession._need_cells
    _piece_bytes = LlamaSession._piece_bytes

    def __init__(self, group: _Group, seq: int, sampling: SamplingParams, logits: Any, n_ctx: int):
        import numpy as np

        llama_cpp, _ = _libs()
        session = group.session
        self.group = group
        self.seq = seq
        self.model = session.model
        self.sampling = sampling
        self.n_ctx = n_ctx
        self.n_cells = session.n_cells  # this chain's view: the shared prompt plus its own tokens
        self.n_pos = session.n_pos
        self._vocab = session._vocab
        self._piece = ctypes.create_string_buffer(256)
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self._queue: list[tuple[int, int]] = []  # (token, position) waiting for the next batch
        self._logits = np.array(logits, dtype=np.float32, copy=True)
        n_vocab = self.model.n_vocab
        self._data = (llama_cpp.llama_token_data * n_vocab)()
        self._view = np.ctypeslib.as_array(self._data).view(
            np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])
        )
        self._ids = np.arange(n_vocab, dtype=np.int32)
        self._sampler = self._build_sampler(sampling)
        self._mask: TokenMask | None = None
        for tok in session.prompt_text_ids[-PENALTY_LAST_N:]:
            llama_cpp.llama_sampler_accept(self._sampler, tok)
        self._closed = False
        self._finalizer = weakref.finalize(self, _free_sampler, llama_cpp, self._sampler)

    @property
    def n_past(self) -> int:
        return self.n_cells

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this chain was closed")

    def prefill(self, prompt: Any) -> Any:
        raise RuntimeError("a chain continues its session's prefill; prefill the session, then fork()")

    def _sample(self) -> int:
        """What ``llama_sampler_sample`` does, over this chain's copy of its logits."""
        llama_cpp, _ = _libs()
        view = self._view
        view["id"] = self._ids
        view["logit"] = self._logits
        view["p"] = 0.0
        cur = llama_cpp.llama_token_data_array(
            data=ctypes.cast(self._data, llama_cpp.llama_token_data_p),
            size=len(self._ids),
            selected=-1,
            sorted=False,
        )
        llama_cpp.llama_sampler_apply(self._sampler, ctypes.byref(cur))
        tok = int(cur.data[cur.selected].id)
        llama_cpp.llama_sampler_accept(self._sampler, tok)
        return tok

    def step(self, banned: TokenMask | None = None) -> Token:
        """Sample this chain's next token and queue it for the next batched decode."""
        llama_cpp, _ = _libs()
        self._check_open()
        if self._queue:  # this chain's logits are not there yet: decode every chain's queue now
            self.group.flush()
        self._use_mask(banned)
        tok = self._sample()
        if llama_cpp.llama_vocab_is_eog(self._vocab, tok):
            return Token(id=tok, text=self._utf8.decode(b"", final=True), is_eos=True)
        self._need_cells(1, "the next token")
        self._enqueue([tok])
        return Token(id=tok, text=self._utf8.decode(self._piece_bytes(tok), final=False), is_eos=False)

    def _enqueue(self, tokens: list[int]) -> None:
        for tok in tokens:
            self._queue.append((tok, self.n_pos))
            self.n_pos += 1
            self.n_cells += 1

    def feed(self, text: str) -> int:
        """Queue ``text`` (no special-token parsing) for this chain; decoded with the next batch."""
        llama_cpp, _ = _libs()
        self._check_open()
        tokens = self.model.tokenize(text, special=False)
        if not tokens:
            return 0
        self._need_cells(len(tokens), "the forced text")
        self._utf8.reset()
        self._enqueue(tokens)
        for tok in tokens[-PENALTY_LAST_N:]:
            llama_cpp.llama_sampler_accept(self._sampler, tok)
        return len(tokens)

    def count_tokens(self, text: str) -> int:
        return len(self.model.tokenize(text, special=False))

    def last_logits(self):
        """The logits this chain's next step() samples from (a copy; decodes the queue first)."""
        self._check_open()
        if self._queue:
            self.group.flush()
        return self._logits.copy()

    def close(self) -> None:
        """Free this chain's sampler; its queued tokens are dropped (idempotent).  The KV cache is the
        session's, freed when the session closes."""
        if self._closed:
            return
        self._closed = True
        self._queue = []
        self._finalizer()


def _free_sampler(llama_cpp: Any, sampler: Any) -> None:
    llama_cpp.llama_sampler_free(sampler)
