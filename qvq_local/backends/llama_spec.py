"""Speculative decoding on llama.cpp: a session's KV cache and sampler as the speculator's target.

* a forward pass decodes ``[token, guess1..guessk]`` in one ``llama_decode`` batch with logits for
  every position, each row copied out (the context's logits buffer is overwritten by the next decode);
* a rollback removes the last cells of sequence 0 with ``llama_memory_seq_rm`` (positions from the
  first removed one to the end), and the session's position and cell counts go back with them;
* a draw runs the session's own llama.cpp sampler chain (mask at its head, repetition penalty, seeded
  draw) over a row, exactly as ``llama_sampler_sample`` runs it over the context's logits: the penalty's
  history and the seed's state only ever see the tokens that were emitted, so a rollback never has to
  touch them.

The speculator itself is :mod:`qvq_local.speculate`'s; this module only adapts the session to it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from qvq_local.backends.base import Prompt, SamplingParams, TokenMask
from qvq_local.backends.llama_runtime import PENALTY_LAST_N, libs
from qvq_local.errors import InputError

#: Text a draft model must tokenise exactly as the model does (control tokens, CJK, digits, spaces).
VOCABULARY_PROBE = "<|im_start|>user\nWhat is 12.5% of 3,600?  答案是\t450 ✓<|im_end|>\n"


class LlamaTarget:
    """The speculator's view of a ``LlamaSession`` (sequence 0 of its context)."""

    def __init__(self, session: Any):
        self.session = session

    def forward(self, tokens: list[int], *, all_rows: bool) -> list[Any]:
        import numpy as np

        s = self.session
        s._need_cells(len(tokens), "the next tokens")
        last = len(tokens) - 1
        rows: list[Any] = []
        s.decode(
            [(0, tok, s.n_pos + i, all_rows or i == last) for i, tok in enumerate(tokens)],
            lambda _i, logits: rows.append(np.array(logits, dtype=np.float32, copy=True)),
        )
        s.n_pos += len(tokens)
        return rows

    def rollback(self, n: int) -> None:
        if n <= 0:
            return
        llama_cpp, _ = libs()
        s = self.session
        mem = llama_cpp.llama_get_memory(s._ctx)
        if not llama_cpp.llama_memory_seq_rm(mem, 0, s.n_pos - n, -1):
            raise RuntimeError("llama.cpp could not remove the rejected guesses from the KV cache")
        s.n_pos -= n
        s.n_cells -= n

    def sample(self, row: Any, mask: TokenMask | None) -> int:
        sampler = self.session.sampler
        sampler.use_mask(mask)
        return sampler.sample_logits(row)


def identity(model: Any) -> dict:
    """What a llama.cpp model's verify cost curve depends on (``qvq_local.speculate.costs``)."""
    path = Path(model.model_path)
    try:
        st = os.stat(path)
        size, mtime = st.st_size, st.st_mtime_ns
    except OSError:
        size = mtime = 0
    return {
        "backend": "llama",
        "model": str(path.resolve()),
        "size": size,
        "mtime": mtime,
        "gpu_layers": model.gpu_layers if model.gpu_offload else 0,
        "threads": model.n_threads,
    }


def check_shared_vocabulary(draft: Any, model: Any) -> None:
    """A draft model must share the model's tokenizer (its guesses are token ids of the model's)."""
    if draft.tokenize(VOCABULARY_PROBE, special=True) != model.tokenize(VOCABULARY_PROBE, special=True):
        raise InputError(
            f"the draft model {draft.name} does not tokenise text as {model.name} does: a draft must share the"
            " model's tokenizer (a smaller Qwen2 / Qwen2.5 / Qwen2-VL model)",
            path=draft.model_path,
        )


def draft_drafter(session: Any, prompt: Prompt) -> Any:
    """A drafter over the session's draft model (``session.speculation.draft``, a loaded GGUF): its own
    context of the same size, greedy; a vision draft (one with an mmproj) is prefilled with the prompt
    and its images, a text-only one sees the prompt's text tokens.  The draft's session is kept as
    ``session.draft_session`` (closed with the session)."""
    from qvq_local.speculate.draft import ModelDrafter, greedy_pick

    draft = session.speculation.draft
    greedy = SamplingParams(temperature=0.0, top_k=1, top_p=1.0, repetition_penalty=1.0, seed=0)
    ds = draft.new_session(greedy, n_ctx=session.n_ctx)
    session.draft_session = ds
    start = None
    if draft.mmproj_path is not None:
        ds.prefill(prompt)
        start = ds.last_logits()
    penalty = float(session.sampling.repetition_penalty or 1.0)
    return ModelDrafter(
        LlamaTarget(ds),
        lambda row, history: greedy_pick(row, history, penalty, PENALTY_LAST_N),
        start_row=start,
        stop=session.text.is_end,
    )


__all__ = ["LlamaTarget", "check_shared_vocabulary", "draft_drafter", "identity"]
