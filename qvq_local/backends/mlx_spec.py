"""Speculative decoding on MLX: a session's KV cache and sampler as the speculator's target.

* a forward pass runs ``[token, guess1..guessk]`` through the language model in one call (mlx-lm's
  causal mask over the cache) and puts every position through the output head;
* a rollback trims the last cells of every layer's cache (``KVCache.trim``: the offset goes back, the
  next tokens overwrite the cells) and the session's count of cached tokens with them;
* a draw runs the session's own sampler (mask, repetition penalty over the tokens seen, seeded draw)
  over a row, then records the token, as a plain step does;
* fed text goes through the session's own feed path (chunked fill, last position alone), so its
  logits are those plain decoding computes.

The speculator itself is :mod:`qvq_local.speculate`'s; this module only adapts the session to it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qvq_local.backends.base import Prompt, SamplingParams, TokenMask
from qvq_local.errors import InputError

#: Text a draft model must tokenise exactly as the model does (control tokens, CJK, digits, spaces).
VOCABULARY_PROBE = "<|im_start|>user\nWhat is 12.5% of 3,600?  答案是\t450 ✓<|im_end|>\n"


class MlxTarget:
    """The speculator's view of an ``MlxSession``."""

    def __init__(self, session: Any):
        self.session = session

    def forward(self, tokens: list[int], *, all_rows: bool) -> list[Any]:
        s = self.session
        mx = s.mx
        if not all_rows:
            logits = s.forward_last(tokens)
            return [logits]
        hidden = s.run_tokens(tokens)
        logits = s.head(hidden)[0].astype(mx.float32)
        mx.eval(logits)
        return [logits[i] for i in range(len(tokens))]

    def rollback(self, n: int) -> None:
        if n > 0:
            self.session.trim(n)

    def sample(self, row: Any, mask: TokenMask | None) -> int:
        s = self.session
        tok = int(s.sampler.sample(row, mask).item())
        s.sampler.accept([tok])
        return tok


def identity(loaded: Any, session: Any) -> dict:
    """What an MLX model's verify cost curve depends on (``qvq_local.speculate.costs``)."""
    folder = Path(loaded.model_dir)
    weights = sorted(folder.glob("*.safetensors"))
    return {
        "backend": "mlx",
        "model": str(folder.resolve()),
        "size": sum(p.stat().st_size for p in weights),
        "mtime": max((p.stat().st_mtime_ns for p in weights), default=0),
        "device": str(session.mx.default_device()),
        "compute": str(session.compute_dtype),
    }


def check_shared_vocabulary(draft: Any, loaded: Any) -> None:
    """A draft model must share the model's tokenizer (its guesses are token ids of the model's)."""
    if draft.tokenize(VOCABULARY_PROBE) != loaded.tokenize(VOCABULARY_PROBE):
        raise InputError(
            f"the draft model {draft.name} does not tokenise text as {loaded.name} does: a draft must share the"
            " model's tokenizer (a smaller model of the same family)",
            path=draft.model_dir,
        )


def draft_drafter(session: Any, prompt: Prompt) -> Any:
    """A drafter over the session's draft model (``session.speculation.draft``, a loaded MLX vision
    model sharing the tokenizer): its own session of the same size, prefilled with the prompt and its
    images, greedy.  Kept as ``session.draft_session`` (closed with the session)."""
    from qvq_local.speculate.draft import ModelDrafter, greedy_pick

    draft = session.speculation.draft
    greedy = SamplingParams(temperature=0.0, top_k=1, top_p=1.0, repetition_penalty=1.0, seed=0)
    ds = draft.new_session(greedy, n_ctx=session.n_ctx)
    session.draft_session = ds
    ds.prefill(prompt)
    penalty = float(session.sampling.repetition_penalty or 1.0)
    window = session.sampler.window
    eos = session.loaded.eos_token_ids
    return ModelDrafter(
        MlxTarget(ds),
        lambda row, history: greedy_pick(row, history, penalty, window),
        start_row=ds.logits,
        stop=lambda token: token in eos,
    )


__all__ = ["MlxTarget", "check_shared_vocabulary", "draft_drafter", "identity"]
