"""What a llama.cpp session and the chains forked from it share: the library, its log, the sampler chain
and the token text.

* :func:`libs` imports llama-cpp-python and its mtmd bindings once and routes their log lines to
  :data:`LOG` (silent unless ``QVQ_DEBUG``; the last errors are kept for messages, and a Ctrl-C that lands
  inside a C call is re-raised once Python is back);
* :class:`Sampler` is one sequence's llama.cpp sampler chain (repetition penalty, then greedy or
  top-k -> top-p -> temperature -> seeded draw) with a token mask at its head; a session samples from its
  context's logits, a chain from its own copy of them, through the same object;
* :class:`TokenText` turns token ids into the text they add, a character split across tokens coming out
  whole with the token that completes it;
* :func:`check_room` refuses, before decoding, what would overflow a context;
* :func:`load_failure_hint` reads the log lines of a failed load or context creation for a GPU that ran
  out of memory, and says what to do.

``qvq_local.backends.llamacpp`` (the loaded model), ``llama_session`` (one question's context) and
``llama_chains`` (the forked chains) build on this module; none reaches into another's private parts.
"""

from __future__ import annotations

import codecs
import ctypes
import os
import re
import weakref
from collections import deque
from typing import Any

from qvq_local.backends import registry
from qvq_local.backends.base import SamplingParams, TokenMask
from qvq_local.errors import BackendUnavailable, ContextOverflow

#: The repetition penalty looks back this many tokens.
PENALTY_LAST_N = 64

INSTALL_HINT = registry.BACKENDS["llama"].install_hint

_GGML_LOG_LEVEL_ERROR = 4


# ---------------------------------------------------------------- library loading and logging


class LogSink:
    """Receives llama.cpp / mtmd log lines: silent unless QVQ_DEBUG, but remembers the last errors.

    The remembered lines turn a NULL from ``llama_model_load_from_file`` into a message that says why.
    """

    def __init__(self) -> None:
        self.errors: deque[str] = deque(maxlen=8)
        self.debug = bool(os.environ.get("QVQ_DEBUG"))
        self.callback = None  # the ctypes function object; must stay referenced while installed

    def __call__(self, level: int, text: bytes | None, _user: Any) -> None:
        # Python runs signal handlers here when Ctrl-C arrives during a long C call (mtmd encoding an
        # image logs progress).  An exception cannot cross the ctypes boundary -- ctypes would print
        # "Exception ignored" and drop it -- so remember it and re-raise once the C call has returned.
        try:
            line = (text or b"").decode("utf-8", "replace")
            if level == _GGML_LOG_LEVEL_ERROR and line.strip():
                self.errors.append(line.strip())
            if self.debug:
                import sys

                sys.stderr.write(line)
        except BaseException as exc:  # noqa: BLE001 - KeyboardInterrupt/SystemExit are re-raised later
            self.pending = exc

    pending: BaseException | None = None

    def reraise(self) -> None:
        """Raise an interrupt that arrived inside a C call, now that Python is back in control."""
        exc, self.pending = self.pending, None
        if exc is not None:
            raise exc

    def last_error(self) -> str:
        return self.errors[-1] if self.errors else ""

    def clear(self) -> None:
        self.errors.clear()


LOG = LogSink()
_LIBS: tuple[Any, Any] | None = None


def libs() -> tuple[Any, Any]:
    """Import llama_cpp and its mtmd bindings once, and route their logs to :data:`LOG`."""
    global _LIBS
    if _LIBS is not None:
        return _LIBS
    try:
        import llama_cpp
        from llama_cpp import mtmd_cpp
    except ImportError as exc:
        raise BackendUnavailable("llama-cpp-python is not installed", hint=INSTALL_HINT) from exc
    except OSError as exc:  # the wheel is there but its shared library does not load
        raise BackendUnavailable(
            f"llama-cpp-python is installed but its library failed to load: {exc}",
            hint=f"reinstall it: {INSTALL_HINT}",
        ) from exc
    LOG.debug = bool(os.environ.get("QVQ_DEBUG"))
    LOG.callback = llama_cpp.llama_log_callback(LOG)
    llama_cpp.llama_log_set(LOG.callback, ctypes.c_void_p(0))
    mtmd_cpp.mtmd_helper_log_set(LOG.callback, ctypes.c_void_p(0))
    llama_cpp.llama_backend_init()
    _LIBS = (llama_cpp, mtmd_cpp)
    return _LIBS


def check_room(used: int, n: int, n_ctx: int, what: str) -> None:
    """``ContextOverflow`` when ``n`` more KV cells do not fit a context of ``n_ctx`` with ``used`` taken."""
    if used + n > n_ctx:
        raise ContextOverflow(
            f"{what} needs {n} more token(s) but the context holds {n_ctx} and {used} are used",
            hint="size n_ctx with context_needed() or lower the budgets",
        )


#: A GPU buffer llama.cpp could not allocate, in its own log lines (ggml-cuda.cu, llama-model.cpp,
#: ggml-metal, ggml-vulkan): ``cudaMalloc failed: out of memory``, ``unable to allocate CUDA0 buffer``.
_GPU_WORD = re.compile(r"cuda|metal|vulkan|rocm|hip\b|sycl|gpu", re.IGNORECASE)
_ALLOC_FAILED = re.compile(r"alloc|out of memory", re.IGNORECASE)


def load_failure_hint(why: str, gpu_layers: int) -> str | None:
    """What to do when llama.cpp could not allocate GPU memory (``why``: the error lines it logged, e.g.
    ``cudaMalloc failed: out of memory``) with ``gpu_layers`` asked for; None for any other failure
    (a host-memory allocation, a corrupt file) or when nothing was going to the GPU."""
    if gpu_layers == 0 or not (_GPU_WORD.search(why) and _ALLOC_FAILED.search(why)):
        return None
    fewer = "fewer layers with --gpu-layers N" if gpu_layers < 0 else f"fewer than --gpu-layers {gpu_layers}"
    return f"the GPU's memory is too small: put {fewer} there (qvq doctor --model MODEL estimates N)"


# ---------------------------------------------------------------- sampling


def _free_sampler(llama_cpp: Any, handle: Any) -> None:
    llama_cpp.llama_sampler_free(handle)


class Sampler:
    """One sequence's llama.cpp sampler chain: penalties -> (greedy | top-k -> top-p -> temperature ->
    seeded draw), and a token mask as a logit-bias sampler at its head while one is in use.

    The handle is freed by :meth:`close`, when the object is collected, or at exit.
    """

    def __init__(self, sampling: SamplingParams, n_vocab: int):
        llama_cpp, _ = libs()
        self.sampling = sampling
        self.n_vocab = int(n_vocab)
        self.mask: TokenMask | None = None  # the mask whose logit-bias sampler heads the chain now
        self.handle = self._build(llama_cpp, sampling)
        self._candidates = None  # llama_token_data array for sample_logits, made on first use
        self._finalizer = weakref.finalize(self, _free_sampler, llama_cpp, self.handle)

    def _build(self, llama_cpp: Any, sp: SamplingParams) -> Any:
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        add = llama_cpp.llama_sampler_chain_add
        rep = float(sp.repetition_penalty if sp.repetition_penalty is not None else 1.0)
        if rep != 1.0:
            add(chain, llama_cpp.llama_sampler_init_penalties(self.n_vocab, PENALTY_LAST_N, rep, 0.0, 0.0))
        temp = float(sp.temperature if sp.temperature is not None else 0.0)
        top_k = int(sp.top_k) if sp.top_k is not None else 0
        if temp <= 0.0 or top_k == 1:
            add(chain, llama_cpp.llama_sampler_init_greedy())
        else:
            if top_k > 0:
                add(chain, llama_cpp.llama_sampler_init_top_k(top_k))
            top_p = float(sp.top_p) if sp.top_p is not None else 1.0
            if 0.0 < top_p < 1.0:
                add(chain, llama_cpp.llama_sampler_init_top_p(top_p, 1))
            add(chain, llama_cpp.llama_sampler_init_temp(temp))
            seed = int(sp.seed if sp.seed is not None else 0) & 0xFFFFFFFF
            add(chain, llama_cpp.llama_sampler_init_dist(seed))
        return chain

    def use_mask(self, mask: TokenMask | None) -> None:
        """Put a logit-bias sampler (-inf on the masked ids) at the head of the chain, or take it out.

        The chain's other samplers are taken out and put back in order, not rebuilt, so the repetition
        penalty's history and the seeded draw's state carry on unchanged; with no mask the chain is
        exactly the one built.  Done only when the mask changes (the lock starts or ends).
        """
        if mask is not None and len(mask) == 0:
            mask = None
        if mask is self.mask:
            return
        import numpy as np

        llama_cpp, _ = libs()
        chain = self.handle
        rest = [
            llama_cpp.llama_sampler_chain_remove(chain, 0)
            for _ in range(llama_cpp.llama_sampler_chain_n(chain))
        ]
        if self.mask is not None:
            llama_cpp.llama_sampler_free(rest.pop(0))
        if mask is not None:
            ids = np.asarray(mask.ids, dtype=np.int32)
            biases = (llama_cpp.llama_logit_bias * len(ids))()
            view = np.ctypeslib.as_array(biases).view(np.dtype([("token", np.int32), ("bias", np.float32)]))
            view["token"] = ids
            view["bias"] = -np.inf
            bias = llama_cpp.llama_sampler_init_logit_bias(self.n_vocab, len(ids), biases)
            llama_cpp.llama_sampler_chain_add(chain, bias)
        for sampler in rest:
            llama_cpp.llama_sampler_chain_add(chain, sampler)
        self.mask = mask

    def accept(self, tokens: list[int]) -> None:
        """Tokens that entered the context without being sampled (the prompt, forced text): the repetition
        penalty sees the last :data:`PENALTY_LAST_N` of them."""
        llama_cpp, _ = libs()
        for tok in tokens[-PENALTY_LAST_N:]:
            llama_cpp.llama_sampler_accept(self.handle, tok)

    def sample(self, ctx: Any) -> int:
        """Sample (and accept) the next token from a context's last logits (``llama_sampler_sample``)."""
        llama_cpp, _ = libs()
        return int(llama_cpp.llama_sampler_sample(self.handle, ctx, -1))

    def sample_logits(self, logits: Any) -> int:
        """What ``llama_sampler_sample`` does, over a copy of the logits (float32, n_vocab) held elsewhere."""
        import numpy as np

        llama_cpp, _ = libs()
        if self._candidates is None:
            data = (llama_cpp.llama_token_data * self.n_vocab)()
            view = np.ctypeslib.as_array(data).view(
                np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])
            )
            self._candidates = (data, view, np.arange(self.n_vocab, dtype=np.int32))
        data, view, ids = self._candidates
        view["id"] = ids
        view["logit"] = logits
        view["p"] = 0.0
        cur = llama_cpp.llama_token_data_array(
            data=ctypes.cast(data, llama_cpp.llama_token_data_p), size=self.n_vocab, selected=-1, sorted=False
        )
        llama_cpp.llama_sampler_apply(self.handle, ctypes.byref(cur))
        tok = int(cur.data[cur.selected].id)
        llama_cpp.llama_sampler_accept(self.handle, tok)
        return tok

    def close(self) -> None:
        """Free the sampler chain (idempotent)."""
        self._finalizer()


# ---------------------------------------------------------------- token text


class TokenText:
    """Token ids -> the text each adds: its bytes (``llama_token_to_piece``), decoded as UTF-8
    incrementally, so a character split across tokens comes out whole with the token that completes it."""

    def __init__(self, vocab: Any):
        self.vocab = vocab
        self._buffer = ctypes.create_string_buffer(256)
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")

    def piece(self, tok: int) -> bytes:
        """The bytes token ``tok`` writes (control tokens: none)."""
        llama_cpp, _ = libs()
        n = llama_cpp.llama_token_to_piece(self.vocab, tok, self._buffer, len(self._buffer), 0, False)
        if n < 0:
            self._buffer = ctypes.create_string_buffer(-n + 8)
            n = llama_cpp.llama_token_to_piece(self.vocab, tok, self._buffer, len(self._buffer), 0, False)
        return self._buffer.raw[: max(n, 0)]

    def push(self, tok: int) -> str:
        """The complete characters ``tok`` adds; bytes of a character still incomplete wait for the next."""
        return self._utf8.decode(self.piece(tok), final=False)

    def end(self) -> str:
        """What is left at the end of the text (an incomplete character: U+FFFD)."""
        return self._utf8.decode(b"", final=True)

    def reset(self) -> None:
        """Drop a half character (forced text supersedes it)."""
        self._utf8.reset()

    def is_end(self, tok: int) -> bool:
        """Whether ``tok`` ends the turn (end of generation)."""
        llama_cpp, _ = libs()
        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, tok))


__all__ = ["LOG", "PENALTY_LAST_N", "LogSink", "Sampler", "TokenText", "check_room", "libs"]
