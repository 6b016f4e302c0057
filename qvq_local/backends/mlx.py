"""MLX backend: mlx-vlm's Qwen2-VL model driven by this project's own token loop.

Why not ``mlx_vlm.generate``: the reasoning controller needs three things mlx-vlm's generator does not
give together: one token at a time with its exact text, forced text appended into the *same* KV cache
(the image must never be encoded twice), and the logits after that forced text.  So this module uses
mlx-vlm only for what it is good at (loading weights, preprocessing images, the vision tower, the
language model and its KV cache) and runs a small mlx-lm style loop itself.

M-RoPE: Qwen2-VL gives image tokens 3-D positions (time, row, column), so after an image the text
positions run behind the token count by a constant ``rope_delta`` (``max position + 1 - tokens``).
mlx-vlm's language model keeps that delta as hidden state on the model object; this session instead
computes every position explicitly (the prompt's from ``get_rope_index``, later ones as
``tokens so far + rope_delta``) and passes them in, so sessions cannot disturb each other.

Mechanism only: nothing here knows about thoughts, answers or budgets.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import time
from pathlib import Path
from typing import Any

from qvq_local.backends import mlx_chains, registry
from qvq_local.backends.base import PrefillStats, PrefixState, Prompt, SamplingParams, Token, TokenMask
from qvq_local.backends.mlx_sampling import Detokenizer, Sampler
from qvq_local.errors import BackendUnavailable, ContextOverflow, InputError, ModelError
from qvq_local.families import DEFAULT_FAMILY, family_for_model_type
from qvq_local.prompt import load_chat_template

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


def _import_mlx():
    """Import mlx and mlx-vlm, or say what to install."""
    try:
        import mlx.core as mx
        import mlx_vlm  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise BackendUnavailable(f"the MLX backend needs mlx and mlx-vlm ({exc})", hint=INSTALL_HINT) from exc
    return mx


@contextlib.contextmanager
def _hub_offline():
    """Keep mlx-vlm/transformers from looking up optional files on the hub for a local folder."""
    previous = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = previous


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"cannot read: {exc}", path=path) from exc
    return data if isinstance(data, dict) else {}


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    return [int(value)]


def describe_quantization(config: dict, weight_dtype: str) -> str:
    """``"4bit-g64"`` for an mlx-quantised folder, else the weights' dtype (``"bf16"``, ``"f32"``...)."""
    quant = config.get("quantization") or config.get("quantization_config")
    if isinstance(quant, dict) and quant.get("bits"):
        text = f"{int(quant['bits'])}bit"
        if quant.get("group_size"):
            text += f"-g{int(quant['group_size'])}"
        mode = quant.get("mode")
        if mode and mode != "affine":
            text += f"-{mode}"
        return text
    return weight_dtype


_DTYPE_NAMES = {"bfloat16": "bf16", "float16": "f16", "float32": "f32"}


class MlxModel:
    """A Qwen2-VL family model loaded by mlx-vlm (implements ``LoadedModel``)."""

    backend = "mlx"

    def __init__(self, model: Any, processor: Any, model_dir: Path, config: dict, name: str):
        self.model = model
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.model_dir = model_dir
        self.config = config
        self.name = name
        self.generation_config = _read_json(model_dir / "generation_config.json")
        #: The registered family of the model (its resize rule and sampling fallback).
        self.family = family_for_model_type(config.get("model_type")) or DEFAULT_FAMILY
        self.chat_template = load_chat_template(model_dir)
        text_config = config.get("text_config") or {}
        self.context_length = int(
            config.get("max_position_embeddings") or text_config.get("max_position_embeddings") or 32768
        )
        weight = self.model.language_model.model.embed_tokens.weight
        dtype_name = str(weight.dtype).rsplit(".", 1)[-1]
        if "quantization" in config:
            # quantised embeddings store packed uint32; the compute dtype is that of the scales
            scales = getattr(self.model.language_model.model.embed_tokens, "scales", None)
            if scales is not None:
                dtype_name = str(scales.dtype).rsplit(".", 1)[-1]
        self.quantization = describe_quantization(config, _DTYPE_NAMES.get(dtype_name, dtype_name))
        self.eos_token_ids = self._eos_ids()

    def _eos_ids(self) -> frozenset[int]:
        ids = set(_as_id_list(self.generation_config.get("eos_token_id")))
        ids.update(_as_id_list(self.config.get("eos_token_id")))
        tok = self.tokenizer
        if getattr(tok, "eos_token_id", None) is not None:
            ids.add(int(tok.eos_token_id))
        im_end = tok.convert_tokens_to_ids("<|im_end|>")
        if isinstance(im_end, int) and im_end != getattr(tok, "unk_token_id", None):
            ids.add(im_end)
        return frozenset(ids)

    def image_token_estimate(self, width: int, height: int) -> int:
        """Image tokens (after the 2x2 merge) the model will see for a ``width`` x ``height`` image."""
        image_processor = getattr(self.processor, "image_processor", None)
        counter = getattr(image_processor, "num_image_tokens", None)
        if counter is not None:
            return int(counter(int(height), int(width)))
        # the family's resize rule (rounding only: images arrive bounded), for processors that cannot count
        family = self.family
        return family.image_tokens(*family.smart_resize(int(width), int(height)))

    def tokenize(self, text: str, *, special: bool = True) -> list[int]:
        """Token ids of ``text`` with no BOS (the registry's ``tokenizer`` capability); ``special``:
        ``<|...|>`` control tokens are parsed as such (False: spelt out as text)."""
        if special:
            return list(self.tokenizer.encode(text, add_special_tokens=False))
        return list(self.tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True))

    def prefix_identity(self) -> dict:
        """What a saved prefix state of this model must match besides its folder (the registry's
        ``prefix_state`` capability): how sessions compute (float32 activations on CPU, or as loaded)."""
        return {"files": [], "compute": self.compute_note, "gpu": None}

    @property
    def compute_note(self) -> str | None:
        """How sessions compute when it differs from the weights' own dtype (``qvq bench`` reports it)."""
        import mlx.core as mx

        if _activation_dtype(mx, self.model.language_model, "auto") is None:
            return None
        return "float32 activations on CPU (MLX's CPU backend has no fast bf16/f16 arithmetic)"

    def token_pieces(self) -> list[bytes]:
        """The bytes of every token id (special tokens: ``b""``), from the byte-level vocabulary."""
        from qvq_local.formats.byte_level import byte_level_to_bytes

        tok = self.tokenizer
        special = {int(i) for i in getattr(tok, "all_special_ids", [])}
        special |= {int(i) for i in (getattr(tok, "added_tokens_decoder", None) or {})}
        tokens = tok.convert_ids_to_tokens(list(range(len(tok))))
        return [b"" if i in special or t is None else byte_level_to_bytes(t) for i, t in enumerate(tokens)]

    def new_session(
        self, sampling: SamplingParams, *, n_ctx: int | None = None, n_seq: int = 1
    ) -> MlxSession:
        """``n_seq`` > 1: the session will be forked into that many chains (:meth:`MlxSession.fork`);
        ``n_ctx`` then counts the tokens of all of them (the prompt once)."""
        return MlxSession(self, sampling.resolved(self.generation_config, self.family.sampling), n_ctx=n_ctx)

    def close(self) -> None:
        mx = _import_mlx()
        self.model = None
        self.processor = None
        mx.clear_cache()


def open_model(resolved: Any, options: Any) -> MlxModel:
    """The registry's ``open_model`` for this backend: a resolved MLX or Hugging Face folder
    (``qvq_local.models``); the backend takes no load options (``options`` is the empty base type)."""
    return load(resolved.path, name=resolved.name)


def load(model_dir: str | Path, *, name: str | None = None) -> MlxModel:
    """Load an MLX (or plain Hugging Face) Qwen2-VL folder with mlx-vlm."""
    folder = Path(model_dir).expanduser()
    if not folder.is_dir():
        raise ModelError("not a model folder (expected an MLX or Hugging Face model directory)", path=folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ModelError("no config.json: not an MLX or Hugging Face model folder", path=folder)
    config = _read_json(config_path)
    _import_mlx()
    _preflight(folder)
    from mlx_vlm import load as vlm_load

    try:
        with _hub_offline():
            model, processor = vlm_load(str(folder))
    except (BackendUnavailable, ModelError):
        raise
    except Exception as exc:  # mlx-vlm raises ValueError/KeyError/FileNotFoundError/... for bad folders
        detail = " ".join(str(exc).split())
        detail = detail if len(detail) <= 240 else detail[:240] + "..."
        raise ModelError(
            f"mlx-vlm cannot load this model: {type(exc).__name__}: {detail}", path=folder
        ) from exc
    lm = getattr(model, "language_model", None)
    if lm is None or not hasattr(lm, "model") or not hasattr(model, "get_input_embeddings"):
        raise ModelError(
            f"unsupported architecture {config.get('model_type')!r} (qvq-local runs Qwen2-VL models)",
            path=folder,
        )
    return MlxModel(model, processor, folder, config, name or folder.name)


def _preflight(folder: Path) -> None:
    """Header-level checks before mlx-vlm sees the folder (architecture, every shard present, headers
    matching file sizes, manifest sizes), so a half-finished download is named in one line rather than
    surfacing as mlx-vlm's list of missing parameters.  Reads headers only; costs milliseconds."""
    from qvq_local.integrity import check_model

    if not any(
        p.suffix in (".safetensors", ".bin", ".pt", ".pth") or p.name.endswith(".index.json")
        for p in folder.iterdir()
    ):
        return  # no weights at all: mlx-vlm's own error says so
    for finding in check_model(folder):
        if finding.level == "error":
            raise ModelError(finding.message, path=finding.path)


def _activation_dtype(mx: Any, lm: Any, choice: str | None) -> Any:
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
    """One question: the KV cache, the positions, the sampler state (implements ``Session``).

    ``n_past`` counts tokens held in the KV cache (image tokens included).  That is what costs memory;
    M-RoPE positions run behind it after an image, so the count is the conservative one.
    """

    backend = "mlx"

    def __init__(
        self,
        loaded: MlxModel,
        sampling: SamplingParams,
        *,
        n_ctx: int | None = None,
        prefill_chunk: int = PREFILL_CHUNK,
        repetition_context_size: int | None = None,
        compute_dtype: str | None = "auto",
    ):
        self.mx = _import_mlx()
        from mlx_vlm.models import cache as vlm_cache

        self.loaded = loaded
        self._model = loaded.model
        self._lm = loaded.model.language_model
        self._tokenizer = loaded.tokenizer
        self.sampling = sampling
        self.n_ctx = int(n_ctx) if n_ctx else loaded.context_length
        self.n_past = 0
        self.images_encoded = 0
        self._chunk = max(1, int(prefill_chunk))
        self._cache = vlm_cache.make_prompt_cache(self._lm)
        self._act_dtype = _activation_dtype(self.mx, self._lm, compute_dtype)
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
        start = self.n_past + self._rope_delta
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
        self.n_past += 1
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
        self.n_past += length

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
        if n_prefix:
            self._fill(embeds[:, :n_prefix], positions[:, :, :n_prefix], extra)
            if keep_prefix:
                self.prefix_state = self._export_prefix(ids[:n_prefix])
        self._logits = self._forward(embeds[:, n_prefix:], positions[:, :, n_prefix:], extra, offset=n_prefix)
        mx.eval(self._logits)
        self.sampler.accept(ids)
        self._prefilled = True
        return PrefillStats(
            prompt_tokens=len(ids),
            image_tokens=image_tokens,
            image_encode_s=image_encode_s,
            prefill_s=time.perf_counter() - t_start,
            image_tokens_per_image=per_image,
        )

    # -- prefix state (registry capability ``prefix_state``) --------------------------------------------

    def _export_prefix(self, prefix_ids: list[int]) -> PrefixState:
        """The cache's key/value arrays now (just after the prefix), as numpy; bf16 kept as its bits."""
        import numpy as np

        mx = self.mx
        tensors: dict = {}
        dtypes: dict = {}
        for i, c in enumerate(self._cache):
            keys, values = c.state
            for name, arr in ((f"{i}.keys", keys), (f"{i}.values", values)):
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
            meta={"rope_delta": self._rope_delta, "dtypes": dtypes, "layers": len(self._cache)},
        )

    def _restore_prefix(self, state: PrefixState, ids: list[int], n_prefix: int) -> None:
        """Check ``state`` against this prompt's first ``n_prefix`` ids and make its arrays the cache.

        A state that does not fit (other text, other image sizes, another model's shapes) raises
        ``InputError``.
        """
        mx = self.mx
        meta = state.meta or {}
        if (
            state.backend != self.backend
            or not n_prefix
            or list(state.ids) != ids[:n_prefix]
            or meta.get("layers") != len(self._cache)
        ):
            raise InputError("the saved prefix state does not match this prompt (other text or images)")
        dtypes = meta.get("dtypes") or {}
        restored = []
        for i in range(len(self._cache)):
            pair = []
            for name in (f"{i}.keys", f"{i}.values"):
                arr = state.tensors.get(name)
                if arr is None or arr.ndim != 4 or arr.shape[2] != n_prefix:
                    raise InputError(f"the saved prefix state has no usable {name} array")
                out = mx.array(arr)
                if dtypes.get(name) == "bfloat16":
                    out = out.view(mx.bfloat16)
                pair.append(out)
            restored.append(tuple(pair))
        for c, pair in zip(self._cache, restored):
            c.state = pair
        self._rope_delta = int(meta.get("rope_delta", 0))
        self.n_past = n_prefix

    def _require_prefill(self) -> None:
        if not self._prefilled:
            raise RuntimeError("call prefill() before step() or feed()")

    def step(self, banned: TokenMask | None = None) -> Token:
        """Sample one token (never one of ``banned``), run it into the cache (next logits computed
        ahead), return its text."""
        mx = self.mx
        self._require_prefill()
        self._check_room(1, "generation")
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
        self._check_room(len(ids), "the forced text")
        # ids held for an unfinished character cannot be completed any more: the fed text follows them
        self._detok.drop()
        self._logits = self._forward(self._embed_ids(ids), self._text_positions(len(ids)))
        self.mx.eval(self._logits)
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
        return np.array(self._logits, dtype=np.float32, copy=True)

    # -- chains (the registry's ``chains`` capability) -----------------------------------------------------

    @property
    def next_position(self) -> int:
        """The M-RoPE position the next text token takes (tokens so far + the image's rope delta)."""
        return self.n_past + self._rope_delta

    @property
    def logits(self):
        """The raw logits (mx.array [vocab], float32) the next ``step`` samples from."""
        return self._logits

    def fork(self, n: int) -> list:
        """After prefill: ``n`` chains decoded as one batch over a batched copy of this KV cache
        (:mod:`qvq_local.backends.mlx_chains`): the cache is repeated along its batch axis, one row per
        chain, so the image is encoded and the prompt prefilled once."""
        mx = self.mx
        self._require_prefill()
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise InputError(f"the number of chains must be a positive whole number, got {n!r}")
        if self._forked:
            raise RuntimeError("fork() was already called on this session")
        self._forked = True
        for c in self._cache:
            keys, values = c.state
            c.keys = mx.repeat(keys, n, axis=0)
            c.values = mx.repeat(values, n, axis=0)
        mx.eval([c.state for c in self._cache])
        return mlx_chains.start_chains(self, n)

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
        self._cache = None
        self._logits = None
        self.mx.clear_cache()
