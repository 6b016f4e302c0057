"""One question on a llama.cpp model: a context (KV cache), its sampler chain, and the Session protocol.

The loaded model (:mod:`qvq_local.backends.llamacpp`) opens a :class:`LlamaSession` per question
(``LlamaModel.new_session``).  The session owns one ``llama_context``: it tokenises the prompt with mtmd,
encodes each image once (``mtmd_encode_chunk``, timed on its own) and decodes its embeddings into the KV
cache (``mtmd_helper_decode_image_chunk``), then samples one token at a time, appends forced text into the
same cache, exports and restores the image prefix's KV state, and forks chains that share the prompt's
cells (:mod:`qvq_local.backends.llama_chains`).

M-RoPE matters for bookkeeping: an image advances the position counter by ``max(grid_h, grid_w)`` but
stores one KV cell per image token.  ``n_pos`` counts positions (where the next token goes);
``n_cells`` counts cells (what fills ``n_ctx``), and the Session protocol's ``n_past`` is that count.
Overflow is checked against cells, before decoding, and raised as
:class:`~qvq_local.errors.ContextOverflow`.
"""

from __future__ import annotations

import ctypes
import time
import weakref
from typing import Any

from qvq_local.backends import llama_chains
from qvq_local.backends.base import PrefillStats, PrefixState, Prompt, SamplingParams, Token, TokenMask
from qvq_local.backends.llama_runtime import LOG, Sampler, TokenText, check_room, libs, load_failure_hint
from qvq_local.errors import ContextOverflow, InputError, QvqError


def _free_session(llama_cpp: Any, batch: Any, ctx: Any) -> None:
    llama_cpp.llama_batch_free(batch)
    llama_cpp.llama_free(ctx)


class LlamaSession:
    """One question: a llama.cpp context (KV cache) and a sampler chain (implements ``Session``), on
    ``model``, the :class:`~qvq_local.backends.llamacpp.LlamaModel` that opened it."""

    backend = "llama"

    @property
    def n_past(self) -> int:
        """KV cells in use: what ``n_ctx`` limits (the Session protocol's measure of a full context);
        guesses a speculator has decoded but not yet confirmed are not counted."""
        return self.n_cells - (len(self.speculator.pending) if self.speculator is not None else 0)

    def __init__(
        self, model: Any, sampling: SamplingParams, n_ctx: int, *, n_seq: int = 1, speculation: Any = None
    ):
        llama_cpp, _ = libs()
        if speculation is not None and speculation.active and n_seq > 1:
            raise InputError("speculation runs on one chain; open the session with n_seq=1")
        if speculation is not None and speculation.uses_draft_model:
            from qvq_local.backends.llama_spec import check_shared_vocabulary

            check_shared_vocabulary(speculation.draft, model)  # before any work
        self.speculation = speculation  # SpecSettings, or None: plain decoding
        self.speculator: Any = None  # qvq_local.speculate.engine.Speculator once prefilled
        self.speculation_note: str | None = None  # why it is off, when the settings asked for it
        self.draft_session: Any = None  # the draft model's session (--draft)
        self.n_seq = int(n_seq)  # sequences the KV cache can hold (fork() needs one per chain)
        self.model = model
        self.sampling = sampling
        self.n_ctx = n_ctx
        self.n_pos = 0  # positions used (M-RoPE: an image advances this by max(grid_w, grid_h))
        self.n_cells = 0  # KV cells used (an image fills one per image token)
        self.images_encoded = 0
        self.prefilled = False
        self.prompt_text_ids: list[int] = []  # the prompt's text tokens, image chunks left out (for tests)
        # Set before prefill() to keep each image's encoder output (tokens x n_embd float32) for parity tests.
        self.capture_image_embeddings = False
        self.image_embeddings: list = []
        self.prefix_state: PrefixState | None = None  # set by prefill(keep_prefix=True) when it has images
        self.n_batch = min(512, n_ctx)
        self.text = TokenText(model.vocab())  # token ids -> the text they add

        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = self.n_batch
        cparams.n_ubatch = self.n_batch
        cparams.n_seq_max = self.n_seq
        if self.n_seq > 1:
            cparams.kv_unified = True  # one cell pool: forked chains share the prompt's cells
        cparams.n_threads = model.n_threads
        cparams.n_threads_batch = model.n_threads
        cparams.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
        LOG.clear()
        ctx = llama_cpp.llama_init_from_model(model.handles()[0], cparams)
        if not ctx:
            why = LOG.last_error() or "out of memory?"
            gpu_hint = load_failure_hint(" ".join(LOG.errors), model.gpu_layers if model.gpu_offload else 0)
            raise QvqError(
                f"llama.cpp could not create a context of {n_ctx} tokens: {why}",
                hint="lower the budgets or the image size" + (f"; or {gpu_hint}" if gpu_hint else ""),
            )
        self._ctx = ctx
        self._forked = False
        self.sampler = Sampler(sampling, model.n_vocab)
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        # Frees the handles at close(), or when the session is garbage-collected, or at exit (before the model).
        self._finalizer = weakref.finalize(self, _free_session, llama_cpp, self._batch, ctx)

    def _check_open(self) -> None:
        if self._ctx is None:
            raise RuntimeError("this session was closed")

    def _need_cells(self, n: int, what: str) -> None:
        check_room(self.n_cells, n, self.n_ctx, what)

    # -- decoding

    def decode(self, entries: list[tuple[int, int, int, bool]], on_logits: Any = None) -> int:
        """Decode ``entries`` (sequence, token, position, logits wanted) in batches of ``n_batch``; the
        cells they fill count as this session's.  ``on_logits(i, logits)`` is called right after its batch
        for each entry ``i`` that wanted logits (a float32 view of n_vocab, valid until the next decode).
        Returns the number of ``llama_decode`` calls.  The forked chains decode through this too."""
        import numpy as np

        llama_cpp, _ = libs()
        self._check_open()
        batch, calls = self._batch, 0
        for start in range(0, len(entries), self.n_batch):
            part = entries[start : start + self.n_batch]
            batch.n_tokens = len(part)
            for i, (seq, tok, pos, wanted) in enumerate(part):
                batch.token[i] = tok
                batch.pos[i] = pos
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = seq
                batch.logits[i] = 1 if wanted else 0
            rc = llama_cpp.llama_decode(self._ctx, batch)
            LOG.reraise()
            if rc != 0:
                self._decode_failed(rc, len(part))
            calls += 1
            self.n_cells += len(part)
            if on_logits is not None:
                for i, (_seq, _tok, _pos, wanted) in enumerate(part):
                    if wanted:
                        ptr = llama_cpp.llama_get_logits_ith(self._ctx, i)
                        on_logits(start + i, np.ctypeslib.as_array(ptr, shape=(self.model.n_vocab,)))
        return calls

    def _decode_tokens(self, tokens: list[int], *, logits_last: bool = True) -> None:
        """Decode ``tokens`` of sequence 0 at positions n_pos..; logits only for the very last one."""
        last = len(tokens) - 1
        self.decode([(0, tok, self.n_pos + i, logits_last and i == last) for i, tok in enumerate(tokens)])
        self.n_pos += len(tokens)

    def _decode_failed(self, rc: int, n: int) -> None:
        why = LOG.last_error()
        if rc == 1:
            raise ContextOverflow(
                f"llama.cpp found no room for {n} token(s) in a context of {self.n_ctx} ({self.n_cells} used)",
                hint="size n_ctx with context_needed() or lower the budgets",
            )
        raise QvqError(f"llama.cpp decode failed with code {rc}" + (f": {why}" if why else ""))

    # -- Session protocol

    def prefill(
        self, prompt: Prompt, *, prefix: PrefixState | None = None, keep_prefix: bool = False
    ) -> PrefillStats:
        """Tokenise the prompt with mtmd, encode each image once, and fill the KV cache.

        ``prefix``: a :class:`PrefixState` of this model for the same system prompt and images: its KV
        cells are restored (``llama_state_seq_set_data``) in place of every chunk up to and including the
        last image, and only the text after it is decoded.  A state that ends at an earlier image (a
        conversation's earlier turn; the registry's ``partial_prefix`` capability) is restored in place of
        the chunks up to that image, and the chunks after it (text and the later images) are run.
        ``keep_prefix``: after the last image chunk, copy the sequence's state (``llama_state_seq_get_data``)
        into ``self.prefix_state``.  Every path decodes each chunk after the restored ones in the same
        batches as a fresh prefill, so their logits are the same.
        """
        import numpy as np

        llama_cpp, mtmd_cpp = libs()
        self._check_open()
        if self.prefilled:
            raise RuntimeError(
                "prefill() was already called on this session; open a new session per question"
            )
        n_images = len(prompt.images)
        block, pad = self.model.family.image_block, self.model.family.image_pad
        n_blocks = prompt.text.count(block)
        if n_blocks != n_images or prompt.text.count(pad) != n_images:
            raise InputError(
                f"the prompt has {prompt.text.count(pad)} image placeholder(s) for {n_images} image(s)"
            )
        mctx = self.model.handles()[1]
        marker = mtmd_cpp.mtmd_default_marker().decode("utf-8")
        # mtmd adds <|vision_start|>/<|vision_end|> around each image itself: replace the whole block.
        text = prompt.text.replace(block, marker)

        t_start = time.perf_counter()
        bitmaps = []
        chunks = None
        try:
            for img in prompt.images:
                arr = np.ascontiguousarray(np.asarray(self._fit_to_grid(img), dtype=np.uint8))
                h, w = arr.shape[:2]
                ptr = arr.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))
                bmp = mtmd_cpp.mtmd_bitmap_init(w, h, ptr)  # copies the pixels
                if not bmp:
                    raise QvqError(f"mtmd could not take a {w}x{h} image")
                bitmaps.append(bmp)
            data = text.encode("utf-8")
            inp = mtmd_cpp.mtmd_input_text(data, len(data), False, True)
            arr_t = mtmd_cpp.mtmd_bitmap_p_ctypes * max(1, n_images)
            bmp_arr = arr_t(*bitmaps) if bitmaps else arr_t()
            chunks = mtmd_cpp.mtmd_input_chunks_init()
            rc = mtmd_cpp.mtmd_tokenize(mctx, chunks, ctypes.byref(inp), bmp_arr, n_images)
            if rc == 1:
                raise InputError("the number of images does not match the image markers in the prompt")
            if rc != 0:
                raise InputError(
                    f"mtmd could not preprocess the image(s) (code {rc})"
                    + (f": {LOG.last_error()}" if LOG.last_error() else "")
                )
            total = int(mtmd_cpp.mtmd_helper_get_n_tokens(chunks))
            self._need_cells(total, "the prompt")

            n_chunks = int(mtmd_cpp.mtmd_input_chunks_size(chunks))
            kinds = [
                mtmd_cpp.mtmd_input_chunk_get_type(mtmd_cpp.mtmd_input_chunks_get(chunks, i))
                for i in range(n_chunks)
            ]
            # the prefix: every chunk up to and including the last image (none without images)
            n_prefix = max(
                (i + 1 for i, k in enumerate(kinds) if k != mtmd_cpp.MTMD_INPUT_CHUNK_TYPE_TEXT), default=0
            )
            encode_s = 0.0
            image_tokens: list[int] = []
            text_ids: list[int] = []
            n_restored = 0
            if prefix is not None:
                # the chunks the state holds: up to its last image, the prompt's last or an earlier one
                image_chunks = [i for i, k in enumerate(kinds) if k != mtmd_cpp.MTMD_INPUT_CHUNK_TYPE_TEXT]
                held = len(prefix.meta.get("image_tokens", []))
                n_restored = image_chunks[held - 1] + 1 if 0 < held <= len(image_chunks) else n_prefix
                image_tokens = self._restore_prefix(prefix, chunks, n_restored, text_ids)
            for i in range(n_chunks):
                chunk = mtmd_cpp.mtmd_input_chunks_get(chunks, i)
                ctype = kinds[i]
                last = i == n_chunks - 1
                if i < n_restored:
                    continue  # restored above
                if keep_prefix and i == n_prefix and n_prefix:
                    self.prefix_state = self._export_prefix(text_ids, image_tokens)
                if ctype == mtmd_cpp.MTMD_INPUT_CHUNK_TYPE_TEXT:
                    n = ctypes.c_size_t(0)
                    ptr = mtmd_cpp.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                    ids = [int(ptr[j]) for j in range(n.value)]
                    text_ids.extend(ids)
                    if ids:
                        self._decode_tokens(ids, logits_last=last)
                elif ctype == mtmd_cpp.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                    n_tok = int(mtmd_cpp.mtmd_input_chunk_get_n_tokens(chunk))
                    t0 = time.perf_counter()
                    rc = mtmd_cpp.mtmd_encode_chunk(mctx, chunk)
                    LOG.reraise()
                    encode_s += time.perf_counter() - t0
                    self.images_encoded += 1
                    if rc != 0:
                        raise QvqError(f"the vision encoder failed (code {rc}): {LOG.last_error()}")
                    embd = mtmd_cpp.mtmd_get_output_embd(mctx)
                    if self.capture_image_embeddings:
                        n_embd = self.model.n_embd
                        self.image_embeddings.append(
                            np.ctypeslib.as_array(embd, shape=(n_tok * n_embd,)).reshape(n_tok, n_embd).copy()
                        )
                    new_n_past = llama_cpp.llama_pos(0)
                    rc = mtmd_cpp.mtmd_helper_decode_image_chunk(
                        mctx,
                        self._ctx,
                        chunk,
                        embd,
                        self.n_pos,
                        0,
                        self.n_batch,
                        ctypes.byref(new_n_past),
                        mtmd_cpp.mtmd_helper_post_decode_callback(),
                        None,
                    )
                    LOG.reraise()
                    if rc != 0:
                        self._decode_failed(rc, n_tok)
                    self.n_pos = int(new_n_past.value)
                    self.n_cells += n_tok
                    image_tokens.append(n_tok)
                else:
                    raise InputError("the prompt holds a media chunk this backend does not support (audio?)")
            if (
                n_chunks == 0
                or mtmd_cpp.mtmd_input_chunk_get_type(mtmd_cpp.mtmd_input_chunks_get(chunks, n_chunks - 1))
                != mtmd_cpp.MTMD_INPUT_CHUNK_TYPE_TEXT
            ):
                raise InputError("the prompt must end with text (the assistant turn's opening)")
        finally:
            if chunks is not None:
                mtmd_cpp.mtmd_input_chunks_free(chunks)
            for bmp in bitmaps:
                mtmd_cpp.mtmd_bitmap_free(bmp)
        self.prefilled = True
        self.prompt_text_ids = text_ids
        self.sampler.accept(
            text_ids
        )  # the repetition penalty sees the prompt's text tokens, as in transformers
        self._start_speculation(text_ids, prompt)
        return PrefillStats(
            prompt_tokens=self.n_cells,
            image_tokens=sum(image_tokens),
            image_encode_s=encode_s,
            prefill_s=time.perf_counter() - t_start,
            image_tokens_per_image=image_tokens,
        )

    # -- prefix state (registry capability ``prefix_state``)

    def _export_prefix(self, text_ids: list[int], image_tokens: list[int]) -> PrefixState:
        """Copy sequence 0's KV state now (just after the last image chunk)."""
        import numpy as np

        llama_cpp, _ = libs()
        size = int(llama_cpp.llama_state_seq_get_size(self._ctx, 0))
        buf = np.empty(size, dtype=np.uint8)
        got = int(
            llama_cpp.llama_state_seq_get_data(
                self._ctx, buf.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)), size, 0
            )
        )
        if got != size:
            raise QvqError(f"llama.cpp saved {got} of {size} bytes of the prefix state")
        return PrefixState(
            backend=self.backend,
            n_cells=self.n_cells,
            n_pos=self.n_pos,
            ids=list(text_ids),
            tensors={"seq_state": buf},
            meta={"image_tokens": list(image_tokens)},
        )

    def _restore_prefix(
        self, state: PrefixState, chunks: Any, n_prefix: int, text_ids: list[int]
    ) -> list[int]:
        """Check ``state`` against this prompt's first ``n_prefix`` chunks and load its KV cells.

        Fills ``text_ids`` with the prefix's text tokens; returns its image token counts.  A state that
        does not fit this prompt (other text, other image sizes, another backend) raises ``InputError``.
        """
        import numpy as np

        llama_cpp, mtmd_cpp = libs()
        image_tokens: list[int] = []
        for i in range(n_prefix):
            chunk = mtmd_cpp.mtmd_input_chunks_get(chunks, i)
            if mtmd_cpp.mtmd_input_chunk_get_type(chunk) == mtmd_cpp.MTMD_INPUT_CHUNK_TYPE_TEXT:
                n = ctypes.c_size_t(0)
                ptr = mtmd_cpp.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                text_ids.extend(int(ptr[j]) for j in range(n.value))
            else:
                image_tokens.append(int(mtmd_cpp.mtmd_input_chunk_get_n_tokens(chunk)))
        if (
            state.backend != self.backend
            or not n_prefix
            or list(state.ids) != text_ids
            or list(state.meta.get("image_tokens", [])) != image_tokens
            or state.n_cells != len(text_ids) + sum(image_tokens)
        ):
            raise InputError("the saved prefix state does not match this prompt (other text or images)")
        self._need_cells(state.n_cells, "the saved prefix")
        blob = np.ascontiguousarray(state.tensors["seq_state"], dtype=np.uint8)
        read = int(
            llama_cpp.llama_state_seq_set_data(
                self._ctx, blob.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)), blob.size, 0
            )
        )
        if read != blob.size:
            llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(self._ctx), 0, -1, -1)
            raise InputError(f"llama.cpp refused the saved prefix state (read {read} of {blob.size} bytes)")
        self.n_pos, self.n_cells = int(state.n_pos), int(state.n_cells)
        return image_tokens

    def _fit_to_grid(self, img: Any) -> Any:
        """Resize (stretch, PIL bicubic) to the patch-aligned size transformers' Qwen2-VL processor uses.

        mtmd would letterbox instead (keep the aspect ratio, pad black), which changes what the model sees
        for any image whose sides are not multiples of 28; an aligned image passes through mtmd unchanged.
        """
        from PIL import Image

        rgb = img.convert("RGB") if getattr(img, "mode", "RGB") != "RGB" else img
        w, h = rgb.size
        if w == 0 or h == 0:
            raise InputError("an image is empty (0 pixels)")
        align = self.model.patch_size * self.model.merge_size
        gw, gh = self.model.image_grid(w, h)
        if (w, h) != (gw * align, gh * align):
            rgb = rgb.resize((gw * align, gh * align), Image.Resampling.BICUBIC)
        return rgb

    # -- speculation (the registry's ``speculation`` capability)

    def _start_speculation(self, text_ids: list[int], prompt: Prompt) -> None:
        from qvq_local.backends import llama_spec
        from qvq_local.speculate.setup import off_note, start_speculation

        settings = self.speculation
        if settings is None or not settings.active:
            return
        self.speculation_note = off_note(self.model.family)
        if self.speculation_note is not None:
            return
        self.speculator = start_speculation(
            settings,
            llama_spec.LlamaTarget(self),
            row=self.last_logits(),
            history=text_ids,
            room=lambda: self.n_ctx - self.n_past,
            identity=llama_spec.identity(self.model),
            probe_token=text_ids[-1] if text_ids else 0,
            drafter=llama_spec.draft_drafter(self, prompt) if settings.uses_draft_model else None,
        )

    def speculation_target(self) -> Any:
        """This session's cache and sampler as a speculator's target (``qvq_local.speculate.engine.Target``):
        for measurements that drive a speculator themselves (``qvq bench``'s replay and cost curve)."""
        from qvq_local.backends import llama_spec

        return llama_spec.LlamaTarget(self)

    def speculation_report(self) -> dict | None:
        """What speculation did in this session (None when it was not asked for)."""
        from qvq_local.speculate.setup import session_report

        return session_report(self.speculator, self.speculation, self.speculation_note)

    def step(self, banned: TokenMask | None = None) -> Token:
        """Sample the next token from the current logits (never one of ``banned``), decode it into the
        cache, return its text."""
        llama_cpp, _ = libs()
        self._check_open()
        if not self.prefilled:
            raise RuntimeError("call prefill() before step()")
        spec = self.speculator
        if spec is not None:  # the token is drawn from the verified logits of its position
            tok = spec.sample(banned)
            if self.text.is_end(tok):
                spec.drop()  # an end of turn is not decoded: neither are the guesses after it
                return Token(id=tok, text=self.text.end(), is_eos=True)
            check_room(self.n_past, 1, self.n_ctx, "the next token")
            spec.advance(tok)
            return Token(id=tok, text=self.text.push(tok), is_eos=False)
        self.sampler.use_mask(banned)
        tok = self.sampler.sample(self._ctx)
        if self.text.is_end(tok):
            # Not decoded: nothing follows an end of turn unless the caller feeds text, which decodes itself.
            return Token(id=tok, text=self.text.end(), is_eos=True)
        self._need_cells(1, "the next token")
        self._decode_tokens([tok])
        return Token(id=tok, text=self.text.push(tok), is_eos=False)

    def feed(self, text: str) -> int:
        """Append ``text`` (no BOS, no special-token parsing) to the cache; the image is not touched."""
        llama_cpp, _ = libs()
        self._check_open()
        if not self.prefilled:
            raise RuntimeError("call prefill() before feed()")
        tokens = self.model.tokenize(text, special=False)
        if not tokens:
            return 0
        if self.speculator is not None:
            self.speculator.drop()  # unconfirmed guesses leave the cache before the forced text enters
        self._need_cells(len(tokens), "the forced text")
        self.text.reset()  # a half character left by step() is superseded by the forced text
        if self.speculator is not None:
            self.speculator.feed(tokens)
        else:
            self._decode_tokens(tokens)
        self.sampler.accept(tokens)
        return len(tokens)

    def count_tokens(self, text: str) -> int:
        return len(self.model.tokenize(text, special=False))

    def last_logits(self):
        """The logits the next step() samples from, as a float32 numpy array of n_vocab (a copy)."""
        import numpy as np

        llama_cpp, _ = libs()
        self._check_open()
        if self.speculator is not None:
            return np.array(self.speculator.next_row, dtype=np.float32, copy=True)
        ptr = llama_cpp.llama_get_logits_ith(self._ctx, -1)
        if not ptr:
            raise RuntimeError("no logits yet: call prefill() first")
        return np.ctypeslib.as_array(ptr, shape=(self.model.n_vocab,)).astype(np.float32, copy=True)

    def fork(self, n: int) -> list:
        """After prefill: ``n`` chains sharing the prompt's KV cells, decoded together in one batch
        (:mod:`qvq_local.backends.llama_chains`; the registry's ``chains`` capability).  The session must
        have been opened with ``n_seq >= n``; the prompt's cells of sequence 0 are shared with sequences
        1..n-1 (``llama_memory_seq_cp``: the cache is unified, so a copy adds a sequence id to the same
        cells), and each chain starts from a copy of the prompt's last logits."""
        llama_cpp, _ = libs()
        self._check_open()
        if not self.prefilled:
            raise RuntimeError("call prefill() before fork()")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise InputError(f"the number of chains must be a positive whole number, got {n!r}")
        if n > self.n_seq:
            raise InputError(f"this session was opened for {self.n_seq} chain(s), not {n}")
        if self._forked:
            raise RuntimeError("fork() was already called on this session")
        self._forked = True
        mem = llama_cpp.llama_get_memory(self._ctx)
        for seq in range(1, n):
            llama_cpp.llama_memory_seq_cp(mem, 0, seq, -1, -1)
        return llama_chains.start_chains(self, n, self.last_logits())

    def close(self) -> None:
        """Free the sampler, batch and context (idempotent)."""
        if self._ctx is None:
            return
        if self.draft_session is not None:
            self.draft_session.close()
        self._ctx = None
        self.sampler.close()
        self._finalizer()
