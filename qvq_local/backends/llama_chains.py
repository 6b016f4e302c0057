"""N reasoning chains from one llama.cpp prefill, decoded together in one batch (mechanism only).

:meth:`LlamaSession.fork` shares a prefilled session's prompt and hands it to :func:`start_chains`, which
makes ``n`` :class:`LlamaChain` objects, each a full
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
The sampler chain and the token text are :mod:`llama_runtime`'s, the same objects a session uses; the
decoding is the session's own public :meth:`LlamaSession.decode`.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from qvq_local.backends.base import SamplingParams, Token, TokenMask
from qvq_local.backends.llama_runtime import Sampler, TokenText, check_room


def start_chains(session: Any, n: int, logits: Any) -> list[LlamaChain]:
    """``n`` chains continuing ``session`` (a ``LlamaSession`` whose prompt sequences 1..n-1 share
    already), each starting from a copy of ``logits``; see the module docstring."""
    share = (session.n_ctx - session.n_cells) // n
    group = _Group(session)
    seed = int(session.sampling.seed or 0)
    group.chains = [
        LlamaChain(group, seq, replace(session.sampling, seed=seed + seq), logits, session.n_cells + share)
        for seq in range(n)
    ]
    return list(group.chains)


class _Group:
    """The chains of one session and their shared decode queue."""

    def __init__(self, session: Any):
        self.session = session
        self.chains: list[LlamaChain] = []
        self.decodes = 0  # llama_decode calls made for the chains (tests check the batching)
        self.batched_tokens = 0  # tokens those calls carried

    def flush(self) -> None:
        """Decode every chain's queued tokens in as few batches as n_batch allows; copy out the logits."""
        owners: list[LlamaChain] = []
        entries: list[tuple[int, int, int, bool]] = []
        for chain in self.chains:
            queued = chain.take_queue()
            for j, (tok, pos) in enumerate(queued):
                owners.append(chain)
                entries.append((chain.seq, tok, pos, j == len(queued) - 1))

        def keep(i: int, logits: Any) -> None:
            owners[i].logits[:] = logits

        self.decodes += self.session.decode(entries, keep)
        self.batched_tokens += len(entries)


class LlamaChain:
    """One reasoning chain of a forked session (implements ``Session``; see the module docstring)."""

    backend = "llama"
    images_encoded = 0  # the image was encoded once, by the session the chains were forked from

    def __init__(self, group: _Group, seq: int, sampling: SamplingParams, logits: Any, n_ctx: int):
        import numpy as np

        session = group.session
        self.group = group
        self.seq = seq
        self.model = session.model
        self.sampling = sampling
        self.n_ctx = n_ctx
        self.n_cells = session.n_cells  # this chain's view: the shared prompt plus its own tokens
        self.n_pos = session.n_pos
        self.logits = np.array(logits, dtype=np.float32, copy=True)  # what the next step samples from
        self.text = TokenText(self.model.vocab())
        self.sampler = Sampler(sampling, self.model.n_vocab)
        self.sampler.accept(session.prompt_text_ids)
        self._queue: list[tuple[int, int]] = []  # (token, position) waiting for the next batch
        self._closed = False

    @property
    def n_past(self) -> int:
        return self.n_cells

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this chain was closed")

    def take_queue(self) -> list[tuple[int, int]]:
        """The tokens waiting for the next batched decode (token, position), handed over once."""
        queued, self._queue = self._queue, []
        return queued

    def prefill(self, prompt: Any) -> Any:
        raise RuntimeError("a chain continues its session's prefill; prefill the session, then fork()")

    def step(self, banned: TokenMask | None = None) -> Token:
        """Sample this chain's next token and queue it for the next batched decode."""
        self._check_open()
        if self._queue:  # this chain's logits are not there yet: decode every chain's queue now
            self.group.flush()
        self.sampler.use_mask(banned)
        tok = self.sampler.sample_logits(self.logits)
        if self.text.is_end(tok):
            return Token(id=tok, text=self.text.end(), is_eos=True)
        check_room(self.n_cells, 1, self.n_ctx, "the next token")
        self._enqueue([tok])
        return Token(id=tok, text=self.text.push(tok), is_eos=False)

    def _enqueue(self, tokens: list[int]) -> None:
        for tok in tokens:
            self._queue.append((tok, self.n_pos))
            self.n_pos += 1
            self.n_cells += 1

    def feed(self, text: str) -> int:
        """Queue ``text`` (no special-token parsing) for this chain; decoded with the next batch."""
        self._check_open()
        tokens = self.model.tokenize(text, special=False)
        if not tokens:
            return 0
        check_room(self.n_cells, len(tokens), self.n_ctx, "the forced text")
        self.text.reset()
        self._enqueue(tokens)
        self.sampler.accept(tokens)
        return len(tokens)

    def count_tokens(self, text: str) -> int:
        return len(self.model.tokenize(text, special=False))

    def last_logits(self):
        """The logits this chain's next step() samples from (a copy; decodes the queue first)."""
        self._check_open()
        if self._queue:
            self.group.flush()
        return self.logits.copy()

    def close(self) -> None:
        """Free this chain's sampler; its queued tokens are dropped (idempotent).  The KV cache is the
        session's, freed when the session closes."""
        if self._closed:
            return
        self._closed = True
        self._queue = []
        self.sampler.close()
