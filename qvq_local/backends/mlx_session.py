"""One question on an MLX model: the KV cache, the M-RoPE positions and the sampler (the Session protocol).

The loaded model (:mod:`qvq_local.backends.mlx`) opens an :class:`MlxSession` per question.  The session
runs the vision tower once per image, the language model over the prompt in chunks into its KV cache
(:data:`PREFILL_CHUNK`), then one token at a time; it appends forced text into the same cache, exports and
restores the image prefix's KV arrays, and forks chains that decode in one batch
(:mod:`qvq_local.backends.mlx_chains`).

M-RoPE: Qwen2-VL gives image tokens 3-D positions (time, row, column), so after an image the text
positions run behind the token count by a constant ``rope_delta`` (``max position + 1 - tokens``).
mlx-vlm's language model keeps that delta as hidden state on the model object; this session instead
computes every position explicitly (the prompt's from ``get_rope_index``, later ones as
``tokens so far + rope_delta``) and passes them in, so sessions cannot disturb each other.

Also here, because the session is what computes: :func:`import_mlx` (mlx and mlx-vlm, or the install
line) and :func:`activation_dtype` (the dtype activations and the KV cache are computed in).
"""

from __future__ import annotations

import itertools
import time
from typing import Any

from qvq_local.backends import mlx_chains, registry
from qvq_local.backends.base import PrefillStats, PrefixState, Prompt, SamplingParams, Token, TokenMask
from qvq_local.backends.mlx_sampling import Detokenizer, Sampler
from qvq_local.errors import BackendUnavailable, ContextOverflow, InputError
from qvq_local.families import DEFAULT_FAMILY, family_for_model_type

INSTALL_HINT = registry.BACKENDS["mlx"].install_hint

#: Prompt tokens run through the language model per forward call during prefill / feed.  Bounds the
#: attention scratch memory for long prompts; only the prompt's last position goes through the output head.
PREFILL_CHUNK = 512


def _split_vision(model_type: str) -> bool:
    """True when the vision tower can be run on its own and its features handed back to
    ``get_input_embeddings(cached_image_features=...)`` (the family says so: ``Family.mlx_split_vision``);
    others fall back to mlx-vlm's combined call."""
    family = family_for_model_type(model_type)
    return bool(getattr(family, "mlx_split_vision", False))


def import_mlx():
    """Import mlx and mlx-vlm, or say what to install."""
    try:
        import mlx.core as mx
        import mlx_vlm  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise BackendUnavailable(f"the MLX backend needs mlx and mlx-vlm ({exc})", hint=INSTALL_HINT) from exc
    return mx


def activation_dtype(mx: Any, lm: Any, choice: str | None) -> Any:
    """The dtype the language model's activations (and so its KV cache) are computed in; None: as loaded.

    ``"auto"``: float32 when MLX runs on the CPU and the language model is quantised with half-precision
    scales.  MLX's CPU backend has no native bfloat16/float16 arithmetic, so a 4-bit matmul fed bf16
    activations runs ~8x slower than the same matmul fed float32 (measured on the tiny checkpoint, x86,
    mlx 0.32: MLP of one layer 4.2 ms vs 0.55 ms per token); the weights stay 4-bit, only activations and
    the KV cache (2x its bf16 size) change, and float32 is the more precise of the two.  On a GPU
    (Apple Silicon) half precision is the fast path and nothing changes.  ``"float32"`` / ``"bfloat16"`` /
    ``"float16"`` force a dtype; ``None`` keeps the model's own.
    """
    if choice is None:
        return None
    if choice != "auto":
        return getattr(mx, choice)
    if mx.default_device() != mx.cpu:
        return None
    import mlx.nn as nn

    layers = getattr(lm.model, "layers", None) or []
    proj = getattr(getattr(layers[0], "mlp", None), "gate_proj", None) if layers else None
    if isinstance(proj, nn.QuantizedLinear) and proj.scales.dtype in (mx.bfloat16, mx.float16):
        return mx.float32
    return None


def _cache_kind(cache: Any) -> str:
    """``kv`` for a layer's key/value cache, ``arrays`` for a recurrent layer's (mlx-vlm's ``ArraysCache``:
    a linear-attention layer's convolution window and state)."""
    from mlx_vlm.models.cache import ArraysCache

    return "arrays" if isinstance(cache, ArraysCache) else "kv"


def _deepstack_slicer(visual_pos_masks, features):
    """``extra(start, end)`` for ``MlxSession._forward``: DeepStack features for prompt tokens start:end.

    ``visual_pos_masks`` [1, L] marks the image tokens; ``features`` holds one [n_visual, D] array per
    fed text layer, in image-token order, so each chunk gets the rows of the image tokens it holds.
    """
    seen = [0, *itertools.accumulate(bool(v) for v in visual_pos_masks[0].tolist())]

    def extra(start: int, end: int) -> dict:
        a, b = seen[start], seen[end]
        return {
            "visual_pos_masks": visual_pos_masks[:, start:end],
            "deepstack_visual_embeds": [layer[a:b] for layer in features],
        }

    return extra


class MlxSession:
    """One question on ``loaded`` (the :class:`~qvq_local.backends.mlx.MlxModel` that opened it): the KV
    cache, the positions, the sampler state (implements ``Session``).

    ``n_past`` counts tokens held in the KV cache (image tokens included).  That is what costs memory;
    M-RoPE positions run behind it after an image, so the count is the conservative one.  Guesses a
    speculator has run into the cache but not yet confirmed are not counted (``n_cached`` counts them).
    """

    backend = "mlx"

    def __init__(
        self,
        loaded: Any,
        sampling: SamplingParams,
        *,
        n_ctx: int | None = None,
        prefill_chunk: int = PREFILL_CHUNK,
        repetition_context_size: int | None = None,
        compute_dtype: str | None = "auto",
        speculation: Any = None,
    ):
        self.mx = import_mlx()
        self.speculation = speculation  # SpecSettings, or None: plain decoding
        self.speculator: Any = None  # qvq_local.speculate.engine.Speculator once prefilled
        self.speculation_note: str | None = None  # why it is off, when the settings asked for it
        self.draft_session: Any = None  # the draft model's session (--draft)
        from mlx_vlm.models import cache as vlm_cache

        self.loaded = loaded
        self._model = loaded.model
        self._lm = loaded.model.language_model
        self._tokenizer = loaded.tokenizer
        self.sampling = sampling
        self.n_ctx = int(n_ctx) if n_ctx else loaded.context_length
        self.n_cached = 0  # tokens in the KV cache (what the next position follows)
        self.images_encoded = 0
        self._chunk = max(1, int(prefill_chunk))
        self._cache = vlm_cache.make_prompt_cache(self._lm)
        self._act_dtype = activation_dtype(self.mx, self._lm, compute_dtype)
        self._rope_delta = 0
        self._logits = None  # mx.array [vocab] float32: the next token's logits
        #: the sampling state (settings, the ids the repetition penalty sees, the random key)
        self.sampler = Sampler(self.mx, sampling, repetition_context_size)
        self._detok = Detokenizer(self._tokenizer)
        self._eos = loaded.eos_token_ids
        self._forked = False
        self._prefilled = False
        self.prefix_state: PrefixState | None = None  # set by prefill(keep_prefix=True) when it has images

    # -- context bookkeeping -------------------------------------------------------------------------

    @property
    def n_past(self) -> int:
        return self.n_cached - (len(self.speculator.pending) if self.speculator is not None else 0)

    def _check_room(self, extra: int, what: str) -> None:
        if self.n_past + extra > self.n_ctx:
            raise ContextOverflow(
                f"{what} needs {self.n_past + extra} tokens but the context holds {self.n_ctx}",
                hint="lower --max-pixels to shrink the image, shorten the question or use a smaller budget",
            )

    # -- the language model --------------------------------------------------------------------------

    def _head(self, hidden):
        lm = self._lm
        if getattr(lm.args, "tie_word_embeddings", False) or not hasattr(lm, "lm_head"):
            return lm.model.embed_tokens.as_linear(hidden)
        return lm.lm_head(hidden)

    def _text_positions(self, n: int):
        """M-RoPE positions for ``n`` text tokens appended after the cache: all three axes equal."""
        mx = self.mx
        start = self.n_cached + self._rope_delta
        pos = mx.arange(start, start + n, dtype=mx.int32).reshape(1, 1, n)
        return mx.broadcast_to(pos, (3, 1, n))

    def _forward(self, embeds, positions, extra=None, offset: int = 0):
        """Run ``embeds`` [1, L, D] at ``positions`` [3, 1, L] through the LM; keep the cache.

        ``extra``: for a family whose vision tower also feeds the first text layers (Qwen3-VL's
        DeepStack), ``extra(start, end)`` gives the keyword arguments for the prompt's tokens
        ``start:end`` (``_deepstack_slicer``); ``offset`` is where ``embeds`` starts in that prompt.

        All positions but the last go through in chunks whose output is thrown away: only their keys
        and values (the cache state) are evaluated, so the last layer's attention output and MLP for
        those positions are never computed (MLX is lazy).  The last position runs on its own and alone
        goes through the output head.  Returns its logits as float32 [vocab], not yet evaluated.
        """
        mx = self.mx
        embeds = self._as_act(embeds)
        length = embeds.shape[1]
        self._fill(embeds[:, : length - 1], positions[:, :, : length - 1], extra, offset)
        hidden = self._lm.model(
            None,
            inputs_embeds=embeds[:, length - 1 :],
            cache=self._cache,
            position_ids=positions[:, :, length - 1 :],
            **(extra(offset + length - 1, offset + length) if extra else {}),
        )
        self.n_cached += 1
        return self._head(hidden)[0, -1].astype(mx.float32)

    def _as_act(self, embeds):
        if self._act_dtype is not None and embeds.dtype != self._act_dtype:
            embeds = embeds.astype(self._act_dtype)
        return embeds

    def _fill(self, embeds, positions, extra=None, offset: int = 0) -> None:
        """Run ``embeds`` through the LM into the cache only (chunks of ``self._chunk``; no output head)."""
        mx = self.mx
        embeds = self._as_act(embeds)
        length = embeds.shape[1]
        for start in range(0, length, self._chunk):
            end = min(start + self._chunk, length)
            self._lm.model(
                None,
                inputs_embeds=embeds[:, start:end],
                cache=self._cache,
                position_ids=positions[:, :, start:end],
                **(extra(offset + start, offset + end) if extra else {}),
            )
            mx.eval([c.state for c in self._cache])
        self.n_cached += length

    def _embed_ids(self, ids: list[int]):
        mx = self.mx
        return self._lm.model.embed_tokens(mx.array([ids], dtype=mx.int32))

    # -- Session protocol ------------------------------------------------------------------------------

    def prefill(
        self, prompt: Prompt, *, prefix: PrefixState | None = None, keep_prefix: bool = False
    ) -> PrefillStats:
        """Encode the images once, run the whole prompt into the KV cache, keep the last logits.

        The prompt runs in two parts: its prefix (every token up to and including the last image token)
        and the rest.  ``keep_prefix``: copy the KV arrays after the prefix into ``self.prefix_state``.
        ``prefix``: a :class:`PrefixState` of this model for the same system prompt and images: its
        arrays become the cache and only the rest is run (no vision tower).  Both paths run the rest the
        same way, so their logits are the same.
        """
        from mlx_vlm.utils import prepare_inputs

        mx = self.mx
        if self._prefilled:
            raise RuntimeError("prefill() called twice on one session; open a new session per question")
        if prompt.clip is not None:
            return self._prefill_clip(prompt, prefix, keep_prefix)
        images = list(prompt.images or [])
        pad = self.loaded.family.image_pad
        if prompt.text.count(pad) != len(images):
            raise ValueError(f"prompt has {prompt.text.count(pad)} image blocks for {len(images)} images")
        t_start = time.perf_counter()
        inputs = prepare_inputs(
            self.loaded.processor, images=images or None, prompts=prompt.text, add_special_tokens=False
        )
        input_ids = inputs["input_ids"]
        if input_ids.ndim == 1:
            input_ids = input_ids[None]
        ids = input_ids[0].tolist()
        image_token_id = int(self._model.config.image_token_id)
        per_image: list[int] = []
        grid = inputs.get("image_grid_thw")
        if images and grid is not None:
            merge = int(
                getattr(self._model.config.vision_config, "spatial_merge_size", DEFAULT_FAMILY.merge_size)
            )
            per_image = [int(t * h * w) // (merge * merge) for t, h, w in grid.tolist()]
        image_tokens = sum(1 for i in ids if i == image_token_id)
        self._check_room(len(ids), "the prompt (text and image tokens)")
        n_prefix = max((i + 1 for i, t in enumerate(ids) if t == image_token_id), default=0)
        if prefix is not None:
            self._run_after_prefix(prefix, ids, n_prefix)
            self._start_speculation(ids, prompt)
            return PrefillStats(
                prompt_tokens=len(ids),
                image_tokens=image_tokens,
                image_encode_s=0.0,
                prefill_s=time.perf_counter() - t_start,
                image_tokens_per_image=per_image,
            )

        image_encode_s = 0.0
        pixel_values = inputs.get("pixel_values")
        extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "pixel_values", "attention_mask")}
        if images and pixel_values is not None:
            model_type = getattr(self._model.config, "model_type", "")
            if _split_vision(model_type) and hasattr(self._model, "vision_tower"):
                tower = self._model.vision_tower
                t0 = time.perf_counter()
                features = tower(
                    pixel_values.astype(tower.patch_embed.proj.weight.dtype), grid, output_hidden_states=False
                )
                mx.eval(features)
                image_encode_s = time.perf_counter() - t0
                extra["cached_image_features"] = features
                emb = self._model.get_input_embeddings(input_ids, pixel_values, **extra)
            else:
                t0 = time.perf_counter()
                emb = self._model.get_input_embeddings(input_ids, pixel_values, **extra)
                mx.eval(emb.inputs_embeds)
                image_encode_s = time.perf_counter() - t0
            self.images_encoded += len(images)
        else:
            emb = self._model.get_input_embeddings(input_ids, None, **extra)

        embeds = emb.inputs_embeds
        positions = emb.position_ids
        if positions is None:
            positions = mx.arange(len(ids), dtype=mx.int32).reshape(1, -1)
        if positions.ndim == 2:
            positions = mx.broadcast_to(positions[None], (3, *positions.shape))
        deltas = getattr(emb, "rope_deltas", None)
        self._rope_delta = int(mx.array(deltas).reshape(-1)[0].item()) if deltas is not None else 0

        features = getattr(emb, "deepstack_visual_embeds", None)
        extra = _deepstack_slicer(emb.visual_pos_masks, features) if features is not None else None
        self._run_prompt(ids, embeds, positions, extra, n_prefix, keep_prefix)
        self._start_speculation(ids, prompt)
        return PrefillStats(
            prompt_tokens=len(ids),
            image_tokens=image_tokens,
            image_encode_s=image_encode_s,
            prefill_s=time.perf_counter() - t_start,
            image_tokens_per_image=per_image,
        )

    def _run_prompt(self, ids, embeds, positions, extra, n_prefix: int, keep_prefix: bool) -> None:
        """Run a prompt's embeddings into the cache: its prefix (through the last vision token) into the
        cache only, kept as ``prefix_state`` when asked, then the rest, whose last logits are kept."""
        mx = self.mx
        if n_prefix:
            self._fill(embeds[:, :n_prefix], positions[:, :, :n_prefix], extra)
            if keep_prefix:
                self.prefix_state = self._export_prefix(ids[:n_prefix])
        self._logits = self._forward(embeds[:, n_prefix:], positions[:, :, n_prefix:], extra, offset=n_prefix)
        mx.eval(self._logits)
        self.sampler.accept(ids)
        self._prefilled = True

    def _run_after_prefix(self, prefix: PrefixState, ids: list[int], n_prefix: int) -> None:
        """Restore ``prefix`` as the cache and run only the rest of the prompt (text, positioned after the
        prefix's vision tokens by its rope delta)."""
        mx = self.mx
        self._restore_prefix(prefix, ids, n_prefix)
        rest = ids[n_prefix:]
        start = n_prefix + self._rope_delta
        positions = mx.broadcast_to(
            mx.arange(start, start + len(rest), dtype=mx.int32).reshape(1, 1, -1), (3, 1, len(rest))
        )
        self._logits = self._forward(self._embed_ids(rest), positions)
        mx.eval(self._logits)
        self.sampler.accept(ids)
        self._prefilled = True

    def _prefill_clip(self, prompt: Prompt, prefix: PrefixState | None, keep_prefix: bool) -> PrefillStats:
        """:meth:`prefill` for a prompt with a clip (the registry's ``video_input``): its frames through
        the vision tower as video patches, written out and positioned as its family says
        (:mod:`qvq_local.backends.mlx_video`); the prefix ends with the clip's last video token."""
        from qvq_local.backends import mlx_video

        if prompt.images:
            raise ValueError("a prompt with a clip carries no images")
        t_start = time.perf_counter()
        image_processor = getattr(self.loaded.processor, "image_processor", None)
        family = self.loaded.family
        prepared = mlx_video.prepare_clip(
            self._model,
            lambda text: self._tokenizer.encode(text, add_special_tokens=False),
            prompt.text,
            prompt.clip,
            family=family,
            config=self.loaded.config,
            image_mean=tuple(getattr(image_processor, "image_mean", None) or family.image_mean),
            image_std=tuple(getattr(image_processor, "image_std", None) or family.image_std),
            vision=prefix is None,
        )
        ids = prepared.ids
        self._check_room(len(ids), "the prompt (text and video tokens)")
        video_token = mlx_video.token_id(self.loaded.config, "video_token_id")
        n_prefix = max(i + 1 for i, t in enumerate(ids) if t == video_token)
        stats = {"prompt_tokens": len(ids), "image_tokens": prepared.video_tokens}
        if prefix is not None:
            self._run_after_prefix(prefix, ids, n_prefix)
            self._start_speculation(ids, prompt)
            return PrefillStats(
                **stats,
                image_encode_s=0.0,
                prefill_s=time.perf_counter() - t_start,
                image_tokens_per_image=[prepared.video_tokens],
            )
        self.images_encoded += 1
        self._rope_delta = prepared.rope_delta
        extra = None
        if prepared.deepstack is not None:
            extra = _deepstack_slicer(prepared.visual_pos_masks, prepared.deepstack)
        self._run_prompt(ids, prepared.embeds, prepared.positions, extra, n_prefix, keep_prefix)
        self._start_speculation(ids, prompt)
        return PrefillStats(
            **stats,
            image_encode_s=prepared.encode_s,
            prefill_s=time.perf_counter() - t_start,
            image_tokens_per_image=[prepared.video_tokens],
        )

    # -- prefix state (registry capability ``prefix_state``) --------------------------------------------

    def _export_prefix(self, prefix_ids: list[int]) -> PrefixState:
        """The cache's arrays now (just after the prefix), as numpy; bf16 kept as its bits.  A KV cache
        gives its keys and values (``<layer>.keys``, ``<layer>.values``); a recurrent layer's cache (a
        linear-attention layer's convolution window and state, which cannot be cut back to a shorter
        prefix) gives its arrays as they are (``<layer>.state<j>``)."""
        import numpy as np

        mx = self.mx
        tensors: dict = {}
        dtypes: dict = {}
        kinds = [_cache_kind(c) for c in self._cache]
        for i, (c, kind) in enumerate(zip(self._cache, kinds)):
            if kind == "kv":
                keys, values = c.state
                named = [(f"{i}.keys", keys), (f"{i}.values", values)]
            else:
                named = [(f"{i}.state{j}", arr) for j, arr in enumerate(c.state) if arr is not None]
            for name, arr in named:
                dtypes[name] = str(arr.dtype).rsplit(".", 1)[-1]
                if arr.dtype == mx.bfloat16:
                    arr = arr.view(mx.uint16)
                tensors[name] = np.array(arr, copy=True)
        return PrefixState(
            backend=self.backend,
            n_cells=len(prefix_ids),
            n_pos=len(prefix_ids) + self._rope_delta,
            ids=list(prefix_ids),
            tensors=tensors,
            meta={
                "rope_delta": self._rope_delta,
                "dtypes": dtypes,
                "layers": len(self._cache),
                "kinds": kinds,
            },
        )

    def _restore_prefix(self, state: PrefixState, ids: list[int], n_prefix: int) -> None:
        """Check ``state`` against this prompt's first ``n_prefix`` ids and make its arrays the cache.

        A state that does not fit (other text, other image sizes, another model's shapes or layer kinds)
        raises ``InputError``.
        """
        mx = self.mx
        meta = state.meta or {}
        kinds = [_cache_kind(c) for c in self._cache]
        if (
            state.backend != self.backend
            or not n_prefix
            or list(state.ids) != ids[:n_prefix]
            or meta.get("layers") != len(self._cache)
            or list(meta.get("kinds") or ["kv"] * len(self._cache)) != kinds
        ):
            raise InputError("the saved prefix state does not match this prompt (other text or images)")
        dtypes = meta.get("dtypes") or {}

        def array(name: str, ok) -> Any:
            arr = state.tensors.get(name)
            if arr is None or not ok(arr):
                raise InputError(f"the saved prefix state has no usable {name} array")
            out = mx.array(arr)
            return out.view(mx.bfloat16) if dtypes.get(name) == "bfloat16" else out

        restored = []
        for i, (c, kind) in enumerate(zip(self._cache, kinds)):
            if kind == "kv":
                kv = lambda a: a.ndim == 4 and a.shape[2] == n_prefix  # noqa: E731
                restored.append((array(f"{i}.keys", kv), array(f"{i}.values", kv)))
            else:
                one_row = lambda a: a.ndim >= 2 and a.shape[0] == 1  # noqa: E731
                restored.append([array(f"{i}.state{j}", one_row) for j in range(len(c.state))])
        for c, arrays in zip(self._cache, restored):
            c.state = arrays
        self._rope_delta = int(meta.get("rope_delta", 0))
        self.n_cached = n_prefix

    def _require_prefill(self) -> None:
        if not self._prefilled:
            raise RuntimeError("call prefill() before step() or feed()")

    # -- speculation (the registry's ``speculation`` capability) -------------------------------------

    def _start_speculation(self, ids: list[int], prompt: Prompt) -> None:
        from qvq_local.backends import mlx_spec
        from qvq_local.speculate.setup import off_note, start_speculation

        settings = self.speculation
        if settings is None or not settings.active:
            return
        self.speculation_note = off_note(self.loaded.family)
        if self.speculation_note is not None:
            return
        config = self._model.config
        pads = {
            int(t) for t in (config.image_token_id, getattr(config, "video_token_id", None)) if t is not None
        }
        text_ids = [t for t in ids if t not in pads]  # the drafter reads text, not image or video pads
        self.speculator = start_speculation(
            settings,
            mlx_spec.MlxTarget(self),
            row=self._logits,
            history=text_ids,
            room=lambda: self.n_ctx - self.n_past,
            identity=mlx_spec.identity(self.loaded, self),
            probe_token=ids[-1],
            drafter=mlx_spec.draft_drafter(self, prompt) if settings.uses_draft_model else None,
        )

    def speculation_target(self) -> Any:
        """This session's cache and sampler as a speculator's target (``qvq_local.speculate.engine.Target``):
        for measurements that drive a speculator themselves (``qvq bench``'s replay and cost curve)."""
        from qvq_local.backends import mlx_spec

        return mlx_spec.MlxTarget(self)

    def speculation_report(self) -> dict | None:
        """What speculation did in this session (None when it was not asked for)."""
        from qvq_local.speculate.setup import session_report

        return session_report(self.speculator, self.speculation, self.speculation_note)

    @property
    def compute_dtype(self) -> Any:
        """The activations' dtype (None: the model's own)."""
        return self._act_dtype

    def run_tokens(self, ids: list[int]):
        """Run ``ids`` through the language model after the cache in one call; the hidden states of
        every position (not evaluated)."""
        hidden = self._lm.model(
            None,
            inputs_embeds=self._as_act(self._embed_ids(ids)),
            cache=self._cache,
            position_ids=self._text_positions(len(ids)),
        )
        self.n_cached += len(ids)
        return hidden

    def head(self, hidden):
        """The output head over hidden states (logits, not evaluated)."""
        return self._head(hidden)

    def forward_last(self, ids: list[int]):
        """Run ``ids`` into the cache as fed text is run (chunks, last position alone); its logits,
        evaluated."""
        logits = self._forward(self._embed_ids(ids), self._text_positions(len(ids)))
        self.mx.eval(logits)
        return logits

    def trim(self, n: int) -> None:
        """Remove the cache's last ``n`` tokens (every layer's)."""
        for c in self._cache:
            if c.trim(n) != n:
                raise RuntimeError("the KV cache could not be cut back (a layer that cannot roll back)")
        self.n_cached -= n

    def step(self, banned: TokenMask | None = None) -> Token:
        """Sample one token (never one of ``banned``), run it into the cache (next logits computed
        ahead), return its text."""
        mx = self.mx
        self._require_prefill()
        self._check_room(1, "generation")
        spec = self.speculator
        if spec is not None:  # the token is drawn from the verified logits of its position
            token_id = spec.sample(banned)
            if token_id in self._eos:
                spec.advance(token_id, draft=False)  # run into the cache, as a plain step does
                return Token(id=token_id, text=self._detok.flush(), is_eos=True)
            spec.advance(token_id)
            return Token(id=token_id, text=self._detok.push(token_id), is_eos=False)
        token = self.sampler.sample(self._logits, banned)
        # Two separate evaluations, so that ``token.item()`` waits for the sampler only: the forward
        # pass of this token then runs while the caller handles its text and builds the next step
        # (one async_eval of the whole graph would make item() wait for the forward pass too).
        mx.async_eval(token)
        embeds = self._lm.model.embed_tokens(token.reshape(1, 1).astype(mx.int32))
        next_logits = self._forward(embeds, self._text_positions(1))
        mx.async_eval(next_logits)
        token_id = int(token.item())
        self._logits = next_logits
        self.sampler.accept([token_id])
        if token_id in self._eos:
            return Token(id=token_id, text=self._detok.flush(), is_eos=True)
        return Token(id=token_id, text=self._detok.push(token_id), is_eos=False)

    def feed(self, text: str) -> int:
        """Append plain ``text`` to the cache (no image work); the next ``step`` continues after it."""
        self._require_prefill()
        ids = self._encode(text)
        if not ids:
            return 0
        if self.speculator is not None:
            self.speculator.drop()  # unconfirmed guesses leave the cache before the forced text enters
        self._check_room(len(ids), "the forced text")
        # ids held for an unfinished character cannot be completed any more: the fed text follows them
        self._detok.drop()
        if self.speculator is not None:
            self.speculator.feed(ids)
        else:
            self._logits = self.forward_last(ids)
        self.sampler.accept(ids)
        return len(ids)

    def _encode(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=False))

    def count_tokens(self, text: str) -> int:
        return len(self._encode(text))

    def last_logits(self):
        """The raw logits (before any sampling processor) the next ``step`` samples from, numpy float32."""
        import numpy as np

        self._require_prefill()
        if self.speculator is not None:
            return np.array(self.speculator.next_row, dtype=np.float32, copy=True)
        return np.array(self._logits, dtype=np.float32, copy=True)

    # -- chains (the registry's ``chains`` capability) -----------------------------------------------------

    @property
    def next_position(self) -> int:
        """The M-RoPE position the next text token takes (tokens so far + the image's rope delta)."""
        return self.n_cached + self._rope_delta

    @property
    def logits(self):
        """The raw logits (mx.array [vocab], float32) the next ``step`` samples from."""
        return self._logits

    def fork(self, n: int) -> list:
        """After prefill: ``n`` chains.  Decoded as one batch over a batched copy of this KV cache
        (:mod:`qvq_local.backends.mlx_chains`): the cache is repeated along its batch axis, one row per
        chain, so the image is encoded and the prompt prefilled once.  A model with a recurrent state
        (``Family.recurrent_state``) gets one session per chain instead, each with its own copy of the
        cache (:meth:`_copy`): mlx-vlm's hybrid models build their own masks, so padded rows of a batch
        would run through the recurrent state."""
        mx = self.mx
        self._require_prefill()
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise InputError(f"the number of chains must be a positive whole number, got {n!r}")
        if self._forked:
            raise RuntimeError("fork() was already called on this session")
        self._forked = True
        if self.loaded.family.recurrent_state:
            share = (self.n_ctx - self.n_past) // n
            seed = int(self.sampling.seed or 0)
            return [self._copy(seed + i, self.n_past + share) for i in range(n)]
        for c in self._cache:
            keys, values = c.state
            c.keys = mx.repeat(keys, n, axis=0)
            c.values = mx.repeat(values, n, axis=0)
        mx.eval([c.state for c in self._cache])
        return mlx_chains.start_chains(self, n)

    def _copy(self, seed: int, n_ctx: int) -> MlxSession:
        """A session continuing from this one's state with its own copy of every cache array (a recurrent
        state included), its own sampler (this one's history, seeded ``seed``) and ``n_ctx`` cells."""
        from dataclasses import replace

        mx = self.mx
        other = MlxSession.__new__(MlxSession)
        other.__dict__.update(self.__dict__)
        other.sampling = replace(self.sampling, seed=seed)
        other.sampler = self.sampler.fork(seed)
        other.n_ctx = n_ctx
        other.images_encoded = 0  # the image was encoded once, by this session
        other._detok = Detokenizer(self._tokenizer)
        other._forked = True  # a chain does not fork again
        other.prefix_state = None
        from mlx_vlm.models import cache as vlm_cache

        other._cache = vlm_cache.make_prompt_cache(self._lm)
        for mine, theirs in zip(self._cache, other._cache):
            arrays = mine.state
            theirs.state = type(arrays)(None if a is None else mx.array(a) for a in arrays)
        mx.eval([c.state for c in other._cache])
        return other

    def forward_rows(self, tokens: Any, positions: Any, mask: Any, last: Any):
        """One forward pass of a batch of chains over the repeated cache: ``tokens`` and ``positions``
        int32 ``[n, L]`` (numpy), ``mask`` the additive attention mask ``[n, 1, L, cells]`` (float32
        numpy), ``last`` each row's last real token; returns each row's next-token logits, float32
        ``[n, vocab]`` (evaluated)."""
        mx = self.mx
        n, width = tokens.shape
        embeds = self._lm.model.embed_tokens(mx.array(tokens))
        mask_mx = mx.array(mask)
        if self._act_dtype is not None:
            embeds = embeds.astype(self._act_dtype)
            mask_mx = mask_mx.astype(self._act_dtype)
        pos = mx.array(positions).reshape(1, n, width)
        hidden = self._lm.model(
            None,
            inputs_embeds=embeds,
            cache=self._cache,
            position_ids=mx.broadcast_to(pos, (3, n, width)),
            mask=mask_mx,
        )
        picked = hidden[mx.arange(n), mx.array(last)]  # each row's last real token
        logits = self._head(picked[:, None, :])[:, -1].astype(mx.float32)
        mx.eval(logits)
        return logits

    def close(self) -> None:
        if self.draft_session is not None:
            self.draft_session.close()
            self.draft_session = None
        self._cache = None
        self._logits = None
        self.mx.clear_cache()
