"""N reasoning chains from one MLX prefill, decoded together as one batch (mechanism only).

:meth:`MlxSession.fork` repeats a prefilled session's cache and hands it to :func:`start_chains`, which
makes ``n`` :class:`MlxChain` objects, each a full ``Session`` for the reasoning controller.  How it works:

* the prompt (image included) is run once; its KV cache (``[1, heads, L, dim]`` per layer) is then
  repeated along the batch axis, one row per chain, so the image is encoded once and prefilled once;
* a chain's ``step()`` samples from its own logits (the session's sampler code: repetition penalty over
  the chain's own history, its own seeded key ``seed + i``, the language mask) and *queues* the token;
  the next time a chain needs logits it does not have, one forward pass runs a ``[n, L]`` batch: each row
  its chain's queued tokens at that chain's own M-RoPE positions (``L`` = 1 while chains only step; a
  chain's forced text goes through in the same pass, the other rows padded to its length);
* padding (a row shorter than ``L``, or a chain that has finished) fills KV cells that are masked out of
  that row's attention from then on (an additive ``-inf`` mask over the cache, causal within the pass), so
  a chain only ever attends to its prompt and its own tokens;
* each chain has its own share of the context (prompt + free // n), as a separate session would.

The sampler and the detokenizer are :mod:`mlx_sampling`'s, the same kinds a session uses; the batched
forward pass is the session's own public :meth:`MlxSession.forward_rows`.
"""

from __future__ import annotations

from typing import Any

from qvq_local.backends.base import Token, TokenMask
from qvq_local.backends.mlx_sampling import Detokenizer, Sampler
from qvq_local.errors import ContextOverflow


def start_chains(session: Any, n: int) -> list[MlxChain]:
    """``n`` chains continuing ``session`` (an ``MlxSession`` whose cache holds ``n`` rows already); see
    the module docstring."""
    import numpy as np

    group = _Group(session, n)
    share = (session.n_ctx - session.n_past) // n
    seed = int(session.sampling.seed or 0)
    group.chains = [
        MlxChain(group, i, session.sampler.fork(seed + i), session.n_past + share) for i in range(n)
    ]
    group.valid = np.ones((n, session.n_past), dtype=bool)
    return list(group.chains)


class _Group:
    """The chains of one session: the shared batched cache and the per-row validity of its cells."""

    def __init__(self, session: Any, n: int):
        self.session = session
        self.n = n
        self.chains: list[MlxChain] = []
        self.valid = None  # numpy bool [n, cells]: which cells each row may attend to
        self.forwards = 0  # batched forward passes (tests check the batching)

    def round(self) -> None:
        """One batched forward of every chain's queued tokens: ``L`` = the longest queue (1 while the
        chains just step, more when one feeds forced text); shorter rows are padded at the end, and each
        row's pad cells are masked out of its attention now and later."""
        import numpy as np

        n = self.n
        width = max(1, max(len(c.queued) for c in self.chains))
        tokens = np.zeros((n, width), dtype=np.int32)
        positions = np.zeros((n, width), dtype=np.int32)
        real = np.zeros((n, width), dtype=bool)
        last = np.zeros(n, dtype=np.int32)
        for i, chain in enumerate(self.chains):
            take = chain.take(width)
            tokens[i, : len(take)] = take
            positions[i] = np.arange(chain.position, chain.position + width)
            real[i, : len(take)] = True
            last[i] = max(len(take) - 1, 0)
            chain.position += len(take)
        old = self.valid.shape[1]
        self.valid = np.concatenate([self.valid, real], axis=1)
        allowed = np.zeros((n, width, old + width), dtype=bool)
        allowed[:, :, :old] = self.valid[:, None, :old]
        causal = np.tril(np.ones((width, width), dtype=bool))
        allowed[:, :, old:] = causal[None] & real[:, None, :]
        mask = np.where(allowed, 0.0, -np.inf).astype(np.float32)[:, None]
        logits = self.session.forward_rows(tokens, positions, mask, last)
        self.forwards += 1
        for i, chain in enumerate(self.chains):
            if real[i].any() and not chain.queued:
                chain.logits = logits[i]

    def run_until_empty(self, chain: MlxChain) -> None:
        while chain.queued:
            self.round()


class MlxChain:
    """One reasoning chain of a forked MLX session (implements ``Session``; see the module docstring)."""

    backend = "mlx"
    images_encoded = 0

    def __init__(self, group: _Group, index: int, sampler: Sampler, n_ctx: int):
        session = group.session
        self.group = group
        self.index = index
        self.sampler = sampler
        self.sampling = sampler.sampling
        self.n_ctx = n_ctx
        self.n_past = session.n_past
        self.position = session.next_position  # this chain's next M-RoPE position
        self.logits = session.logits  # mx.array [vocab]: what the next step samples from
        self._eos = session.loaded.eos_token_ids
        self._tokenizer = session.loaded.tokenizer
        self._detok = Detokenizer(self._tokenizer)
        self.queued: list[int] = []  # tokens waiting for the next batched forward pass
        self._closed = False

    def take(self, width: int) -> list[int]:
        """Up to ``width`` queued tokens, handed over to a batched forward pass."""
        take, self.queued = self.queued[:width], self.queued[width:]
        return take

    def prefill(self, prompt: Any) -> Any:
        raise RuntimeError("a chain continues its session's prefill; prefill the session, then fork()")

    def _check_room(self, extra: int, what: str) -> None:
        if self.n_past + extra > self.n_ctx:
            raise ContextOverflow(
                f"{what} needs {self.n_past + extra} tokens but this chain's share of the context holds"
                f" {self.n_ctx}",
                hint="lower --samples, the budgets or --max-pixels",
            )

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this chain was closed")

    def step(self, banned: TokenMask | None = None) -> Token:
        self._check_open()
        self.group.run_until_empty(self)
        self._check_room(1, "generation")
        token_id = int(self.sampler.sample(self.logits, banned).item())
        self.sampler.accept([token_id])
        if token_id in self._eos:
            return Token(id=token_id, text=self._detok.flush(), is_eos=True)
        self.queued.append(token_id)
        self.n_past += 1
        return Token(id=token_id, text=self._detok.push(token_id), is_eos=False)

    def feed(self, text: str) -> int:
        self._check_open()
        ids = self._encode(text)
        if not ids:
            return 0
        self._check_room(len(ids), "the forced text")
        self._detok.drop()
        self.queued.extend(ids)
        self.sampler.accept(ids)
        self.n_past += len(ids)
        return len(ids)

    def _encode(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=False))

    def count_tokens(self, text: str) -> int:
        return len(self._encode(text))

    def last_logits(self):
        import numpy as np

        self._check_open()
        self.group.run_until_empty(self)
        return np.array(self.logits, dtype=np.float32, copy=True)

    def close(self) -> None:
        self._closed = True
        self.queued = []
