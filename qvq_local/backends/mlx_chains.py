"""N reasoning chains from one MLX prefill, decoded together as one batch (mechanism only).

:meth:`MlxSession.fork` turns a prefilled session into ``n`` :class:`MlxChain` objects, each a full
``Session`` for the reasoning controller.  How it works:

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
"""

from __future__ import annotations

from typing import Any

from qvq_local.backends.base import SamplingParams, Token, TokenMask
from qvq_local.backends.mlx import MlxSession, _Detokenizer
from qvq_local.errors import ContextOverflow, InputError


def fork_chains(session: MlxSession, n: int) -> list[MlxChain]:
    """``n`` chains continuing the prefilled ``session``; see the module docstring."""
    import numpy as np

    mx = session.mx
    session._require_prefill()
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InputError(f"the number of chains must be a positive whole number, got {n!r}")
    if getattr(session, "_forked", False):
        raise RuntimeError("fork() was already called on this session")
    session._forked = True
    for c in session._cache:
        keys, values = c.state
        c.keys = mx.repeat(keys, n, axis=0)
        c.values = mx.repeat(values, n, axis=0)
    mx.eval([c.state for c in session._cache])
    group = _Group(session, n)
    share = (session.n_ctx - session.n_past) // n
    seed = int(session.sampling.seed or 0)
    from dataclasses import replace

    group.chains = [
        MlxChain(group, i, replace(session.sampling, seed=seed + i), session.n_past + share) for i in range(n)
    ]
    group.valid = np.ones((n, session.n_past), dtype=bool)
    return list(group.chains)


class _Group:
    """The chains of one session: the shared batched cache and the per-row validity of its cells."""

    def __init__(self, session: MlxSession, n: int):
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

        session, mx, n = self.session, self.session.mx, self.n
        width = max(1, max(len(c._queue) for c in self.chains))
        tokens = np.zeros((n, width), dtype=np.int32)
        positions = np.zeros((n, width), dtype=np.int32)
        real = np.zeros((n, width), dtype=bool)
        last = np.zeros(n, dtype=np.int32)
        for i, chain in enumerate(self.chains):
            take, chain._queue = chain._queue[:width], chain._queue[width:]
            tokens[i, : len(take)] = take
            positions[i] = np.arange(chain._pos, chain._pos + width)
            real[i, : len(take)] = True
            last[i] = max(len(take) - 1, 0)
            chain._pos += len(take)
        old = self.valid.shape[1]
        self.valid = np.concatenate([self.valid, real], axis=1)
        allowed = np.zeros((n, width, old + width), dtype=bool)
        allowed[:, :, :old] = self.valid[:, None, :old]
        causal = np.tril(np.ones((width, width), dtype=bool))
        allowed[:, :, old:] = causal[None] & real[:, None, :]
        mask = np.where(allowed, 0.0, -np.inf).astype(np.float32)[:, None]
        embeds = session._lm.model.embed_tokens(mx.array(tokens))
        mask_mx = mx.array(mask)
        if session._act_dtype is not None:
            embeds = embeds.astype(session._act_dtype)
            mask_mx = mask_mx.astype(session._act_dtype)
        pos = mx.array(positions).reshape(1, n, width)
        hidden = session._lm.model(
            None,
            inputs_embeds=embeds,
            cache=session._cache,
            position_ids=mx.broadcast_to(pos, (3, n, width)),
            mask=mask_mx,
        )
        picked = hidden[mx.arange(n), mx.array(last)]  # each row's last real token
        logits = session._head(picked[:, None, :])[:, -1].astype(mx.float32)
        mx.eval(logits)
        self.forwards += 1
        for i, chain in enumerate(self.chains):
            if real[i].any() and not chain._queue:
                chain._logits = logits[i]

    def run_until_empty(self, chain: MlxChain) -> None:
        while chain._queue:
            self.round()


class MlxChain:
    """One reasoning chain of a forked MLX session (implements ``Session``; see the module docstring)."""

    backend = "mlx"
    images_encoded = 0

    # The sampler is the session's own code, run over this chain's state.
    _sample = MlxSession._sample
    _penalised_ids = MlxSession._penalised_ids
    _mask_vector = MlxSession._mask_vector

    def __init__(self, group: _Group, index: int, sampling: SamplingParams, n_ctx: int):
        session = group.session
        self.group = group
        self.index = index
        self.mx = session.mx
        self.sampling = sampling
        self.n_ctx = n_ctx
        self.n_past = session.n_past
        self._pos = session.n_past + session._rope_delta  # this chain's next M-RoPE position
        self._logits = session._logits
        self._history = list(session._history)
        self._rep_window = session._rep_window
        self._seen: set[int] = set()
        self._seen_count = 0
        self._seen_ids = None
        self._mask: TokenMask | None = None
        self._mask_add = None
        self._key = self.mx.random.key(int(sampling.seed or 0))
        self._eos = session._eos
        self._tokenizer = session._tokenizer
        self._detok = _Detokenizer(session._tokenizer)
        self._queue: list[int] = []
        self._closed = False

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
        token_id = int(self._sample(banned).item())
        self._history.append(token_id)
        if token_id in self._eos:
            return Token(id=token_id, text=self._detok.flush(), is_eos=True)
        self._queue.append(token_id)
        self.n_past += 1
        return Token(id=token_id, text=self._detok.push(token_id), is_eos=False)

    def feed(self, text: str) -> int:
        self._check_open()
        ids = self._encode(text)
        if not ids:
            return 0
        self._check_room(len(ids), "the forced text")
        self._detok.drop()
        self._queue.extend(ids)
        self._history.extend(ids)
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
        return np.array(self._logits, dtype=np.float32, copy=True)

    def close(self) -> None:
        self._closed = True
        self._queue = []
