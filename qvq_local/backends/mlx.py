"""MLX backend: mlx-vlm's Qwen2-VL model driven by this project's own token loop.

Why not ``mlx_vlm.generate``: the reasoning controller needs three things mlx-vlm's generator does not
give together: one token at a time with its exact text, forced text appended into the *same* KV cache
(the image must never be encoded twice), and the logits after that forced text.  So this backend uses
mlx-vlm only for what it is good at (loading weights, preprocessing images, the vision tower, the
language model and its KV cache) and runs a small mlx-lm style loop itself.

This module loads a folder (header checks first, then mlx-vlm) into an :class:`MlxModel`: what the model
is (family, chat template, generation config, quantization, end-of-turn ids) and what it can tell before a
question (image tokens, its tokenizer and vocabulary).  One question runs in an
:class:`~qvq_local.backends.mlx_session.MlxSession`, which it opens.

Mechanism only: nothing here knows about thoughts, answers or budgets.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from qvq_local.backends.base import SamplingParams
from qvq_local.backends.mlx_session import MlxSession, activation_dtype, import_mlx
from qvq_local.errors import BackendUnavailable, InputError, ModelError
from qvq_local.families import DEFAULT_FAMILY, family_for_model_type
from qvq_local.prompt import load_chat_template


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

        if activation_dtype(mx, self.model.language_model, "auto") is None:
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
        self, sampling: SamplingParams, *, n_ctx: int | None = None, n_seq: int = 1, speculation: Any = None
    ) -> MlxSession:
        """``n_seq`` > 1: the session will be forked into that many chains (:meth:`MlxSession.fork`);
        ``n_ctx`` then counts the tokens of all of them (the prompt once).  ``speculation``: a
        :class:`~qvq_local.speculate.config.SpecSettings` (the registry's ``speculation`` capability),
        for one chain only."""
        if speculation is not None and speculation.active and n_seq > 1:
            raise InputError("speculation runs on one chain; open the session with n_seq=1")
        if speculation is not None and speculation.uses_draft_model:
            from qvq_local.backends.mlx_spec import check_shared_vocabulary

            check_shared_vocabulary(speculation.draft, self)  # before any work
        return MlxSession(
            self,
            sampling.resolved(self.generation_config, self.family.sampling),
            n_ctx=n_ctx,
            speculation=speculation,
        )

    def close(self) -> None:
        mx = import_mlx()
        self.model = None
        self.processor = None
        mx.clear_cache()


def run_facts(loaded: MlxModel) -> dict:
    """The registry's ``run_facts`` hook: how its sessions compute, where that differs from the weights'
    own dtype (:attr:`MlxModel.compute_note`), and where images are encoded (MLX's default device: the GPU
    under Metal or CUDA, else the CPU)."""
    import mlx.core as mx

    return {
        "compute": loaded.compute_note,
        "image_encoder": "gpu" if mx.default_device().type == mx.DeviceType.gpu else "cpu",
    }


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
    import_mlx()
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
    from qvq_local.formats.names import PICKLE_SUFFIXES
    from qvq_local.integrity import check_model

    if not any(
        p.suffix in (".safetensors", *PICKLE_SUFFIXES) or p.name.endswith(".index.json")
        for p in folder.iterdir()
    ):
        return  # no weights at all: mlx-vlm's own error says so
    for finding in check_model(folder):
        if finding.level == "error":
            raise ModelError(finding.message, path=finding.path)
